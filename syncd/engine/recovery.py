"""Adopting operations that landed but were never confirmed (link cut, process killed).

Pure: given the recorded intents and what each side holds now, say which base rows to
write. Without this, a write that reached the far side just before the link dropped would
look like an edit made there, and collide with the next edit on the near side.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from syncd.engine.index import BaseIndex
from syncd.engine.model import Agreed, Intent, content_equal, meta_equal, other
from syncd.protocol.messages import Entry


def adopt(base: BaseIndex, intents: Iterable[Intent], local: Mapping[str, Entry | None],
          remote: Mapping[str, Entry | None]) -> list[tuple[str, Agreed | None]]:
    """Base updates for the intents whose effect is visible on their side."""
    updates: list[tuple[str, Agreed | None]] = []
    for intent in intents:
        seen = local if intent.side == "local" else remote
        if intent.dest is not None:  # a rename
            if seen.get(intent.path) is None and seen.get(intent.dest) is not None:
                for path in [intent.path, *base.under(intent.path), *base.kept_under(intent.path)]:
                    row = base.get(path) or base.kept(path)
                    if row is None:
                        continue
                    moved = intent.dest + path[len(intent.path):]
                    updates.append((path, None))
                    updates.append((moved, row._replace(path=moved)))
            continue
        now = seen.get(intent.path)
        if intent.after is None:
            if now is None:
                updates.append((intent.path, None))
            continue
        if now is None:
            continue
        wanted = intent.after.as_entry(intent.side)  # type: ignore[arg-type]
        if content_equal(now, wanted) and meta_equal(now, wanted):
            side_ino = {intent.side: now.ino, other(intent.side): intent.after.ino(other(intent.side))}  # type: ignore[arg-type]
            updates.append((intent.path, intent.after._replace(local_ino=side_ino["local"],
                                                                remote_ino=side_ino["remote"])))
    return updates
