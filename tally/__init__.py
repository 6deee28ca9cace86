"""Tally: durable, idempotent like counts and other counters."""

__version__ = "0.1.0"
