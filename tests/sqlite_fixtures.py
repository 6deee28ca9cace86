"""The ``db`` path and a started SQLite ``store`` on it, for the SQLite, reconcile and aggregator suites.

``store`` commits in windows of ``group_commit_ms``: 20 ms by default, wide enough that concurrent
writes share one transaction, which the SQLite suites count on. A suite that wants another window
overrides the ``group_commit_ms`` fixture rather than repeating the store fixture.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tally.store.sqlite.store import SqliteStore
from tests.helpers import open_sqlite


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "tally.db"


@pytest.fixture
def group_commit_ms() -> float:
    return 20


@pytest.fixture
async def store(db: Path, group_commit_ms: float) -> AsyncIterator[SqliteStore]:
    async with open_sqlite(db, group_commit_ms=group_commit_ms) as s:
        yield s
