"""syncd.store.Store: the base index in SQLite."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

from syncd.engine.model import Agreed, Intent
from syncd.protocol.messages import DIR, FILE, SYMLINK
from syncd.session import local_side
from syncd.session.local_side import load_base
from syncd.store import Store, load_intents, record_intents

CAFE = os.fsdecode(b"dir/caf\xe9.txt")
ROWS = [
    Agreed("dir", DIR, 0o755, 0, 1_700_000_000_000_000_000, None, None, 11, 21),
    Agreed(CAFE, FILE, 0o644, 5, 1_700_000_000_123_456_789, b"\x00" * 19 + b"\xff", None, 12, 22),
    Agreed("link", SYMLINK, 0o777, 0, 1, None, os.fsdecode(b"../\xfe\xff"), 13, 23),
    Agreed("empty", FILE, 0o600, 0, 0, b"d" * 20, None, 2**62, 0),
]


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "state" / "nested" / "base.sqlite")


def rows(store: Store) -> dict[str, Agreed]:
    return dict(store.load().mapping())


def test_round_trip_and_reopen(db: str) -> None:
    s = Store(db)
    assert len(s.load()) == 0
    s.commit([(r.path, r) for r in ROWS], {"version": "1", "remote_root": "/w"})
    assert rows(s) == {r.path: r for r in ROWS}
    s.close()
    s2 = Store(db)
    try:
        got = rows(s2)
        assert got == {r.path: r for r in ROWS}
        assert os.fsencode(got[CAFE].path) == b"dir/caf\xe9.txt"
        assert got["dir"].digest is None and got["dir"].target is None
        assert os.fsencode(got["link"].target or "") == b"../\xfe\xff"
        assert s2.get_meta("version") == "1"
        assert s2.get_meta("remote_root") == "/w"
        assert s2.get_meta("missing") is None
    finally:
        s2.close()


def test_paths_are_stored_as_raw_bytes(db: str) -> None:
    s = Store(db)
    s.commit([(CAFE, ROWS[1])])
    s.close()
    con = sqlite3.connect(db)
    try:
        (path,) = con.execute("SELECT path FROM base").fetchone()
    finally:
        con.close()
    assert path == b"dir/caf\xe9.txt"


def test_commit_none_deletes_and_replace_updates(db: str) -> None:
    s = Store(db)
    s.commit([(r.path, r) for r in ROWS])
    updated = Agreed(CAFE, FILE, 0o755, 6, 2, b"e" * 20, None, 14, 24)
    s.commit([("dir", None), (CAFE, updated), ("never-there", None)], {"version": "2"})
    s.close()
    s = Store(db)
    try:
        got = rows(s)
        assert set(got) == {CAFE, "link", "empty"}
        assert got[CAFE] == updated
        assert s.get_meta("version") == "2"
    finally:
        s.close()


def test_failed_commit_is_rolled_back(db: str) -> None:
    s = Store(db)
    s.commit([(ROWS[0].path, ROWS[0])], {"k": "before"})

    def changes():  # type: ignore[no-untyped-def]
        yield ("dir", None)
        yield (ROWS[1].path, ROWS[1])
        raise RuntimeError("killed mid-way")

    with pytest.raises(RuntimeError):
        s.commit(changes(), {"k": "after"})
    assert rows(s) == {"dir": ROWS[0]}
    assert s.get_meta("k") == "before"
    # The store is still usable.
    s.commit([(ROWS[2].path, ROWS[2])])
    assert set(rows(s)) == {"dir", "link"}
    s.close()


def test_replace_all(db: str) -> None:
    s = Store(db)
    s.commit([(r.path, r) for r in ROWS])
    s.replace_all([ROWS[1]])
    s.close()
    s = Store(db)
    try:
        assert rows(s) == {CAFE: ROWS[1]}
    finally:
        s.close()


def test_replace_all_is_one_transaction(db: str) -> None:
    """A failure while writing the new rows must leave the old index whole, never empty."""
    s = Store(db)
    s.commit([(r.path, r) for r in ROWS])

    def entries():  # type: ignore[no-untyped-def]
        yield ROWS[1]
        raise RuntimeError("killed mid-way")

    with pytest.raises(RuntimeError):
        s.replace_all(entries())
    assert rows(s) == {r.path: r for r in ROWS}
    s.close()


def test_large_inode_numbers(db: str) -> None:
    """st_ino is unsigned 64-bit; some filesystems hand out numbers above 2**63."""
    big = Agreed("big", FILE, 0o644, 1, 1, b"x" * 20, None, 2**64 - 1, 2**63)
    s = Store(db)
    s.commit([("big", big)])
    s.close()
    s = Store(db)
    try:
        assert rows(s) == {"big": big}
    finally:
        s.close()


KEPT = Agreed(".env", FILE, 0o600, 7, 1_700_000_000_000_000_001, b"k" * 20, None, 15, 0, local_only=True)


def test_local_only_markers_round_trip(db: str) -> None:
    s = Store(db)
    s.commit([(r.path, r) for r in ROWS] + [(KEPT.path, KEPT)])
    s.close()
    s = Store(db)
    try:
        base = s.load()
        assert base.kept(".env") == KEPT and base.get(".env") is None
        assert rows(s) == {r.path: r for r in ROWS}
        # Sent again: the agreed row replaces the marker (one row per path).
        sent = Agreed(".env", FILE, 0o600, 7, 1_700_000_000_000_000_001, b"k" * 20, None, 15, 25)
        s.commit([(".env", sent)])
        base = s.load()
        assert base.get(".env") == sent and base.kept(".env") is None
        s.commit([(".env", KEPT)])
        s.commit([(".env", None)])
        base = s.load()
        assert base.get(".env") is None and base.kept(".env") is None
    finally:
        s.close()


OLD_SCHEMA = """
CREATE TABLE base (
    path BLOB PRIMARY KEY, kind INTEGER NOT NULL, mode INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, digest BLOB, target BLOB, local_ino INTEGER NOT NULL,
    remote_ino INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def test_index_without_markers_is_migrated_in_place(db: str) -> None:
    """An index written before local-only markers existed opens with all its rows (each one
    agreed by both sides) and then takes markers."""
    os.makedirs(os.path.dirname(db))
    con = sqlite3.connect(db)
    con.executescript(OLD_SCHEMA)
    con.execute("INSERT INTO base VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (b"dir", DIR, 0o755, 0, 1_700_000_000_000_000_000, None, None, 11, 21))
    con.execute("INSERT INTO meta VALUES ('remote_root', '/w')")
    con.commit()
    con.close()
    s = Store(db)
    try:
        assert rows(s) == {"dir": ROWS[0]}
        assert s.get_meta("remote_root") == "/w"
        s.commit([(KEPT.path, KEPT)])
        assert s.load().kept(".env") == KEPT
    finally:
        s.close()
    s = Store(db)  # a second open finds the column there already
    try:
        assert s.load().kept(".env") == KEPT and rows(s) == {"dir": ROWS[0]}
    finally:
        s.close()


# ---- digests of an older scheme ----------------------------------------------------------

def _make_old(db: str) -> None:
    """Make the index look written by a syncd whose digests were of another scheme."""
    con = sqlite3.connect(db)
    try:
        con.execute("DELETE FROM meta WHERE key = 'digests'")
        con.commit()
    finally:
        con.close()


def _file_row(root: Path, rel: str, digest: bytes = b"\x01" * 20, **change: int) -> Agreed:
    st = os.stat(root / rel)
    row = Agreed(rel, FILE, 0o644, st.st_size, st.st_mtime_ns, digest, None, st.st_ino, 99)
    return row._replace(**change)


def test_a_new_index_records_the_current_scheme(db: str) -> None:
    s = Store(db)
    try:
        assert not s.stale_digests
        s.commit([(r.path, r) for r in ROWS])
    finally:
        s.close()
    s = Store(db)
    try:
        assert not s.stale_digests
    finally:
        s.close()


def test_an_old_index_without_digests_needs_no_rekeying(db: str) -> None:
    s = Store(db)
    s.commit([(ROWS[0].path, ROWS[0])])
    s.close()
    _make_old(db)
    s = Store(db)
    try:
        assert not s.stale_digests
    finally:
        s.close()


def test_digests_of_an_older_scheme_are_computed_again_from_the_local_files(db: str, tmp_path: Path) -> None:
    root = tmp_path / "local"
    (root / "d").mkdir(parents=True)
    for rel, data in {"same.txt": b"same\n", "d/kept.txt": b"kept\n", "edited.txt": b"edited\n",
                      "other-inode.txt": b"x\n", "unreadable.txt": b"u\n"}.items():
        (root / rel).write_bytes(data)
    rows = [
        _file_row(root, "same.txt"),
        _file_row(root, "d/kept.txt")._replace(local_only=True),
        _file_row(root, "edited.txt", mtime_ns=1),  # changed since it was recorded
        _file_row(root, "other-inode.txt", local_ino=1),  # replaced by another file
        Agreed("gone.txt", FILE, 0o644, 3, 5, b"\x02" * 20, None, 7, 8),
        Agreed("d", DIR, 0o755, 0, 5, None, None, 9, 10),
    ]
    if os.geteuid() != 0:  # root reads it anyway
        rows.append(_file_row(root, "unreadable.txt"))
        os.chmod(root / "unreadable.txt", 0)
    s = Store(db)
    s.commit([(r.path, r) for r in rows])
    record_intents(s, [Intent("remote", "same.txt", rows[0])])
    s.close()
    _make_old(db)

    s = Store(db)
    try:
        assert s.stale_digests
        base = load_base(s, str(root))
        assert not s.stale_digests
        assert base.get("same.txt").digest == hashlib.sha256(b"same\n").digest()  # type: ignore[union-attr]
        assert base.kept("d/kept.txt").digest == hashlib.sha256(b"kept\n").digest()  # type: ignore[union-attr]
        for unknown in ("edited.txt", "other-inode.txt", "gone.txt", "unreadable.txt"):
            row = base.get(unknown)
            assert row is None or row.digest is None, unknown
        # Everything else about the rows stays.
        assert base.get("same.txt") == rows[0]._replace(digest=hashlib.sha256(b"same\n").digest())
        assert base.get("d") == rows[5]
        assert [i.after.digest for i in load_intents(s) if i.after is not None] == [None]
    finally:
        s.close()


def test_rekeying_happens_once(db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "local"
    root.mkdir()
    (root / "a").write_bytes(b"a")
    s = Store(db)
    s.commit([("a", _file_row(root, "a"))])
    s.close()
    _make_old(db)
    s = Store(db)
    try:
        load_base(s, str(root))
        monkeypatch.setattr(local_side, "local_digests", lambda *a: pytest.fail("hashed again"))
        assert load_base(s, str(root)).get("a").digest == hashlib.sha256(b"a").digest()  # type: ignore[union-attr]
    finally:
        s.close()
