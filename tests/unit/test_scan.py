"""syncd.scan.Scanner on real temporary directories."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import syncd.scan as scan
from syncd.protocol import messages as m
from syncd.rules import Rules, load_root_rules
from syncd.scan import TEMP_PREFIX, DigestCache, Scanner, digest_bytes, is_ignore_file


class CountingDigest:
    """Wraps scan.file_digest and records which files were read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        self._real = scan.file_digest
        monkeypatch.setattr(scan, "file_digest", self)

    def __call__(self, path: str) -> tuple[bytes, os.stat_result]:
        self.calls.append(path)
        return self._real(path)


def by_path(entries: list[m.Entry]) -> dict[str, m.Entry]:
    paths = [e.path for e in entries]
    assert len(paths) == len(set(paths)), "duplicate entries"
    return {e.path: e for e in entries}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    (r / "src").mkdir()
    (r / "src" / "main.py").write_bytes(b"print('hi')\n")
    (r / "src" / "run.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(r / "src" / "run.sh", 0o755)
    (r / "empty").mkdir()
    (r / "node_modules" / "pkg").mkdir(parents=True)
    (r / "node_modules" / "pkg" / "index.js").write_bytes(b"x")
    (r / "build.o").write_bytes(b"obj")
    (r / (TEMP_PREFIX + "1-2-main.py")).write_bytes(b"half")
    (r / "src" / (TEMP_PREFIX + "3-4-x")).write_bytes(b"half")
    os.symlink("src/main.py", r / "link")
    os.symlink("/nonexistent/target", r / "dangling")
    os.mkfifo(r / "fifo")
    return r


def make_scanner(root: Path, cache: DigestCache | None = None) -> Scanner:
    rules = Rules(ignore=["node_modules/", "*.o"])
    return Scanner(str(root), rules.is_ignored, cache)


def test_scan_all(root: Path) -> None:
    s = make_scanner(root)
    found = by_path(s.scan_all())
    assert set(found) == {"src", "src/main.py", "src/run.sh", "empty", "link", "dangling"}
    main = found["src/main.py"]
    st = os.lstat(root / "src" / "main.py")
    assert (main.kind, main.size, main.mtime_ns, main.ino) == (m.FILE, st.st_size, st.st_mtime_ns, st.st_ino)
    assert main.digest == digest_bytes(b"print('hi')\n")
    assert main.target is None
    assert found["src/run.sh"].mode == 0o755
    assert found["empty"].kind == m.DIR and found["empty"].digest is None
    assert found["link"].kind == m.SYMLINK and found["link"].target == "src/main.py"
    assert found["link"].digest is None
    assert found["dangling"].target == "/nonexistent/target"
    assert [p for p, _ in s.skipped] == ["fifo"]


def test_scan_all_does_not_descend_ignored_dirs(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    rules = Rules(ignore=["node_modules/"])

    def is_ignored(rel: str, is_dir: bool) -> bool:
        asked.append(rel)
        return rules.is_ignored(rel, is_dir)

    Scanner(str(root), is_ignored).scan_all()
    assert "node_modules" in asked
    assert not any(p.startswith("node_modules/") for p in asked)


def test_symlinked_dir_is_not_followed(tmp_path: Path) -> None:
    r = tmp_path / "root"
    r.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"s")
    os.symlink(str(tmp_path / "outside"), r / "ld")
    found = by_path(Scanner(str(r)).scan_all())
    assert set(found) == {"ld"}
    assert found["ld"].kind == m.SYMLINK


def test_hash_files_false_leaves_digests_empty(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingDigest(monkeypatch)
    found = by_path(make_scanner(root).scan_all(hash_files=False))
    assert counter.calls == []
    assert found["src/main.py"].digest is None


def test_digest_cache_second_scan_hashes_nothing(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingDigest(monkeypatch)
    s = make_scanner(root)
    first = by_path(s.scan_all())
    assert len(counter.calls) == 2  # main.py and run.sh
    assert len(s.cache) == 2
    counter.calls.clear()
    second = by_path(s.scan_all())
    assert counter.calls == []
    assert second == first


def test_changing_a_file_rehashes_only_it(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingDigest(monkeypatch)
    s = make_scanner(root)
    s.scan_all()
    counter.calls.clear()
    f = root / "src" / "main.py"
    f.write_bytes(b"print('changed')\n")
    found = by_path(s.scan_all())
    assert counter.calls == [str(root) + "/src/main.py"]
    assert found["src/main.py"].digest == digest_bytes(b"print('changed')\n")


def test_same_size_and_mtime_but_new_inode_rehashes(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingDigest(monkeypatch)
    s = make_scanner(root)
    s.scan_all()
    f = root / "src" / "main.py"
    st = f.stat()
    tmp = root / "src" / "new"
    tmp.write_bytes(b"print('yo')\n")  # same size
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(tmp, f)
    counter.calls.clear()
    found = by_path(s.scan_all())
    assert counter.calls == [str(root) + "/src/main.py"]
    assert found["src/main.py"].digest == digest_bytes(b"print('yo')\n")


def test_shared_cache_between_scanners(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = DigestCache()
    make_scanner(root, cache).scan_all()
    counter = CountingDigest(monkeypatch)
    make_scanner(root, cache).scan_paths(["src/main.py"], recursive=False)
    assert counter.calls == []


def test_file_changing_while_hashed_is_not_cached(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A digest of content that changed during the read must not stick to the new stat."""
    real = scan.file_digest
    f = root / "src" / "main.py"

    def racing(path: str) -> tuple[bytes, os.stat_result]:
        digest, _ = real(path)  # digest of the old content
        with open(path, "ab") as fh:  # the writer appends meanwhile
            fh.write(b"# more\n")
        return digest, os.stat(path)

    monkeypatch.setattr(scan, "file_digest", racing)
    s = make_scanner(root)
    s.scan_paths(["src/main.py"], recursive=False)
    monkeypatch.setattr(scan, "file_digest", real)
    (entry,), _ = s.scan_paths(["src/main.py"], recursive=False)
    assert entry.digest == digest_bytes(f.read_bytes())


def test_scan_paths_entries_and_absent(root: Path) -> None:
    s = make_scanner(root)
    entries, absent = s.scan_paths(["src/main.py", "gone", "src/gone", "link"], recursive=False)
    assert set(by_path(entries)) == {"src/main.py", "link"}
    assert sorted(absent) == ["gone", "src/gone"]


def test_scan_paths_under_symlinked_dir_is_absent(tmp_path: Path) -> None:
    r = tmp_path / "root"
    r.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"s")
    os.symlink(str(tmp_path / "outside"), r / "ld")
    (r / "file").write_bytes(b"f")
    entries, absent = Scanner(str(r)).scan_paths(["ld/secret", "file/x", "ld"], recursive=True)
    assert [e.path for e in entries] == ["ld"]
    assert sorted(absent) == ["file/x", "ld/secret"]


def test_scan_paths_recursive(root: Path) -> None:
    s = make_scanner(root)
    entries, absent = s.scan_paths(["src", "src/main.py"], recursive=True)
    assert set(by_path(entries)) == {"src", "src/main.py", "src/run.sh"}
    assert absent == []
    shallow, _ = s.scan_paths(["src"], recursive=False)
    assert [e.path for e in shallow] == ["src"]


def test_scan_paths_skips_ignored_temp_and_special(root: Path) -> None:
    s = make_scanner(root)
    entries, absent = s.scan_paths(
        ["node_modules", "build.o", TEMP_PREFIX + "1-2-main.py", "fifo"], recursive=True
    )
    assert entries == []
    assert absent == ["fifo"]  # a FIFO is not synced: to the engine it is absent
    assert [p for p, _ in s.skipped] == ["fifo"]


def test_non_utf8_names(tmp_path: Path) -> None:
    r = tmp_path / "root"
    r.mkdir()
    raw_dir = os.fsencode(str(r)) + b"/d\xff"
    os.mkdir(raw_dir)
    fd = os.open(raw_dir + b"/caf\xe9.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"bonjour")
    os.close(fd)
    s = Scanner(str(r))
    found = by_path(s.scan_all())
    assert {os.fsencode(p) for p in found} == {b"d\xff", b"d\xff/caf\xe9.txt"}
    name = os.fsdecode(b"d\xff/caf\xe9.txt")
    assert found[name].digest == digest_bytes(b"bonjour")
    entries, absent = s.scan_paths([name, os.fsdecode(b"d\xff/missing\xfe")], recursive=False)
    assert [e.path for e in entries] == [name]
    assert [os.fsencode(p) for p in absent] == [b"d\xff/missing\xfe"]


def test_unreadable_file_is_described_without_a_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """There but unreadable: listed without a digest (the daemon leaves it as the base
    says), never left out (which would read as a deletion). The tests run as root, which
    reads everything: the refusal is simulated."""
    r = tmp_path / "root"
    r.mkdir()
    (r / "secret").write_bytes(b"s")

    def refuse(path: str) -> object:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(scan, "file_digest", refuse)
    s = Scanner(str(r))
    [entry] = s.scan_all()
    assert (entry.path, entry.kind, entry.size, entry.digest) == ("secret", m.FILE, 1, None)
    assert [p for p, _ in s.skipped] == ["secret"]
    entries, absent = s.scan_paths(["secret"], recursive=False)
    assert [e.path for e in entries] == ["secret"] and absent == []


def test_gitignore_files_are_reported(root: Path) -> None:
    (root / ".gitignore").write_text("*.log\n")
    (root / "src" / ".gitignore").write_text("gen/\n")
    seen: list[tuple[str, str, str]] = []
    Scanner(str(root), on_gitignore=lambda d, n, t: seen.append((d, n, t))).scan_all()
    assert sorted(seen) == [("", ".gitignore", "*.log\n"), ("src", ".gitignore", "gen/\n")]


def test_ignore_files_inside_git_directories_are_not_read(root: Path) -> None:
    """git reads no .gitignore inside a .git directory (the repository's own or a nested
    one's), and neither does load_root_rules: the scanner's readers agree with it."""
    (root / ".git" / "hooks").mkdir(parents=True)
    (root / ".git" / "hooks" / ".gitignore").write_text("*\n")
    (root / ".git" / "hooks" / "pre-commit").write_text("#!/bin/sh\n")
    (root / "sub" / ".git" / "x").mkdir(parents=True)
    (root / "sub" / ".git" / "x" / ".gitignore").write_text("*\n")
    (root / "sub" / ".git" / "x" / "object").write_text("data\n")
    (root / "src" / ".gitignore").write_text("gen/\n")
    rules = Rules([], [])
    seen: list[tuple[str, str]] = []

    def read(rel_dir: str, name: str, text: str) -> None:
        seen.append((rel_dir, name))
        rules.ignore_file_read(rel_dir, name, text)

    paths = {e.path for e in Scanner(str(root), rules.is_ignored, on_gitignore=read).scan_all()}
    assert seen == [("src", ".gitignore")]
    assert {".git/hooks/pre-commit", "sub/.git/x/object"} <= paths
    reference = load_root_rules(str(root))
    for rel in (".git/hooks/pre-commit", "sub/.git/x/object"):
        assert not reference.is_ignored(rel, False) and not rules.is_ignored(rel, False)


@pytest.mark.parametrize(("rel", "expected"), [
    (".gitignore", True), ("src/.gitignore", True), (".git/info/exclude", True),
    (".git/hooks/.gitignore", False), ("sub/.git/x/.gitignore", False), ("sub/.git/.gitignore", False),
    ("a.git/.gitignore", True), (".github/.gitignore", True), ("src/gitignore", False),
    ("sub/.git/info/exclude", False),
])
def test_which_files_hold_ignore_rules(rel: str, expected: bool) -> None:
    assert is_ignore_file(rel) is expected


def test_modes_are_permission_bits_only(root: Path) -> None:
    found = by_path(make_scanner(root).scan_all())
    for entry in found.values():
        assert entry.mode == stat.S_IMODE(entry.mode)
