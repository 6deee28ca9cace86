"""Structured logs: one JSON object per line, carrying the caller's extra fields."""

from __future__ import annotations

import logging
import sys

import orjson

from tally.logs import JsonFormatter


def test_json_lines_with_extra_fields() -> None:
    record = logging.makeLogRecord({"name": "tally.x", "levelname": "WARNING", "msg": "a %s",
                                    "args": ("b",), "consumer": "agg", "jobs": 3})
    entry = orjson.loads(JsonFormatter().format(record))
    assert entry["msg"] == "a b" and entry["level"] == "warning" and entry["logger"] == "tally.x"
    assert (entry["consumer"], entry["jobs"]) == ("agg", 3)
    assert entry["ts"].endswith("Z") and "args" not in entry


def test_exceptions_are_included() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.makeLogRecord({"msg": "failed", "exc_info": sys.exc_info(),
                                        "path": object()})
    entry = orjson.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in entry["exc"]
    assert entry["path"].startswith("<object")  # anything else is written as text
