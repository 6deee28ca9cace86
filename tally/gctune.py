"""Garbage collector tuning for a long-running Tally process (the server and its writer
children): what lives from start-up on is frozen, and young collections run less often."""

from __future__ import annotations

import gc
from typing import Any

# Allocations between young collections (Python's default: 700). A young collection walks every
# young object, so this sets both how often the collector runs and how long each pause is: far
# above the default so a request's few hundred objects do not trigger one, low enough that a
# pause stays short next to a request (docs/performance.md has the measured trade-off).
GC_THRESHOLD = 10_000


def tune_gc(threshold: int = GC_THRESHOLD) -> None:
    """Moves everything alive after start-up out of the collector's sight and collects the young
    generation less often. At Python's default threshold the collector runs every few requests,
    and its older generations walk the whole count cache, in pauses that set the tail latency.
    ``threshold`` 0 leaves the collector alone."""
    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(threshold, gen1, gen2)
    if _freeze_after_first_full_collection not in gc.callbacks:
        gc.callbacks.append(_freeze_after_first_full_collection)


def _freeze_after_first_full_collection(phase: str, info: dict[str, Any]) -> None:
    """What survives the first full collection after start-up (what the first requests imported and
    built lazily: tens of thousands of functions, dicts and tuples) is frozen too, once, or
    each later full collection would walk all of it again, a stall of many requests. Only once:
    anything in flight that is frozen and later becomes cyclic garbage is never freed, a
    bounded cost paid one time."""
    if phase == "stop" and info["generation"] == 2:
        gc.callbacks.remove(_freeze_after_first_full_collection)
        gc.freeze()
