"""End-to-end: a restart with the base already recording the whole tree notices every
change made on either side while syncd was down, however small, and sends nothing else."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.twoway_util import (
    Pair,
    assert_idle,
    change_lines,
    conflict_lines,
    make_tree,
    open_pair,
    wait_quiescent,
)
from tests.sshd import SshServer


@pytest.fixture
def pair(sshd: SshServer, tmp_path: Path) -> Iterator[Pair]:
    yield from open_pair(sshd, tmp_path / "pair")


def same_size_edit(path: Path, data: bytes) -> None:
    """New content of the same size, with an mtime one nanosecond later."""
    st = path.stat()
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))


def test_changes_made_while_down_all_travel(pair: Pair) -> None:
    tree = {f"d{i}/sub{j}/f{k}.txt": f"file {i} {j} {k}\n" for i in range(4) for j in range(3) for k in range(4)}
    tree.update({"top.txt": "top\n", "gone/a.txt": "a\n", "gone/b/c.txt": "c\n", "rgone/x.txt": "x\n"})
    make_tree(pair.local, tree)
    os.symlink("top.txt", pair.local / "link")
    s1 = pair.start()
    wait_quiescent(pair.local, pair.remote, s1, what="initial push")
    s1.stop()

    L, R = pair.local, pair.remote
    # Local side, while down.
    same_size_edit(L / "d0/sub0/f0.txt", b"FILE 0 0 0\n")
    (L / "d0/sub1/f1.txt").unlink()
    os.chmod(L / "d1/sub0/f2.txt", 0o755)
    (L / "d1/sub2/new.txt").write_bytes(b"new local\n")
    shutil.rmtree(L / "gone")
    (L / "link").unlink()
    os.symlink("d0/sub0/f1.txt", L / "link")
    # Remote side, while down.
    same_size_edit(R / "d2/sub0/f0.txt", b"FILE 2 0 0\n")
    (R / "d2/sub1/f3.txt").unlink()
    os.chmod(R / "d3/sub0/f1.txt", 0o700)
    (R / "d3/sub2/new.txt").write_bytes(b"new remote\n")
    (R / "d3/new-dir").mkdir()
    shutil.rmtree(R / "rgone")
    os.rename(R / "d2/sub2/f2.txt", R / "d2/sub2/renamed.txt")
    # A file replaced by a copy of itself: same size and mtime, new inode.
    shutil.copy2(R / "d1/sub1/f0.txt", R / "d1/sub1/copy")
    os.replace(R / "d1/sub1/copy", R / "d1/sub1/f0.txt")

    s2 = pair.start()
    wait_quiescent(L, R, s2, what="restart")
    assert_idle(s2)
    for root in (L, R):
        assert (root / "d0/sub0/f0.txt").read_bytes() == b"FILE 0 0 0\n"
        assert not (root / "d0/sub1/f1.txt").exists()
        assert os.stat(root / "d1/sub0/f2.txt").st_mode & 0o777 == 0o755
        assert (root / "d1/sub2/new.txt").read_bytes() == b"new local\n"
        assert not (root / "gone").exists()
        assert os.readlink(root / "link") == "d0/sub0/f1.txt"
        assert (root / "d2/sub0/f0.txt").read_bytes() == b"FILE 2 0 0\n"
        assert not (root / "d2/sub1/f3.txt").exists()
        assert os.stat(root / "d3/sub0/f1.txt").st_mode & 0o777 == 0o700
        assert (root / "d3/sub2/new.txt").read_bytes() == b"new remote\n"
        assert (root / "d3/new-dir").is_dir()
        assert not (root / "rgone").exists()
        assert not (root / "d2/sub2/f2.txt").exists()
        assert (root / "d2/sub2/renamed.txt").read_text() == "file 2 2 2\n"
    # The copy with a new inode holds the same content: nothing travels for it.
    assert not [ln for ln in change_lines(s2) if "d1/sub1/f0.txt" in ln], s2.stdout()
    s2.stop()

    # And the restart after that one sends nothing at all.
    s3 = pair.start()
    wait_quiescent(L, R, s3, what="second restart")
    assert_idle(s3)
    assert change_lines(s3) == [], s3.stdout()
    s3.stop()


def test_paths_newly_ignored_while_down_are_left_alone(pair: Pair) -> None:
    tree = {f"d{i}/sub{j}/f{k}.txt": f"file {i} {j} {k}\n" for i in range(3) for j in range(2) for k in range(3)}
    make_tree(pair.local, tree)
    s1 = pair.start()
    wait_quiescent(pair.local, pair.remote, s1, what="initial push")
    s1.stop()

    L, R = pair.local, pair.remote
    (L / ".gitignore").write_text("d1/\n")  # ignored locally from now on
    (L / "d1/sub0/f0.txt").write_text("changed while ignored\n")
    (R / "d2/sub1/f2.txt").unlink()  # under a directory the restart ignores with --ignore
    s2 = pair.start("--ignore", "d2/")

    def synced(path: str) -> bool:
        return path.split("/")[0] not in ("d1", "d2")

    wait_quiescent(L, R, s2, what="restart with new ignore rules", keep=synced)
    assert_idle(s2)
    assert (R / ".gitignore").read_text() == "d1/\n"
    # Nothing under the newly ignored directories travelled or was deleted.
    assert (R / "d1/sub0/f0.txt").read_text() == "file 1 0 0\n"
    assert (L / "d1/sub0/f0.txt").read_text() == "changed while ignored\n"
    assert (L / "d2/sub1/f2.txt").is_file() and not (R / "d2/sub1/f2.txt").exists()
    for root in (L, R):
        assert len([p for p in (root / "d0").rglob("*") if p.is_file()]) == 6
    assert not [ln for ln in change_lines(s2) if "d1/" in ln or "d2/" in ln], s2.stdout()
    s2.stop()


def _as_older_syncd_wrote_it(state: Path) -> None:
    """Rewrite the session's index as a syncd with BLAKE2b digests left it."""
    (index,) = (state / "sessions").glob("*.sqlite")
    con = sqlite3.connect(index)
    try:
        con.execute("DELETE FROM meta WHERE key = 'digests'")
        rows = con.execute("SELECT path FROM base WHERE digest IS NOT NULL").fetchall()
        assert rows
        con.executemany("UPDATE base SET digest = ? WHERE path = ?",
                        [(hashlib.blake2b(p, digest_size=20).digest(), p) for (p,) in rows])
        con.commit()
    finally:
        con.close()


def test_an_index_with_digests_of_an_older_scheme_resumes_without_sending_anything_again(pair: Pair) -> None:
    tree = {f"d{i}/f{k}.txt": f"file {i} {k}\n" for i in range(3) for k in range(5)}
    make_tree(pair.local, tree)
    s1 = pair.start()
    wait_quiescent(pair.local, pair.remote, s1, what="initial push")
    s1.stop()
    _as_older_syncd_wrote_it(pair.state)
    same_size_edit(pair.local / "d0/f0.txt", b"FILE 0 0\n")  # while down: travels
    same_size_edit(pair.remote / "d1/f1.txt", b"FILE 1 1\n")

    s2 = pair.start()
    wait_quiescent(pair.local, pair.remote, s2, what="restart")
    assert_idle(s2)
    for root in (pair.local, pair.remote):
        assert (root / "d0/f0.txt").read_bytes() == b"FILE 0 0\n"
        assert (root / "d1/f1.txt").read_bytes() == b"FILE 1 1\n"
    travelled = sorted(ln.split()[3] for ln in change_lines(s2))
    assert travelled == ["d0/f0.txt", "d1/f1.txt"], s2.stdout()
    assert not conflict_lines(s2), s2.stdout()
    # A move after the restart is carried as a rename again: the digests were re-keyed.
    before = len(s2.stdout_lines())
    os.rename(pair.local / "d2/f2.txt", pair.local / "d2/moved.txt")
    wait_quiescent(pair.local, pair.remote, s2, what="move")
    assert change_lines(s2, before) == ["-> remote move   d2/f2.txt -> d2/moved.txt"], s2.stdout()
    s2.stop()
