"""Marks a regions test that failed (``failure_logs.FAILED``), for its fixtures' teardown."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from tests.regions.failure_logs import FAILED


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        item.stash[FAILED] = True
    return report
