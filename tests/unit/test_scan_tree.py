"""Scanner.scan_tree against fingerprints of a recorded base: a directory matches only
when every child still holds exactly what the base says."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from syncd.engine.index import BaseIndex, dir_prints
from syncd.engine.model import agreed_from
from syncd.protocol import messages as m
from syncd.rules import Rules
from syncd.scan import TEMP_PREFIX, Scanner, dir_print, print_record


def make_scanner(root: Path) -> Scanner:
    return Scanner(str(root), Rules(ignore=["*.o", "cache/"]).is_ignored)


def record(root: Path) -> BaseIndex:
    """The base a sync of ``root`` with an identical remote would leave (same inodes on
    both sides keeps the test short; the remote fingerprints use remote_ino)."""
    return BaseIndex(agreed_from(e, e.ino, e.ino + 1) for e in make_scanner(root).scan_all())


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    for rel in ("a/one.txt", "a/two.txt", "a/b/deep.txt", "top.txt", ("caf\xe9").join(["x", ".txt"])):
        path = r / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rel.encode("utf-8", "surrogateescape") * 3)
    os.chmod(r / "a" / "two.txt", 0o755)
    (r / "empty").mkdir()
    os.symlink("a/one.txt", r / "link")
    bad = os.fsencode(str(r / "a")) + b"/bad\xff.txt"
    with open(bad, "wb") as fh:
        fh.write(b"not utf-8 name")
    return r


def scan(root: Path, base: BaseIndex) -> tuple[dict[str, m.Entry], set[str]]:
    entries, matched = make_scanner(root).scan_tree(dir_prints(base, "local"))
    return {e.path: e for e in entries}, matched


def test_unchanged_tree_lists_nothing(root: Path) -> None:
    base = record(root)
    entries, matched = scan(root, base)
    assert entries == {}
    assert matched == {"", "a", "a/b"}  # "empty" has no children, so no fingerprint


def test_remote_fingerprints_use_remote_inodes(root: Path) -> None:
    base = record(root)
    local, remote = dir_prints(base, "local"), dir_prints(base, "remote")
    assert set(local) == set(remote) and all(local[d] != remote[d] for d in local)
    _, matched = make_scanner(root).scan_tree(remote)
    assert matched == set()


def test_ignored_temp_and_special_entries_do_not_count(root: Path) -> None:
    base = record(root)
    (root / "a" / "junk.o").write_bytes(b"obj")
    (root / "a" / "cache").mkdir()
    (root / "a" / "cache" / "x").write_bytes(b"x")
    (root / "a" / (TEMP_PREFIX + "1-2-one.txt")).write_bytes(b"half")
    os.mkfifo(root / "a" / "fifo")
    entries, matched = scan(root, base)
    assert entries == {} and "a" in matched


@pytest.mark.parametrize("change", [
    "same-size-edit", "mode", "delete", "add", "new-inode", "retarget-link", "dir-mode",
    "replace-file-by-dir",
])
def test_every_change_lists_its_directory(root: Path, change: str) -> None:
    base = record(root)
    target = root / "a" / "one.txt"
    st = os.stat(target)
    if change == "same-size-edit":
        target.write_bytes(b"X" * st.st_size)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
        changed_dir = "a"
    elif change == "mode":
        os.chmod(target, 0o600)
        changed_dir = "a"
    elif change == "delete":
        target.unlink()
        changed_dir = "a"
    elif change == "add":
        (root / "a" / "b" / "new.txt").write_bytes(b"new")
        changed_dir = "a/b"
    elif change == "new-inode":
        shutil.copy2(target, root / "copy")
        os.replace(root / "copy", target)
        assert os.stat(target).st_mtime_ns == st.st_mtime_ns and os.stat(target).st_size == st.st_size
        changed_dir = "a"
    elif change == "retarget-link":
        (root / "link").unlink()
        os.symlink("top.txt", root / "link")
        changed_dir = ""
    elif change == "dir-mode":
        os.chmod(root / "a" / "b", 0o700)
        changed_dir = "a"
    else:
        target.unlink()
        target.mkdir()
        changed_dir = "a"
    entries, matched = scan(root, base)
    assert changed_dir not in matched
    assert matched == {"", "a", "a/b"} - {changed_dir}
    # The whole listing of that directory is reported, as a plain scan would.
    plain = {e.path: e for e in make_scanner(root).scan_all()}
    listed = {p for p in plain if p.rpartition("/")[0] == changed_dir}
    assert listed <= set(entries)
    for path in listed:
        assert entries[path].kind == plain[path].kind and entries[path].mode == plain[path].mode


def test_a_vanished_directory_is_not_matched(root: Path) -> None:
    base = record(root)
    shutil.rmtree(root / "a" / "b")
    entries, matched = scan(root, base)
    assert matched == {""}
    assert "a/b" not in entries and "a/one.txt" in entries


def test_directory_mtime_does_not_count(root: Path) -> None:
    base = record(root)
    st = os.stat(root / "a")
    os.utime(root / "a", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _, matched = scan(root, base)
    assert "" in matched


def test_record_fields_that_do_not_matter_are_left_out() -> None:
    assert print_record("d", m.DIR, 0o755, 4096, 1, 7, None) == print_record("d", m.DIR, 0o755, 0, 2, 7, None)
    assert print_record("l", m.SYMLINK, 0o777, 3, 1, 7, "t") == print_record("l", m.SYMLINK, 0, 0, 2, 7, "t")
    assert print_record("f", m.FILE, 0o644, 3, 1, 7, None) != print_record("f", m.FILE, 0o644, 3, 2, 7, None)
    # The order of the children does not matter; their names do.
    one = [print_record("a", m.FILE, 0o644, 1, 1, 1, None), print_record("b", m.FILE, 0o644, 1, 1, 2, None)]
    two = [print_record("b", m.FILE, 0o644, 1, 1, 2, None), print_record("a", m.FILE, 0o644, 1, 1, 1, None)]
    assert dir_print(one) == dir_print(two)
    three = [print_record("a", m.FILE, 0o644, 1, 1, 2, None), print_record("b", m.FILE, 0o644, 1, 1, 1, None)]
    assert dir_print(one) != dir_print(three)


def test_a_directory_that_cannot_be_listed_counts_as_unchanged(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its children are unknown, not gone: reported as matched, the base stands for them.
    (The tests run as root, which lists everything: the refusal is simulated.)"""
    base = record(root)
    (root / "a" / "new.txt").write_bytes(b"changed meanwhile")
    (root / "top.txt").write_bytes(b"changed too")
    real_scandir = os.scandir
    locked = os.path.join(str(root), "a")

    def scandir(path: str) -> object:
        if path == locked:
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    scanner = make_scanner(root)
    entries, matched = scanner.scan_tree(dir_prints(base, "local"))
    listed = {e.path for e in entries}
    assert {"a", "a/b"} <= matched  # a/b was not reached: unknown too
    assert not any(p.startswith("a/") for p in listed) and "top.txt" in listed
    assert [p for p, _ in scanner.skipped] == ["a"]
