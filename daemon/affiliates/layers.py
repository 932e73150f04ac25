"""Mappings for merging store postbacks into a rule set without copying it (issue 15).

:class:`CowMap` is a copy-on-write mapping in shards: a change copies the shards it touches
(1/64th of the map each), so a snapshot taken before stays as it was (SQLite plans deliveries
in its writer thread, off the event loop) and one affiliate change costs little whatever the
size. :class:`Layered` reads a top mapping over a base one (the store layer over the rule
files)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from itertools import chain
from typing import TypeVar, cast

K = TypeVar("K")
V = TypeVar("V")
SHARDS = 64
_MISSING = object()  # no value (a value may be None)


class CowMap(Mapping[K, V]):
    __slots__ = ("_len", "_shards")

    def __init__(self, shards: tuple[dict[K, V], ...] | None = None, length: int = 0) -> None:
        self._shards: tuple[dict[K, V], ...] = shards or tuple({} for _ in range(SHARDS))
        self._len = length

    def __getitem__(self, key: K) -> V:
        return self._shards[hash(key) % SHARDS][key]

    def get(self, key: K, default: V | None = None) -> V | None:  # type: ignore[override]
        # Mapping.get would call __getitem__ and catch its KeyError: an exception per miss
        return self._shards[hash(key) % SHARDS].get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._shards[hash(key) % SHARDS]

    def __iter__(self) -> Iterator[K]:
        return chain.from_iterable(self._shards)

    def __len__(self) -> int:
        return self._len

    def evolve(self, put: Mapping[K, V], drop: Iterable[K] = ()) -> CowMap[K, V]:
        """A new map with `put` set and `drop` removed; this one is left as it was."""
        shards = list(self._shards)
        copied: set[int] = set()
        length = self._len

        def shard(key: K) -> dict[K, V]:
            i = hash(key) % SHARDS
            if i not in copied:
                shards[i] = dict(shards[i])
                copied.add(i)
            return shards[i]

        for key in drop:
            if key in self and key not in put:
                del shard(key)[key]
                length -= 1
        for key, value in put.items():
            target = shard(key)
            if key not in target:
                length += 1
            target[key] = value
        return CowMap(tuple(shards), length)


class Layered(Mapping[K, V]):
    """`top` over `base`. With `disjoint` (no key in both) len() costs nothing."""

    __slots__ = ("_base", "_disjoint", "_top")

    def __init__(self, base: Mapping[K, V], top: Mapping[K, V], *, disjoint: bool = False) -> None:
        self._base = base
        self._top = top
        self._disjoint = disjoint

    def __getitem__(self, key: K) -> V:
        # Asked with get, not [] and KeyError: most keys are the base's (the rule files), and
        # an exception per lookup was two per delivered conversion.
        found: V | object = self._top.get(key, _MISSING)
        if found is _MISSING:
            return self._base[key]
        return cast(V, found)

    def get(self, key: K, default: V | None = None) -> V | None:  # type: ignore[override]
        found = self._top.get(key)
        if found is not None:
            return found
        return self._base.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._top or key in self._base

    def __iter__(self) -> Iterator[K]:
        yield from (k for k in self._base if self._disjoint or k not in self._top)
        yield from self._top

    def __len__(self) -> int:
        if self._disjoint:
            return len(self._base) + len(self._top)
        return len(self._base) + sum(1 for k in self._top if k not in self._base)
