"""The ``harness`` fixture: the contract suites run once per registered adapter."""

from __future__ import annotations

from tests.store.harness import harness

__all__ = ["harness"]
