"""Where a key lives: id -> logical shard (a stable hash) -> physical database (the shard map).

Logical shards are many and fixed for the life of the data; physical databases are few and change.
Keys hash to a logical shard once, so moving a range of logical shards to another database moves
rows without rehashing anything. The hash is BLAKE2b, the same in every process and version
(Python's ``hash()`` is salted per process and would scatter the data).

Toggle records and their change log are placed by USER (has-liked for a feed is then one query on
one database; a viral item's writes spread over all of them). Counts are placed by ITEM, over the
same databases and the same map. This module does no I/O.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from tally.core.errors import ConfigError

T = TypeVar("T")
_RANGE_RE = re.compile(r"\s*(\d+)\s*-\s*(\d+)\s*=\s*(\d+)\s*")


def logical_shard(key: str, shards: int) -> int:
    """The logical shard of a user or item id: stable across processes, machines and releases."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def even_split(shards: int, databases: int) -> list[int]:
    """Contiguous, equal ranges: shard i goes to database i * databases // shards."""
    return [i * databases // shards for i in range(shards)]


def parse_ranges(ranges: Sequence[str], shards: int, databases: int) -> list[int]:
    """'FIRST-LAST=DB' entries -> the database of every logical shard; each shard exactly once."""
    table: list[int | None] = [None] * shards
    for entry in ranges:
        m = _RANGE_RE.fullmatch(entry)
        if m is None:
            raise ConfigError(f"shard_map entry {entry!r} must look like 'FIRST-LAST=DB_INDEX'")
        first, last, db = (int(g) for g in m.groups())
        if not 0 <= first <= last < shards:
            raise ConfigError(f"shard_map entry {entry!r}: shards must satisfy "
                              f"0 <= FIRST <= LAST < {shards}")
        if not 0 <= db < databases:
            raise ConfigError(f"shard_map entry {entry!r}: database index must be below "
                              f"{databases} (the number of postgres_dsns)")
        for shard in range(first, last + 1):
            if table[shard] is not None:
                raise ConfigError(f"shard_map: logical shard {shard} is mapped twice")
            table[shard] = db
    unmapped = [i for i, db in enumerate(table) if db is None]
    if unmapped:
        raise ConfigError(f"shard_map: {len(unmapped)} logical shards are not mapped "
                          f"(first: {unmapped[0]})")
    return [db for db in table if db is not None]


@dataclass(frozen=True)
class ShardMap:
    """Logical shard -> physical database index (an index into ``postgres_dsns``)."""

    shards: int
    databases: int
    table: tuple[int, ...]

    @classmethod
    def build(cls, shards: int, databases: int, ranges: Sequence[str] = ()) -> ShardMap:
        if shards < 1 or databases < 1:
            raise ConfigError("a shard map needs at least one logical shard and one database")
        if databases > shards:
            raise ConfigError(f"{databases} databases but only {shards} logical shards")
        table = parse_ranges(ranges, shards, databases) if ranges else even_split(shards, databases)
        unused = set(range(databases)) - set(table)
        if unused:
            raise ConfigError(f"shard_map leaves databases {sorted(unused)} without shards")
        return cls(shards, databases, tuple(table))

    def shard_of(self, key: str) -> int:
        return logical_shard(key, self.shards)

    def db_of_shard(self, shard: int) -> int:
        return self.table[shard]

    def db_of(self, key: str) -> int:
        """The physical database holding ``key`` (a user id for toggles, an item for counts)."""
        return self.table[logical_shard(key, self.shards)]

    def shards_of_db(self, db: int) -> list[int]:
        return [s for s, d in enumerate(self.table) if d == db]

    def group(self, values: Iterable[T], key: Callable[[T], str]) -> dict[int, list[T]]:
        """Values by the database of ``key(value)``, each group in input order."""
        groups: dict[int, list[T]] = defaultdict(list)
        for v in values:
            groups[self.db_of(key(v))].append(v)
        return dict(groups)

    def ranges(self) -> list[str]:
        """The map in the settings format, contiguous runs collapsed (for docs and status)."""
        out: list[str] = []
        start = 0
        for i in range(1, self.shards + 1):
            if i == self.shards or self.table[i] != self.table[start]:
                out.append(f"{start}-{i - 1}={self.table[start]}")
                start = i
        return out
