"""End-to-end: the real ``syncd run`` against a real OpenSSH server on 127.0.0.1.

Each test has its own local, remote and state directories; the remote root is a plain
directory on this machine reached through sshd, so the tests look at it directly.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.helpers import (
    DIR,
    FILE,
    LINK,
    SyncProcess,
    bpath,
    bytes_digest,
    start_session,
    tree_snapshot,
    wait_trees_equal,
    wait_until,
    write_file,
)
from tests.sshd import SshServer

NON_UTF8 = b"caf\xe9-\xff\xfe.txt"  # latin-1 bytes: not decodable as UTF-8
NON_UTF8_DIR = b"d\xe8j\xe0"


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    local, remote, state = tmp_path / "local", tmp_path / "remote", tmp_path / "state"
    local.mkdir()
    remote.mkdir()
    return local, remote, state


@pytest.fixture
def sessions() -> Iterator[list[SyncProcess]]:
    """Sessions started by a test; any still running at teardown is killed."""
    started: list[SyncProcess] = []
    yield started
    for session in started:
        session.kill()


def _make_tree(root: Path, files: int = 3000) -> None:
    """A tree of *files* files in nested directories plus the awkward cases."""
    rng = random.Random(1234)
    count = 0
    for top in range(10):
        for sub in range(10):
            d = root / f"pkg{top:02d}" / f"mod{sub:02d}"
            if sub % 3 == 0:
                d = d / "deeper" / "still"
            d.mkdir(parents=True)
            for i in range(files // 100 - (1 if (top, sub) == (0, 0) else 0)):
                size = rng.choice((0, 1, 17, 300, 1000, 4096, 9000))
                (d / f"file{i:03d}.txt").write_bytes(rng.randbytes(size) if size else b"")
                count += 1
    # Empty directories, nested and not.
    (root / "empty").mkdir()
    (root / "pkg03" / "hollow" / "inner").mkdir(parents=True)
    # A symlink (relative, to a file that exists) and a dangling one.
    os.symlink("pkg00/mod01/file000.txt", root / "link-to-file")
    os.symlink("does/not/exist", root / "pkg01" / "dangling")
    # An executable file.
    write_file(root / "bin" / "run.sh", "#!/bin/sh\necho hi\n", mode=0o755)
    count += 1
    # Names that are not UTF-8, made with bytes paths (directories with such names are
    # created live below: see test_local_watcher_survives_non_utf8_names).
    write_file(bpath(root, NON_UTF8), b"latin-1 name\n")
    write_file(bpath(root, "pkg05", b"inner\xa0file"), b"nested latin-1\n")
    count += 2
    # One 5 MB file (above the inline limit: it streams as a blob).
    write_file(root / "data" / "five-mb.bin", rng.randbytes(5 * 1024 * 1024))
    count += 1
    assert count >= 3000


def _change_lines_for(session: SyncProcess, needle: str) -> list[str]:
    return [line for line in session.change_lines() if needle in line]


def test_initial_push_then_live_changes(sshd: SshServer, dirs: tuple[Path, Path, Path],
                                         sessions: list[SyncProcess]) -> None:
    local, remote, state = dirs
    _make_tree(local)
    before = tree_snapshot(local, mtimes=True)
    assert sum(1 for v in before.values() if v[0] == FILE) >= 3000

    session = start_session(sshd, local, remote, state)
    sessions.append(session)
    snap = wait_trees_equal(local, remote, session, timeout=45, mtimes=True, what="initial push")
    assert snap == before  # the push did not touch the local side
    # The remote was empty: the tree went as one stream, not entry by entry.
    assert [line.split(":")[0] for line in session.change_lines()] == ["-> first sync"], session.stdout()
    # Spot checks of the awkward cases on the remote itself.
    assert os.path.islink(remote / "link-to-file")
    assert os.readlink(remote / "link-to-file") == "pkg00/mod01/file000.txt"
    assert os.readlink(remote / "pkg01" / "dangling") == "does/not/exist"
    assert os.stat(remote / "bin" / "run.sh").st_mode & 0o111 == 0o111
    assert os.listdir(remote / "empty") == []
    assert os.path.exists(bpath(remote, NON_UTF8))
    assert os.path.getsize(remote / "data" / "five-mb.bin") == 5 * 1024 * 1024

    def step(what: str) -> None:
        wait_trees_equal(local, remote, session, timeout=15, mtimes=True, what=what)

    # Live changes, one at a time, each followed by waiting for the remote to match.
    write_file(local / "live" / "new.txt", "created live\n")
    step("create file")
    assert (remote / "live" / "new.txt").read_text() == "created live\n"

    write_file(local / "pkg00" / "mod01" / "file001.txt", "modified live\n")
    step("modify file")
    assert (remote / "pkg00" / "mod01" / "file001.txt").read_text() == "modified live\n"

    os.unlink(local / "pkg00" / "mod01" / "file002.txt")
    step("delete file")
    assert not (remote / "pkg00" / "mod01" / "file002.txt").exists()

    os.rename(local / "pkg00" / "mod01" / "file004.txt", local / "pkg00" / "renamed.txt")
    step("rename file")

    os.rename(local / "pkg02" / "mod01", local / "pkg09" / "moved-dir")
    step("rename directory with contents")
    assert len(os.listdir(remote / "pkg09" / "moved-dir")) == 30
    assert not (remote / "pkg02" / "mod01").exists()

    (local / "fresh-empty").mkdir()
    step("mkdir empty dir")
    assert (remote / "fresh-empty").is_dir()

    (local / "empty").rmdir()
    step("rmdir")
    assert not (remote / "empty").exists()

    os.chmod(local / "pkg00" / "mod01" / "file005.txt", 0o755)
    step("chmod +x")
    assert os.stat(remote / "pkg00" / "mod01" / "file005.txt").st_mode & 0o777 == 0o755

    os.symlink("../pkg00/renamed.txt", local / "live" / "new-link")
    step("create symlink")
    assert os.readlink(remote / "live" / "new-link") == "../pkg00/renamed.txt"

    write_file(bpath(local, b"live", b"\xe9t\xe9-\x80.bin"), b"\x00\x01 not utf-8 name\n")
    step("non-UTF-8 name")
    assert os.path.isfile(bpath(remote, b"live", b"\xe9t\xe9-\x80.bin"))

    write_file(bpath(local, NON_UTF8_DIR, b"inner\xa0file"), b"nested latin-1\n")
    step("non-UTF-8 directory with a file")
    assert os.path.isfile(bpath(remote, NON_UTF8_DIR, b"inner\xa0file"))

    # Renames travel as renames: the file and the directory were moved, not re-sent.
    moves = [line for line in session.change_lines() if " move " in line]
    assert any("file004.txt -> pkg00/renamed.txt" in line for line in moves), session.stdout()
    assert any("pkg02/mod01 -> pkg09/moved-dir" in line for line in moves), session.stdout()
    assert not _change_lines_for(session, "moved-dir/"), "moved files were re-sent:\n" + session.stdout()

    session.stop()


def test_large_file_never_half_written(sshd: SshServer, dirs: tuple[Path, Path, Path],
                                       sessions: list[SyncProcess]) -> None:
    """A 64 MB file written slowly is never visible half-written on the remote.

    The writer appends in chunks to ``big.part`` (which syncs on its own meanwhile) and
    renames it to ``big.bin`` when complete, as editors and build tools do. Sound
    assertions, checked continuously while it happens:

    - ``big.bin`` on the remote is always either absent or the complete final content
      (locally that path never held anything else);
    - every version of ``big.part`` seen on the remote is a prefix of the final content
      (locally it only ever grew, so any state it passed through is a prefix).
    """
    local, remote, state = dirs
    size = 64 * 1024 * 1024
    chunk = 3 * 1024 * 1024 + 12345  # deliberately not a multiple of syncd's 1 MiB blocks
    content = random.Random(99).randbytes(size)
    final_digest = bytes_digest(content)

    session = start_session(sshd, local, remote, state)
    sessions.append(session)
    write_file(local / "ready.txt", "x")
    wait_until(lambda: (remote / "ready.txt").exists(), 20, session=session, message="session up")

    seen_final: list[int] = []
    seen_part: set[tuple[int, int, int]] = set()
    problems: list[str] = []

    def check_remote() -> None:
        final = remote / "big.bin"
        try:
            fd = os.open(final, os.O_RDONLY)
        except FileNotFoundError:
            pass
        else:
            with os.fdopen(fd, "rb") as fh:
                data = fh.read()
            if len(data) != size or bytes_digest(data) != final_digest:
                problems.append(f"remote big.bin seen with {len(data)} bytes that are not the final content")
            seen_final.append(len(data))
        part = remote / "big.part"
        try:
            fd = os.open(part, os.O_RDONLY)
        except FileNotFoundError:
            return
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            if key in seen_part:
                return
            seen_part.add(key)
            data = fh.read()
        if data != content[: len(data)]:
            problems.append(f"remote big.part seen with {len(data)} bytes that are no prefix of the content")

    with open(local / "big.part", "wb") as fh:
        for start in range(0, size, chunk):
            fh.write(content[start : start + chunk])
            fh.flush()
            check_remote()
            time.sleep(0.05)
    check_remote()
    os.rename(local / "big.part", local / "big.bin")

    def arrived() -> bool:
        check_remote()
        return bool(seen_final) and not (remote / "big.part").exists()

    wait_until(arrived, 40, session=session, message="big.bin on the remote, big.part gone")
    assert not problems, problems
    wait_trees_equal(local, remote, session, timeout=20, mtimes=True, what="after the big file")
    session.stop()


def test_remote_changes_flow_back(sshd: SshServer, dirs: tuple[Path, Path, Path],
                                  sessions: list[SyncProcess]) -> None:
    """Two-way (the default): changes made on the remote side appear locally."""
    local, remote, state = dirs
    write_file(local / "shared.txt", "v1\n")
    write_file(local / "dir" / "a.txt", "a\n")
    write_file(local / "dir" / "b.txt", "b\n")
    write_file(remote / "remote-only.txt", "was on the remote first\n")
    session = start_session(sshd, local, remote, state)
    sessions.append(session)
    wait_trees_equal(local, remote, session, timeout=30, mtimes=True, what="initial two-way sync")
    assert (local / "remote-only.txt").read_text() == "was on the remote first\n"

    def step(what: str) -> None:
        wait_trees_equal(local, remote, session, timeout=15, mtimes=True, what=what)

    write_file(remote / "from-remote.txt", "made by the agent\n")
    step("remote create")
    assert (local / "from-remote.txt").read_text() == "made by the agent\n"

    write_file(remote / "shared.txt", "v2 from remote\n")
    step("remote modify")
    assert (local / "shared.txt").read_text() == "v2 from remote\n"

    os.unlink(remote / "remote-only.txt")
    step("remote delete")
    assert not (local / "remote-only.txt").exists()

    os.rename(remote / "dir", remote / "dir-renamed")
    step("remote directory rename")
    assert sorted(os.listdir(local / "dir-renamed")) == ["a.txt", "b.txt"]

    (remote / "remote-empty").mkdir()
    step("remote mkdir")
    os.chmod(remote / "from-remote.txt", 0o700)
    step("remote chmod")
    assert os.stat(local / "from-remote.txt").st_mode & 0o777 == 0o700
    os.symlink("shared.txt", remote / "remote-link")
    step("remote symlink")
    assert os.readlink(local / "remote-link") == "shared.txt"
    write_file(bpath(remote, b"r\xe9mote-\xff"), b"bytes name from the remote\n")
    step("remote non-UTF-8 name")
    assert os.path.isfile(bpath(local, b"r\xe9mote-\xff"))
    shutil.rmtree(remote / "dir-renamed")
    step("remote rm -r")
    assert not (local / "dir-renamed").exists()

    # And local edits still go out in the same session.
    write_file(local / "back.txt", "local again\n")
    step("local create after remote changes")
    arrows = {line[:2] for line in session.change_lines()}
    assert arrows == {"->", "<-"}, session.stdout()
    session.stop()


def test_first_sync_stream_keeps_ignored_remote_entries_then_only_live_changes_travel(
        sshd: SshServer, dirs: tuple[Path, Path, Path], sessions: list[SyncProcess]) -> None:
    local, remote, state = dirs
    for i in range(500):
        write_file(local / f"d{i % 9}" / f"f{i}.txt", f"content {i}\n" * (i % 4))
    write_file(local / "build" / "out.o", b"local build output")
    # Only ignored entries on the remote: it counts as empty, and they stay.
    write_file(remote / "build" / "cache.bin", b"remote build cache")
    session = start_session(sshd, local, remote, state, "--ignore", "build/")
    sessions.append(session)
    wait_until(lambda: "-> first sync: " in session.stdout(), 30, session=session, message="the first sync stream")
    assert (remote / "build" / "cache.bin").read_bytes() == b"remote build cache"
    assert not (remote / "build" / "out.o").exists()
    assert not (local / "build" / "cache.bin").exists()
    assert (remote / "d4" / "f13.txt").read_text() == "content 13\n"
    time.sleep(1.0)  # the cycle after the stream finds nothing to send or fetch
    assert [line.split(":")[0] for line in session.change_lines()] == ["-> first sync"], session.stdout()
    write_file(local / "d0" / "live.txt", "live\n")
    write_file(remote / "from-remote.txt", "remote\n")
    wait_until(lambda: (remote / "d0" / "live.txt").exists() and (local / "from-remote.txt").exists(), 15,
               session=session, message="live changes after the first sync")
    session.stop()
    assert len(session.change_lines()) == 3, session.stdout()


def test_first_sync_into_an_empty_local_root_pulls_the_remote_tree_as_one_stream(
        sshd: SshServer, dirs: tuple[Path, Path, Path], sessions: list[SyncProcess]) -> None:
    local, remote, state = dirs
    for i in range(400):
        write_file(remote / f"r{i % 7}" / f"f{i}.txt", f"remote {i}\n" * (1 + i % 3))
    os.symlink("r0/f0.txt", remote / "link")
    write_file(remote / "bin" / "tool", "#!/bin/sh\n", mode=0o755)
    write_file(bpath(remote, NON_UTF8), b"latin-1 name\n")
    write_file(remote / "cache" / "big.bin", b"remote only")  # ignored: stays remote
    write_file(local / "cache" / "mine.bin", b"local only")  # ignored: the local root counts as empty
    session = start_session(sshd, local, remote, state, "--ignore", "cache/")
    sessions.append(session)
    wait_until(lambda: "<- first sync: " in session.stdout(), 30, session=session, message="the first sync stream")
    assert not (local / "cache" / "big.bin").exists() and not (remote / "cache" / "mine.bin").exists()
    (local / "cache" / "mine.bin").unlink()
    (remote / "cache" / "big.bin").unlink()
    wait_trees_equal(local, remote, session, timeout=15, mtimes=True, what="the pulled tree")
    assert os.readlink(local / "link") == "r0/f0.txt"
    assert os.stat(local / "bin" / "tool").st_mode & 0o111 == 0o111
    time.sleep(1.0)  # the cycle after the stream finds nothing to send or fetch
    assert [line.split(":")[0] for line in session.change_lines()] == ["<- first sync"], session.stdout()
    write_file(local / "r0" / "live.txt", "live\n")
    wait_trees_equal(local, remote, session, timeout=15, what="a live change after the pull")
    session.stop()


def test_a_first_sync_stopped_mid_stream_leaves_the_remote_empty_and_streams_again_next_start(
        sshd: SshServer, dirs: tuple[Path, Path, Path], sessions: list[SyncProcess]) -> None:
    local, remote, state = dirs
    for i in range(1000):
        write_file(local / f"d{i % 10}" / f"f{i}.txt", f"file {i}\n")
    write_file(local / "big.bin", os.urandom(160 * 1024 * 1024))
    first = start_session(sshd, local, remote, state, name="first")
    sessions.append(first)
    # The agent stages the stream inside the remote root before anything is put in place.
    wait_until(lambda: any(name.startswith(".syncd-tmp-") for name in os.listdir(remote)), 30, interval=0.002,
               session=first, message="the stream to start arriving")
    first.stop()  # exits 0: stopping mid-stream is not an error
    assert "first sync:" not in first.stdout(), "the stream completed before the stop: make the tree bigger"
    wait_until(lambda: os.listdir(remote) == [], 15, message="the remote root to be empty again")
    second = start_session(sshd, local, remote, state, name="second")
    sessions.append(second)
    wait_trees_equal(local, remote, second, timeout=60, what="the first sync after a stopped one")
    second.stop()
    assert [line.split(":")[0] for line in second.change_lines()] == ["-> first sync"], second.stdout()


def test_local_edits_made_while_the_first_sync_streams_reach_the_remote(
        sshd: SshServer, dirs: tuple[Path, Path, Path], sessions: list[SyncProcess]) -> None:
    """The local watcher is armed only after the first sync's stream: the full scan that
    follows the stream must still find what changed while it ran."""
    local, remote, state = dirs
    for i in range(300):  # "a/..." is archived before "big.bin", "z/..." after it
        write_file(local / ("a" if i % 2 else "z") / f"f{i}.txt", f"file {i}\n")
    write_file(local / "big.bin", os.urandom(160 * 1024 * 1024))
    session = start_session(sshd, local, remote, state)
    sessions.append(session)
    wait_until(lambda: any(name.startswith(".syncd-tmp-") for name in os.listdir(remote)), 30, interval=0.002,
               session=session, message="the stream to start arriving")
    for side, edited, deleted in (("a", 1, 3), ("z", 0, 2)):
        write_file(local / side / f"f{edited}.txt", "edited while streaming\n")
        write_file(local / side / "new.txt", "made while streaming\n")
        (local / side / f"f{deleted}.txt").unlink()
    wait_until(lambda: "-> first sync: " in session.stdout(), 60, session=session, message="the first sync stream")
    assert "first sync: 305 entries" not in session.stdout(), "the stream ended before the edits: make big.bin bigger"
    wait_trees_equal(local, remote, session, timeout=20, what="edits made during the first sync's stream")
    session.stop()


def test_first_sync_into_a_remote_that_holds_files_goes_entry_by_entry(
        sshd: SshServer, dirs: tuple[Path, Path, Path], sessions: list[SyncProcess]) -> None:
    local, remote, state = dirs
    for i in range(20):
        write_file(local / f"f{i}.txt", f"local {i}\n")
    write_file(remote / "theirs.txt", "remote\n")
    session = start_session(sshd, local, remote, state)
    sessions.append(session)
    wait_trees_equal(local, remote, session, timeout=20, what="first sync into a remote that holds a file")
    session.stop()
    lines = session.change_lines()
    assert not [line for line in lines if "first sync" in line], session.stdout()
    assert len([line for line in lines if line.startswith("->")]) == 20, session.stdout()
    assert (local / "theirs.txt").read_text() == "remote\n"


def test_restart_sends_nothing(sshd: SshServer, dirs: tuple[Path, Path, Path],
                               sessions: list[SyncProcess]) -> None:
    local, remote, state = dirs
    for i in range(200):
        write_file(local / f"d{i % 7}" / f"f{i}.txt", f"content {i}\n" * (i % 5))
    (local / "empty-dir").mkdir()
    os.symlink("d0/f0.txt", local / "ln")
    first = start_session(sshd, local, remote, state, name="first")
    sessions.append(first)
    wait_trees_equal(local, remote, first, timeout=30, mtimes=True, what="initial sync to an empty remote")
    # The tree is in place before the agent's answer reaches the daemon, which then reports.
    wait_until(lambda: "-> first sync: " in first.stdout(), 30, session=first, message="the first sync's report")
    first.stop()
    # An empty remote receives the tree as one stream.
    assert [line.split(":")[0] for line in first.change_lines()] == ["-> first sync"], first.stdout()
    assert "-> first sync: 209 entries" in first.stdout(), first.stdout()
    assert not [line for line in first.change_lines() if line.startswith("<-")], first.stdout()
    remote_before = tree_snapshot(remote, mtimes=True)

    second = start_session(sshd, local, remote, state, name="second")
    sessions.append(second)
    # Connected once the agent reports its python; the first full cycle follows.
    wait_until(lambda: "agent on python" in second.stderr(), 20, session=second, message="agent started")
    time.sleep(1.0)  # room for a (wrong) re-send to show up
    assert second.change_lines() == [], "the restart re-sent or fetched entries:\n" + second.stdout()
    assert tree_snapshot(remote, mtimes=True) == remote_before
    # It still syncs afterwards, in both directions.
    write_file(local / "after-restart.txt", "new\n")
    wait_until(lambda: (remote / "after-restart.txt").exists(), 15, session=second,
               message="a new local file after the restart")
    write_file(remote / "remote-after-restart.txt", "new remote\n")
    wait_trees_equal(local, remote, second, timeout=15, mtimes=True, what="sync after restart")
    second.stop()
    lines = second.change_lines()
    assert [line for line in lines if line.startswith("->")] == [
        line for line in lines if line.startswith("->") and "after-restart.txt" in line
    ], second.stdout()
    assert len(lines) == 2, second.stdout()


def test_ignore_rules(sshd: SshServer, dirs: tuple[Path, Path, Path], sessions: list[SyncProcess]) -> None:
    """--ignore 'build/' and a .gitignore '*.log': ignored paths are neither sent nor deleted."""
    local, remote, state = dirs
    write_file(local / ".gitignore", "*.log\n")
    write_file(local / "src" / "main.py", "print('hi')\n")
    write_file(local / "src" / "debug.log", "local log\n")
    write_file(local / "app.log", "local app log\n")
    write_file(local / "build" / "out.o", b"\x7fELF local")
    write_file(local / "sub" / "build" / "nested.o", b"nested build dir")
    # Ignored files that exist only on the remote must survive.
    write_file(remote / "build" / "cache.bin", b"remote build cache")
    write_file(remote / "old.log", "remote log\n")
    write_file(remote / "src" / "remote-trace.log", "remote trace\n")
    remote_ignored = {
        "build/cache.bin": b"remote build cache",
        "old.log": b"remote log\n",
        "src/remote-trace.log": b"remote trace\n",
    }

    session = start_session(sshd, local, remote, state, "--ignore", "build/")
    sessions.append(session)

    def synced() -> bool:
        return (remote / "src" / "main.py").exists() and (remote / ".gitignore").exists()

    wait_until(synced, 30, session=session, message="non-ignored files on the remote")

    def check() -> None:
        assert not (remote / "app.log").exists()
        assert not (remote / "src" / "debug.log").exists()
        assert not (remote / "build" / "out.o").exists()
        assert not (remote / "sub" / "build").exists()
        for rel, data in remote_ignored.items():
            assert (remote / rel).read_bytes() == data, rel
            assert not (local / rel).exists(), f"ignored remote file {rel} was pulled"
        assert (local / "app.log").read_text() == "local app log\n"
        assert (local / "build" / "out.o").exists()

    # Live: new ignored files, then a synced one as a marker that a cycle ran.
    write_file(local / "build" / "later.o", b"later")
    write_file(local / "src" / "later.log", "later log\n")
    write_file(local / "src" / "marker.txt", "marker\n")
    wait_until(lambda: (remote / "src" / "marker.txt").exists(), 15, session=session, message="marker")
    check()
    assert not (remote / "build" / "later.o").exists()
    assert not (remote / "src" / "later.log").exists()
    # Deleting a directory that holds ignored entries on the other side keeps them.
    shutil.rmtree(local / "src")
    wait_until(lambda: not (remote / "src" / "main.py").exists(), 15, session=session,
               message="src/main.py deleted on the remote")
    time.sleep(0.5)
    assert (remote / "src" / "remote-trace.log").read_bytes() == b"remote trace\n"
    assert not _unexpected(session), session.stdout()
    session.stop()
    for line in session.change_lines():
        assert ".log" not in line and "build/" not in line, session.stdout()


def _unexpected(session: SyncProcess) -> list[str]:
    return [line for line in session.stdout_lines() if line.startswith("!!")]


def test_local_watcher_survives_non_utf8_names(sshd: SshServer, dirs: tuple[Path, Path, Path],
                                               sessions: list[SyncProcess]) -> None:
    local, remote, state = dirs
    write_file(local / "start.txt", "x")
    session = start_session(sshd, local, remote, state)
    sessions.append(session)
    wait_trees_equal(local, remote, session, timeout=20, what="initial sync")
    write_file(bpath(local, NON_UTF8_DIR, NON_UTF8), b"bytes names\n")
    wait_trees_equal(local, remote, session, timeout=15, what="non-UTF-8 directory and file")
    # Changes after that still arrive at watcher speed (well under the 2 s rescan period).
    for i in range(3):
        start = time.monotonic()
        write_file(local / f"after-{i}.txt", "after\n")
        target = remote / f"after-{i}.txt"
        wait_until(target.exists, 15, session=session, message=str(target))
        elapsed = time.monotonic() - start
        assert elapsed < 1.0, f"a local change took {elapsed:.2f} s to arrive"
    session.stop()
    assert "local watcher failed" not in session.stderr(), session.stderr()


def test_new_directories_with_files_sync_without_errors(sshd: SshServer, dirs: tuple[Path, Path, Path],
                                                        sessions: list[SyncProcess]) -> None:
    local, remote, state = dirs
    session = start_session(sshd, local, remote, state)
    sessions.append(session)
    wait_until(lambda: "agent on python" in session.stderr(), 20, session=session, message="agent started")
    # Written live (a first sync would send it in its stream).
    write_file(local / "data" / "big.bin", os.urandom(1024 * 1024))  # above the inline limit
    wait_trees_equal(local, remote, session, timeout=20, what="push of a new directory with a large file")
    write_file(remote / "newdir" / "sub" / "f.txt", "pulled\n")
    write_file(remote / "newdir" / "g.txt", "pulled\n")
    wait_trees_equal(local, remote, session, timeout=15, what="pull of new directories")
    session.stop()
    errors = [line for line in session.stdout_lines() if line.startswith("!!")]
    assert not errors, session.stdout()
    # Each file travelled exactly once.
    for name in ("data/big.bin", "newdir/sub/f.txt", "newdir/g.txt"):
        assert len([line for line in session.change_lines() if line.endswith(name) or f"{name} (" in line]) == 1, (
            session.stdout()
        )


def test_snapshot_helper_sees_kinds(tmp_path: Path) -> None:
    """tree_snapshot itself: kinds, modes, digests, link targets, bytes names."""
    write_file(tmp_path / "a" / "f", "x", mode=0o640)
    os.symlink("a/f", tmp_path / "l")
    write_file(bpath(tmp_path, b"\xff"), b"y")
    snap = tree_snapshot(tmp_path)
    assert snap["a"][0] == DIR
    assert snap["a/f"] == (FILE, 0o640, bytes_digest(b"x"))
    assert snap["l"] == (LINK, 0o777, "a/f")
    assert snap[os.fsdecode(b"\xff")][2] == bytes_digest(b"y")
