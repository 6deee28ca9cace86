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
        if not ranges:
            return cls(shards, databases, tuple(even_split(shards, databases)))
        # A database without shards is allowed: a server just added, waiting for ``tally shards
        # move`` to fill it (or one emptied by it).
        return cls(shards, databases, tuple(parse_ranges(ranges, shards, databases)))

    def moved(self, first: int, last: int, to: int) -> ShardMap:
        """This map with logical shards ``first..last`` placed in database ``to``."""
        table = list(self.table)
        table[first:last + 1] = [to] * (last - first + 1)
        return ShardMap(self.shards, self.databases, tuple(table))

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

    def not_owned(self, db: int) -> list[tuple[int, int]]:
        """The runs of logical shards that database ``db`` does not hold (its write guard)."""
        return _runs([s for s, d in enumerate(self.table) if d != db])

    def owned(self, db: int) -> list[tuple[int, int]]:
        """The runs of logical shards database ``db`` holds, as (first, last) pairs."""
        return _runs(self.shards_of_db(db))

    def ranges(self) -> list[str]:
        """The map in the settings format, contiguous runs collapsed (for docs and status)."""
        out: list[str] = []
        start = 0
        for i in range(1, self.shards + 1):
            if i == self.shards or self.table[i] != self.table[start]:
                out.append(f"{start}-{i - 1}={self.table[start]}")
                start = i
        return out


def _runs(shards: list[int]) -> list[tuple[int, int]]:
    """Sorted shard numbers -> maximal runs of consecutive ones, as (first, last) pairs."""
    out: list[tuple[int, int]] = []
    for s in shards:
        if out and out[-1][1] == s - 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out
