"""adopt(): operations that landed before a cut become agreed; the rest do not."""

from __future__ import annotations

import pytest

from syncd.engine.index import BaseIndex
from syncd.engine.model import Agreed, Intent
from syncd.engine.recovery import adopt
from syncd.protocol.messages import DIR, FILE, Entry

OLD = Agreed("f", FILE, 0o644, 3, 100, b"old", None, 11, 21)
NEW = Agreed("f", FILE, 0o644, 3, 200, b"new", None, 12, 0)  # pushed to the remote


def remote_file(digest: bytes, mtime: int = 200, ino: int = 99) -> Entry:
    return Entry("f", FILE, 0o644, 3, mtime, ino, digest)


CASES = [
    # (intent, remote now, expected base row for "f" or "absent" / "unchanged")
    ("landed", Intent("remote", "f", NEW), remote_file(b"new"), ("f", 12, 99)),
    ("not-landed", Intent("remote", "f", NEW), remote_file(b"old", 100, 21), "unchanged"),
    ("landed-then-edited", Intent("remote", "f", NEW), remote_file(b"zzz", 300), "unchanged"),
    ("delete-landed", Intent("remote", "f", None), None, "absent"),
    ("delete-not-landed", Intent("remote", "f", None), remote_file(b"old", 100, 21), "unchanged"),
    ("meta-differs", Intent("remote", "f", NEW), remote_file(b"new", 250), "unchanged"),
]


@pytest.mark.parametrize("name,intent,now,expected", CASES, ids=[c[0] for c in CASES])
def test_adopt(name: str, intent: Intent, now: Entry | None, expected: object) -> None:
    base = BaseIndex([OLD])
    updates = dict(adopt(base, [intent], {}, {"f": now}))
    if expected == "unchanged":
        assert updates == {}
    elif expected == "absent":
        assert updates == {"f": None}
    else:
        path, local_ino, remote_ino = expected  # type: ignore[misc]
        row = updates[path]
        assert row is not None and (row.digest, row.local_ino, row.remote_ino) == (b"new", local_ino, remote_ino)


def test_adopt_rename_moves_the_subtree() -> None:
    base = BaseIndex([Agreed("d", DIR, 0o755, 0, 0, None, None, 1, 2), OLD.__class__("d/x", FILE, 0o644, 1, 5, b"x",
                                                                                    None, 3, 4)])
    remote = {"d": None, "e": Entry("e", DIR, 0o755, 0, 0, 2)}
    updates = dict(adopt(base, [Intent("remote", "d", None, "e")], {}, remote))
    assert updates["d"] is None and updates["d/x"] is None
    assert updates["e"] is not None and updates["e/x"] is not None and updates["e/x"].digest == b"x"


def test_adopt_rename_carries_local_only_markers() -> None:
    kept = Agreed("d/.env", FILE, 0o600, 1, 5, b"s", None, 7, 0, local_only=True)
    base = BaseIndex([Agreed("d", DIR, 0o755, 0, 0, None, None, 1, 2), kept])
    local = {"d": None, "e": Entry("e", DIR, 0o755, 0, 0, 1)}
    updates = dict(adopt(base, [Intent("local", "d", None, "e")], local, {}))
    assert updates["d/.env"] is None
    moved = updates["e/.env"]
    assert moved is not None and moved.local_only and moved.local_ino == 7
