"""The base index in memory: agreed entries by path, with subtree queries."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

from syncd.engine.model import SIDES, Agreed, Side
from syncd.protocol.messages import FILE
from syncd.scan import FILE_RECORD, dir_print, print_record


class BaseIndex:
    """Agreed entries keyed by path; ``under(path)`` lists a subtree cheaply.

    Rows both sides hold are the index proper (``get``, ``under``, iteration, ``len``).
    Local-only markers (``Agreed.local_only``) live beside them, reached only through
    ``kept``/``kept_under``/``kept_rows``: nothing that counts, walks or compares tracked
    entries mistakes a path the remote holds no copy of for one it does. A path is in at
    most one of the two.
    """

    def __init__(self, items: Iterable[Agreed] = ()) -> None:
        self._items: dict[str, Agreed] = {}
        self._kept: dict[str, Agreed] = {}
        self._sorted: list[str] | None = None
        for item in items:
            (self._kept if item.local_only else self._items)[item.path] = item

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
        if entry.local_only:
            self._kept[entry.path] = entry
            if self._items.pop(entry.path, None) is not None:
                self._sorted = None
            return
        self._kept.pop(entry.path, None)
        if entry.path not in self._items:
            self._sorted = None
        self._items[entry.path] = entry

    def discard(self, path: str) -> None:
        self._kept.pop(path, None)
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

    # -- local-only markers ------------------------------------------------------------------

    def kept(self, path: str) -> Agreed | None:
        """The local-only marker of ``path``, if the remote deleted it and the local kept it."""
        return self._kept.get(path)

    def kept_rows(self) -> list[Agreed]:
        return list(self._kept.values())

    def kept_under(self, path: str) -> list[str]:
        """Marked paths strictly below ``path`` (markers are few: a linear scan)."""
        prefix = path + "/"
        return [p for p in self._kept if p.startswith(prefix)]


def dir_prints(base: BaseIndex, side: Side) -> dict[str, bytes]:
    """The fingerprint of every directory's recorded listing on ``side``, keyed by the
    directory ("" = the root), as ``Scanner.scan_tree`` expects them: a directory whose
    listing on that side still matches holds exactly what the base says."""
    return sides_prints(base, (side,))[side]


def sides_prints(base: BaseIndex, sides: tuple[Side, ...] = SIDES) -> dict[Side, dict[str, bytes]]:
    """``dir_prints`` of several sides in one pass over the base (a restart needs both
    before anything is scanned, and the rows differ between sides only in the inode)."""
    groups: dict[Side, dict[str, list[str]]] = {side: {} for side in sides}
    local = groups.get("local")
    remote = groups.get("remote")
    for row in base.mapping().values():
        _add_record(local, remote, row)
    if local is not None:  # local-only markers are on the local disk (a kept preserve-absent file)
        for row in base.kept_rows():
            _add_record(local, None, row)
    return {side: {d: dir_print(r) for d, r in by_dir.items()} for side, by_dir in groups.items()}


def _add_record(local: dict[str, list[str]] | None, remote: dict[str, list[str]] | None, row: Agreed) -> None:
    path = row.path
    cut = path.rfind("/")
    parent, name = (path[:cut], path[cut + 1 :]) if cut >= 0 else ("", path)
    for groups, ino in ((local, row.local_ino), (remote, row.remote_ino)):
        if groups is None:
            continue
        if row.kind == FILE:
            record = FILE_RECORD % (name, row.mode, row.size, row.mtime_ns, ino)
        else:
            record = print_record(name, row.kind, row.mode, row.size, row.mtime_ns, ino, row.target)
        records = groups.get(parent)
        if records is None:
            records = groups[parent] = []
        records.append(record)
