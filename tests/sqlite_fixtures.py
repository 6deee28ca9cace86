"""The ``db`` path and a started SQLite ``store`` on it, for the SQLite, reconcile and aggregator
suites (FULL durability, the likes writer in its own process, as in production)."""

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
async def store(db: Path) -> AsyncIterator[SqliteStore]:
    async with open_sqlite(db) as s:
        yield s
