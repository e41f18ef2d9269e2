"""syncd.fsops.Root on real temporary directories: atomic writes, path safety, Expect checks."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.fsops import Root, UnsafePath, read_file, split_path
from syncd.protocol import messages as m
from syncd.scan import TEMP_PREFIX, digest_bytes

MTIME = 1_600_000_000_123_456_789


def tree(path: Path) -> dict[str, str]:
    """Every entry under ``path`` (not following links): relative path -> kind/content."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, path)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(full)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            else:
                out[rel] = "file:" + Path(full).read_bytes().decode("latin-1")
    return out


def temps(path: Path) -> list[str]:
    return [k for k in tree(path) if os.path.basename(k).startswith(TEMP_PREFIX)]


@pytest.fixture
def space(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"secret")
    return tmp_path


@pytest.fixture
def root(space: Path) -> Iterator[Root]:
    r = Root(str(space / "root"))
    yield r
    r.close()


def expect_of(path: Path) -> m.Expect:
    st = os.lstat(path)
    kind = m.DIR if stat.S_ISDIR(st.st_mode) else m.SYMLINK if stat.S_ISLNK(st.st_mode) else m.FILE
    return m.Expect(kind, st.st_size if kind == m.FILE else 0, st.st_mtime_ns, st.st_ino)


# ---- writes ---------------------------------------------------------------------------------


def test_put_file_writes_atomically_with_mode_and_mtime(root: Root, space: Path) -> None:
    res = root.apply(m.PutFile("a.sh", b"#!/bin/sh\n", 0o755, MTIME, m.Expect(m.ABSENT)))
    assert res.status == m.OK, res.message
    st = os.stat(space / "root" / "a.sh")
    assert (space / "root" / "a.sh").read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE(st.st_mode) == 0o755
    assert st.st_mtime_ns == MTIME
    assert res.entry is not None
    assert (res.entry.path, res.entry.kind, res.entry.size, res.entry.ino) == ("a.sh", m.FILE, 10, st.st_ino)
    assert temps(space) == []


def test_put_file_replaces_existing_file_with_matching_expect(root: Root, space: Path) -> None:
    target = space / "root" / "f"
    target.write_bytes(b"old")
    res = root.apply(m.PutFile("f", b"new content", 0o600, MTIME, expect_of(target)))
    assert res.status == m.OK, res.message
    assert target.read_bytes() == b"new content"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert temps(space) == []


def test_put_file_non_utf8_name(root: Root, space: Path) -> None:
    name = os.fsdecode(b"caf\xe9.txt")
    assert root.apply(m.PutFile(name, b"x", 0o644, MTIME, None)).status == m.OK
    assert os.listdir(os.fsencode(space / "root")) == [b"caf\xe9.txt"]


def test_put_file_into_missing_directory_is_changed(root: Root, space: Path) -> None:
    res = root.apply(m.PutFile("nodir/f", b"x", 0o644, MTIME, None))
    assert res.status == m.CHANGED
    assert tree(space / "root") == {}


def test_put_file_over_a_directory_fails_without_damage(root: Root, space: Path) -> None:
    (space / "root" / "d").mkdir()
    (space / "root" / "d" / "keep").write_bytes(b"k")
    res = root.apply(m.PutFile("d", b"x", 0o644, MTIME, None))
    assert res.status in (m.FAILED, m.CHANGED)
    assert tree(space / "root") == {"d": "dir", "d/keep": "file:k"}


ESCAPES = [
    "../x",
    "/abs",
    "a/../../x",
    "a//b",
    "./a",
    "a/./b",
    "a/.",
    "a/..",
    "..",
    ".",
    "",
    "a/",
    "x\0y",
    "link/evil",
    "link/sub/evil",
    "file/x",  # through a non-directory
    "n" * 256,
]


@pytest.mark.parametrize("rel, parts", [
    ("a", ["a"]),
    ("a/b/c.txt", ["a", "b", "c.txt"]),
    ("..a/b..", ["..a", "b.."]),
    (".hidden/.x", [".hidden", ".x"]),
    ("d/" + "n" * 255, ["d", "n" * 255]),
    ("é" * 127, ["é" * 127]),  # 254 bytes
    ("/".join(["abc"] * 40), ["abc"] * 40),
    (os.fsdecode(b"caf\xe9/x"), [os.fsdecode(b"caf\xe9"), "x"]),
])
def test_split_path_accepts(rel: str, parts: list[str]) -> None:
    assert split_path(rel) == parts


@pytest.mark.parametrize("rel", [*(e for e in ESCAPES if not e.startswith(("link/", "file/"))),
                                 "é" * 128, "a/" + "n" * 256, "x" * 300 + "/a", "a/b/", "a/../b", "a/./b/c"])
def test_split_path_refuses(rel: str) -> None:
    with pytest.raises(UnsafePath):
        split_path(rel)


def _setup_escape_tree(space: Path) -> dict[str, str]:
    r = space / "root"
    (r / "a").mkdir()
    (r / "file").write_bytes(b"f")
    (space / "outside" / "sub").mkdir()
    os.symlink(str(space / "outside"), r / "link")
    return tree(space)


def _op_variants(path: str) -> list[m.Op]:
    return [
        m.PutFile(path, b"evil", 0o644, MTIME, None),
        m.MakeDir(path, 0o755, None),
        m.MakeLink(path, "/etc/passwd", None),
        m.Remove(path, None),
        m.Rename("a", path, None),
        m.Rename(path, "a/moved", None),
        m.SetMeta(path, 0o777, MTIME, None),
        m.CopyAside("file", path, None),
        m.CopyAside(path, "copy", None),
    ]


@pytest.mark.parametrize("path", ESCAPES)
@pytest.mark.parametrize("variant", range(len(_op_variants("x"))),
                         ids=[type(op).__name__ + str(i) for i, op in enumerate(_op_variants("x"))])
def test_escapes_are_refused_and_nothing_is_written(root: Root, space: Path, path: str, variant: int) -> None:
    before = _setup_escape_tree(space)
    op = _op_variants(path)[variant]
    res = root.apply(op)
    assert res.status == m.UNSAFE, (op, res)
    assert tree(space) == before


@pytest.mark.parametrize("path", ["link/evil", "../x", "a/../../x"])
def test_blob_escapes_are_refused(root: Root, space: Path, path: str) -> None:
    before = _setup_escape_tree(space)
    root.start_blob(1, path)
    root.blob_data(1, b"evil")
    res = root.apply(m.PutBlob(path, 1, 0o644, MTIME, None))
    assert res.status == m.UNSAFE
    assert tree(space) == before


def test_put_file_over_symlink_replaces_the_link(root: Root, space: Path) -> None:
    link = space / "root" / "f"
    os.symlink(str(space / "outside" / "secret"), link)
    res = root.apply(m.PutFile("f", b"mine", 0o644, MTIME, expect_of(link)))
    assert res.status == m.OK, res.message
    assert not link.is_symlink()
    assert link.read_bytes() == b"mine"
    assert (space / "outside" / "secret").read_bytes() == b"secret"


def test_put_file_over_dangling_symlink_does_not_create_target(root: Root, space: Path) -> None:
    link = space / "root" / "f"
    os.symlink(str(space / "outside" / "new"), link)
    assert root.apply(m.PutFile("f", b"mine", 0o644, MTIME, None)).status == m.OK
    assert not (space / "outside" / "new").exists()
    assert link.read_bytes() == b"mine" and not link.is_symlink()


def test_set_meta_on_symlink_does_not_touch_target(root: Root, space: Path) -> None:
    secret = space / "outside" / "secret"
    os.chmod(secret, 0o600)
    os.symlink(str(secret), space / "root" / "l")
    res = root.apply(m.SetMeta("l", 0o777, MTIME, None))
    assert res.status == m.OK, res.message
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert secret.stat().st_mtime_ns != MTIME


def test_remove_symlink_to_dir_removes_only_the_link(root: Root, space: Path) -> None:
    os.symlink(str(space / "outside"), space / "root" / "l")
    assert root.apply(m.Remove("l", None)).status == m.OK
    assert (space / "outside" / "secret").exists()
    assert tree(space / "root") == {}


def test_symlink_swapped_in_after_caching_is_not_followed_next_batch(root: Root, space: Path) -> None:
    r = space / "root"
    (r / "d").mkdir()
    assert root.apply(m.PutFile("d/f", b"1", 0o644, MTIME, None)).status == m.OK
    root.release()  # end of batch
    os.rename(r / "d", r / "d-old")
    os.symlink(str(space / "outside"), r / "d")
    res = root.apply(m.PutFile("d/g", b"evil", 0o644, MTIME, None))
    assert res.status == m.UNSAFE
    assert sorted(os.listdir(space / "outside")) == ["secret"]


# ---- Expect -------------------------------------------------------------------------------------


def test_expect_mismatch_on_changed_file(root: Root, space: Path) -> None:
    f = space / "root" / "f"
    f.write_bytes(b"v1")
    stale = expect_of(f)
    f.write_bytes(b"version 2")  # size (and mtime) changed since the scan
    res = root.apply(m.PutFile("f", b"theirs", 0o644, MTIME, stale))
    assert res.status == m.CHANGED
    assert f.read_bytes() == b"version 2"
    assert temps(space) == []


def test_expect_mismatch_on_mtime_only(root: Root, space: Path) -> None:
    f = space / "root" / "f"
    f.write_bytes(b"v1")
    stale = expect_of(f)
    os.utime(f, ns=(MTIME, MTIME))
    assert root.apply(m.PutFile("f", b"theirs", 0o644, MTIME, stale)).status == m.CHANGED
    assert f.read_bytes() == b"v1"


def test_expect_mismatch_on_inode(root: Root, space: Path) -> None:
    f = space / "root" / "f"
    f.write_bytes(b"v1")
    os.utime(f, ns=(MTIME, MTIME))
    stale = expect_of(f)
    f.unlink()
    keep = space / "root" / "other"
    keep.write_bytes(b"v1")  # hold on to an inode so the next file gets another one
    f.write_bytes(b"v1")
    os.utime(f, ns=(MTIME, MTIME))
    assert os.stat(f).st_ino != stale.ino
    assert root.apply(m.Remove("f", stale)).status == m.CHANGED
    assert f.exists()


def test_expect_absent_but_exists(root: Root, space: Path) -> None:
    f = space / "root" / "f"
    f.write_bytes(b"mine")
    for op in (
        m.PutFile("f", b"theirs", 0o644, MTIME, m.Expect(m.ABSENT)),
        m.MakeLink("f", "x", m.Expect(m.ABSENT)),
    ):
        assert root.apply(op).status == m.CHANGED
    assert f.read_bytes() == b"mine"
    assert temps(space) == []


def test_expect_existing_but_absent(root: Root, space: Path) -> None:
    res = root.apply(m.PutFile("f", b"x", 0o644, MTIME, m.Expect(m.FILE, 1, 1, 0)))
    assert res.status == m.CHANGED
    assert tree(space / "root") == {}


def test_expect_wrong_kind(root: Root, space: Path) -> None:
    (space / "root" / "d").mkdir()
    assert root.apply(m.Remove("d", m.Expect(m.FILE, 0, 0, 0))).status == m.CHANGED
    assert (space / "root" / "d").is_dir()


# ---- remove, rename, meta, copies, links, dirs -----------------------------------------------------


def test_remove_file_and_empty_dir(root: Root, space: Path) -> None:
    r = space / "root"
    (r / "d").mkdir()
    (r / "d" / "f").write_bytes(b"x")
    assert root.apply(m.Remove("d/f", expect_of(r / "d" / "f"))).status == m.OK
    assert root.apply(m.Remove("d", expect_of(r / "d"))).status == m.OK
    assert tree(r) == {}


def test_remove_non_empty_dir_fails_and_deletes_nothing(root: Root, space: Path) -> None:
    r = space / "root"
    (r / "d" / "sub").mkdir(parents=True)
    (r / "d" / "f").write_bytes(b"x")
    (r / "d" / "sub" / "g").write_bytes(b"y")
    before = tree(r)
    res = root.apply(m.Remove("d", None))
    assert res.status == m.FAILED
    assert "not empty" in res.message.lower()
    assert tree(r) == before


def test_remove_missing_is_changed(root: Root) -> None:
    assert root.apply(m.Remove("nope", None)).status == m.CHANGED


def test_rename_moves_and_reports_entry(root: Root, space: Path) -> None:
    r = space / "root"
    (r / "d").mkdir()
    (r / "d" / "f").write_bytes(b"x")
    res = root.apply(m.Rename("d", "e", expect_of(r / "d")))
    assert res.status == m.OK, res.message
    assert res.entry is not None and res.entry.path == "e" and res.entry.kind == m.DIR
    assert tree(r) == {"e": "dir", "e/f": "file:x"}
    # The cache was released: the old name is really gone.
    assert root.apply(m.PutFile("d/g", b"y", 0o644, MTIME, None)).status == m.CHANGED


def test_rename_refuses_existing_dest(root: Root, space: Path) -> None:
    r = space / "root"
    (r / "a").write_bytes(b"a")
    (r / "b").write_bytes(b"b")
    res = root.apply(m.Rename("a", "b", None))
    assert res.status == m.CHANGED
    assert tree(r) == {"a": "file:a", "b": "file:b"}


def test_set_meta_changes_exec_bit_and_mtime(root: Root, space: Path) -> None:
    f = space / "root" / "run.sh"
    f.write_bytes(b"echo")
    os.chmod(f, 0o644)
    res = root.apply(m.SetMeta("run.sh", 0o755, MTIME, expect_of(f)))
    assert res.status == m.OK, res.message
    st = os.stat(f)
    assert stat.S_IMODE(st.st_mode) == 0o755
    assert st.st_mtime_ns == MTIME
    assert res.entry is not None and res.entry.mode == 0o755


def test_set_meta_on_directory_keeps_mtime_when_zero(root: Root, space: Path) -> None:
    d = space / "root" / "d"
    d.mkdir()
    before = os.stat(d).st_mtime_ns
    assert root.apply(m.SetMeta("d", 0o711, 0, None)).status == m.OK
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o711
    assert os.stat(d).st_mtime_ns == before


def test_copy_aside_file(root: Root, space: Path) -> None:
    f = space / "root" / "b.txt"
    f.write_bytes(b"loser")
    os.chmod(f, 0o750)
    os.utime(f, ns=(MTIME, MTIME))
    dest = "b.syncd-conflict-local-20240101T000000Z.txt"
    res = root.apply(m.CopyAside("b.txt", dest, expect_of(f)))
    assert res.status == m.OK, res.message
    copy = space / "root" / dest
    assert copy.read_bytes() == b"loser" and f.read_bytes() == b"loser"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o750
    assert copy.stat().st_mtime_ns == MTIME
    assert res.entry is not None and res.entry.path == dest
    assert temps(space) == []


def test_copy_aside_symlink_and_existing_dest(root: Root, space: Path) -> None:
    r = space / "root"
    os.symlink("target", r / "l")
    assert root.apply(m.CopyAside("l", "l.copy", None)).status == m.OK
    assert os.readlink(r / "l.copy") == "target"
    assert root.apply(m.CopyAside("l", "l.copy", None)).status == m.CHANGED


def test_make_link_and_replace_link(root: Root, space: Path) -> None:
    r = space / "root"
    res = root.apply(m.MakeLink("l", "../some/where", m.Expect(m.ABSENT)))
    assert res.status == m.OK, res.message
    assert os.readlink(r / "l") == "../some/where"
    assert res.entry is not None and res.entry.kind == m.SYMLINK and res.entry.target == "../some/where"
    assert root.apply(m.MakeLink("l", "elsewhere", expect_of(r / "l"))).status == m.OK
    assert os.readlink(r / "l") == "elsewhere"
    assert temps(space) == []


def test_make_dir_new_and_existing(root: Root, space: Path) -> None:
    d = space / "root" / "d"
    assert root.apply(m.MakeDir("d", 0o750, None)).status == m.OK
    assert stat.S_IMODE(d.stat().st_mode) == 0o750
    (d / "keep").write_bytes(b"k")
    res = root.apply(m.MakeDir("d", 0o755, None))
    assert res.status == m.OK, res.message
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    assert (d / "keep").read_bytes() == b"k"


def test_make_dir_over_file_is_changed(root: Root, space: Path) -> None:
    (space / "root" / "d").write_bytes(b"f")
    assert root.apply(m.MakeDir("d", 0o755, None)).status == m.CHANGED
    assert (space / "root" / "d").read_bytes() == b"f"


# ---- blobs ----------------------------------------------------------------------------------------


def test_blob_stream_and_commit(root: Root, space: Path) -> None:
    r = space / "root"
    (r / "d").mkdir()
    root.start_blob(5, "d/big")
    assert len(temps(space)) == 1
    chunks = [os.urandom(1000) for _ in range(5)]
    for chunk in chunks:
        root.blob_data(5, chunk)
    assert not (r / "d" / "big").exists()  # nothing visible before the commit
    res = root.apply(m.PutBlob("d/big", 5, 0o640, MTIME, m.Expect(m.ABSENT)))
    assert res.status == m.OK, res.message
    assert (r / "d" / "big").read_bytes() == b"".join(chunks)
    assert stat.S_IMODE((r / "d" / "big").stat().st_mode) == 0o640
    assert (r / "d" / "big").stat().st_mtime_ns == MTIME
    assert temps(space) == []
    # A committed blob is gone.
    assert root.apply(m.PutBlob("d/big", 5, 0o640, MTIME, None)).status == m.FAILED


def test_drop_blob_leaves_no_temp(root: Root, space: Path) -> None:
    root.start_blob(1, "f")
    root.blob_data(1, b"partial")
    assert root.apply(m.DropBlob("f", 1)).status == m.OK
    assert tree(space / "root") == {}
    assert root.apply(m.DropBlob("f", 1)).status == m.OK  # idempotent


def test_blob_commit_with_stale_expect_leaves_no_temp(root: Root, space: Path) -> None:
    f = space / "root" / "f"
    f.write_bytes(b"mine")
    root.start_blob(1, "f")
    root.blob_data(1, b"theirs")
    assert root.apply(m.PutBlob("f", 1, 0o644, MTIME, m.Expect(m.ABSENT))).status == m.CHANGED
    assert f.read_bytes() == b"mine"
    assert temps(space) == []


def test_blob_commit_after_parent_became_symlink_leaves_no_temp(root: Root, space: Path) -> None:
    r = space / "root"
    (r / "d").mkdir()
    root.start_blob(1, "d/f")
    root.blob_data(1, b"data")
    root.release()
    os.rename(r / "d", r / "d-old")
    os.symlink(str(space / "outside"), r / "d")
    res = root.apply(m.PutBlob("d/f", 1, 0o644, MTIME, None))
    assert res.status == m.UNSAFE
    assert temps(space) == []
    assert sorted(os.listdir(space / "outside")) == ["secret"]


def test_blob_commit_after_parent_moved_is_changed(root: Root, space: Path) -> None:
    r = space / "root"
    (r / "d").mkdir()
    root.start_blob(1, "d/f")
    root.blob_data(1, b"data")
    root.release()
    os.rename(r / "d", r / "d-old")
    (r / "d").mkdir()
    res = root.apply(m.PutBlob("d/f", 1, 0o644, MTIME, None))
    assert res.status == m.CHANGED
    assert temps(space) == []
    assert tree(r) == {"d": "dir", "d-old": "dir"}


def test_close_drops_pending_blobs(space: Path) -> None:
    r = Root(str(space / "root"))
    r.start_blob(1, "f")
    r.blob_data(1, b"x")
    r.close()
    assert tree(space / "root") == {}


# ---- read_file --------------------------------------------------------------------------------------


def test_read_file_yields_chunks_then_entry(root: Root, space: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import syncd.fsops as fsops

    monkeypatch.setattr(fsops, "CHUNK", 4)
    data = b"0123456789"
    f = space / "root" / "f"
    f.write_bytes(data)
    os.chmod(f, 0o751)
    parts = list(read_file(root, "f"))
    assert [p[0] for p in parts[:-1]] == [b"0123", b"4567", b"89"]
    assert all(p[1] is None and p[2] == "" for p in parts[:-1])
    last_data, entry, error = parts[-1]
    assert last_data == b"" and error == ""
    assert entry is not None
    assert entry.digest == digest_bytes(data)
    assert (entry.path, entry.kind, entry.size, entry.mode) == ("f", m.FILE, 10, 0o751)
    assert entry.ino == f.stat().st_ino and entry.mtime_ns == f.stat().st_mtime_ns


def test_read_file_empty(root: Root, space: Path) -> None:
    (space / "root" / "e").write_bytes(b"")
    parts = list(read_file(root, "e"))
    assert len(parts) == 1
    assert parts[0][1] is not None and parts[0][1].digest == digest_bytes(b"")


@pytest.mark.parametrize("setup,path", [
    ("missing", "nope"),
    ("dir", "d"),
    ("link", "l"),
    ("escape", "../outside/secret"),
    ("through-link", "ld/secret"),
])
def test_read_file_errors(root: Root, space: Path, setup: str, path: str) -> None:
    r = space / "root"
    (r / "d").mkdir()
    os.symlink(str(space / "outside" / "secret"), r / "l")
    os.symlink(str(space / "outside"), r / "ld")
    parts = list(read_file(root, path))
    assert len(parts) == 1
    data, entry, error = parts[0]
    assert data == b"" and entry is None and error
