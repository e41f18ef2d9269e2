"""The base index in memory: agreed entries by path, with subtree queries."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

from syncd.engine.model import Agreed


class BaseIndex:
    """Agreed entries keyed by path; ``under(path)`` lists a subtree cheaply."""

    def __init__(self, items: Iterable[Agreed] = ()) -> None:
        self._items: dict[str, Agreed] = {a.path: a for a in items}
        self._sorted: list[str] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, path: object) -> bool:
        return path in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def get(self, path: str) -> Agreed | None:
        return self._items.get(path)

    def values(self) -> Iterable[Agreed]:
        return self._items.values()

    def set(self, entry: Agreed) -> None:
        if entry.path not in self._items:
            self._sorted = None
        self._items[entry.path] = entry

    def discard(self, path: str) -> None:
        if self._items.pop(path, None) is not None:
            self._sorted = None

    def under(self, path: str) -> list[str]:
        """Paths strictly below ``path`` ("" = everything)."""
        if path == "":
            return list(self._items)
        if self._sorted is None:
            self._sorted = sorted(self._items)
        keys = self._sorted
        lo = bisect.bisect_left(keys, path + "/")
        hi = bisect.bisect_left(keys, path + "0")  # '0' sorts right after '/'
        return keys[lo:hi]

    def mapping(self) -> dict[str, Agreed]:
        return self._items
