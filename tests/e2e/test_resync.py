"""End-to-end: `syncd resync NAME --push|--pull` through a real daemon, the real CLI and a
real OpenSSH sshd in front of the remote root.

One daemon serves the module (each test has sessions of its own); the tests that kill the
daemon start one of their own. A session is brought up live, then paused, and only then
are its two trees given their different contents: what the resync does is then the only
thing that changes them. The remote root is a plain directory on this machine, so the tests
look at it (and edit it, to play the remote side) directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Optional, Union

import pytest

from syncd.control.client import RemoteError
from syncd.scan import digest_bytes
from tests.e2e.daemon_util import CLI, DaemonProc, base_env, describe, ok_json, wait_until
from tests.sshd import SshServer

EXIT_ERROR = 1
TEMP_PREFIX = ".syncd-tmp-"
SUMMARY_FIELDS = {"name", "direction", "files", "bytes", "seconds", "deleted", "skipped", "direct"}
LIVE = "watching"
MB = 1 << 20

Snap = dict[str, tuple[Any, ...]]


# ---------------------------------------------------------------------------------------
# fixtures and session helpers
# ---------------------------------------------------------------------------------------


# Every pull here goes direct where it can, however small its tree (see resync.pull).
DIRECT_PULLS = {"SYNCD_DIRECT_PULL_BYTES": "0"}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    proc = DaemonProc(tmp_path_factory.mktemp("resync-daemon"), env=DIRECT_PULLS)
    proc.start()
    yield proc
    status = proc.stop()
    assert status == 0, f"the daemon exited with {status} on SIGTERM:\n{proc.log()}"
    assert "Traceback" not in proc.log(), proc.log()


def spec_for(server: SshServer, local: Path, remote: Path, ignore: Iterable[str] = (),
             preserve: Iterable[str] = ()) -> dict[str, Any]:
    return {"local": str(local), "remote": server.url(remote), "identity": str(server.client_key),
            "known_hosts": str(server.known_hosts), "ignore": list(ignore), "preserve_absent": list(preserve)}


def status(daemon: DaemonProc, name: str) -> dict[str, Any]:
    row = daemon.rpc("status", {"name": name})[0]
    assert isinstance(row, dict)
    return row


def wait_state(daemon: DaemonProc, name: str, state: str, timeout: float = 30.0) -> dict[str, Any]:
    last: list[dict[str, Any]] = [{}]

    def reached() -> bool:
        last[0] = status(daemon, name)
        return bool(last[0]["state"] == state)

    wait_until(reached, timeout, message=lambda: f"{name} to be {state}; status: {last[0]}\n{daemon.log()[-3000:]}")
    return last[0]


def pause(daemon: DaemonProc, name: str) -> None:
    """Pause and wait until the session is really gone (its counters are folded into the
    runner's totals and its cycle count reads 0), so nothing syncs behind the test's back."""
    daemon.rpc("pause", {"name": name})
    wait_until(lambda: (row := status(daemon, name))["state"] == "paused" and row["cycles"] == 0, 20,
               message=f"{name} to stop")


def add_session(daemon: DaemonProc, server: SshServer, base: Path, name: str, *, ignore: Iterable[str] = (),
                preserve: Iterable[str] = (), paused: bool = True) -> tuple[Path, Path]:
    """A session on two fresh empty roots, brought up live once (so the remote root and the
    agent exist), then paused unless told otherwise."""
    local, remote = base / f"{name}-local", base / f"{name}-remote"
    local.mkdir(parents=True)
    remote.mkdir(parents=True)
    daemon.rpc("add", {"name": name, "spec": spec_for(server, local, remote, ignore, preserve)})
    wait_state(daemon, name, LIVE)
    if paused:
        pause(daemon, name)
    return local, remote


def add_directed(daemon: DaemonProc, server: SshServer, base: Path, name: str,
                 direction: str) -> tuple[Path, Path, Path, Path]:
    """add_session, also naming its roots by role: (local, remote, source, destination)."""
    local, remote = add_session(daemon, server, base, name)
    return (local, remote, local, remote) if direction == "push" else (local, remote, remote, local)


def remove_session(daemon: DaemonProc, name: str) -> None:
    with contextlib.suppress(Exception):
        daemon.rpc("rm", {"name": name})


def resync(daemon: DaemonProc, name: str, direction: str, cli: bool = False) -> dict[str, Any]:
    """A resync through the real CLI (``cli``: its JSON output is the summary) or, where the
    CLI is not what is tested, through the control socket (same request, no CLI start-up)."""
    if cli:
        summary = ok_json(daemon.cli("resync", name, f"--{direction}", "--json"))
    else:
        summary = daemon.rpc("resync", {"name": name, "direction": direction, "timeout": 120.0}, timeout=130.0)
    assert isinstance(summary, dict)
    assert set(summary) == SUMMARY_FIELDS, summary
    assert summary["name"] == name and summary["direction"] == direction, summary
    # The stream skips the session channel: between syncd's archiving or extracting child
    # and the remote's GNU tar, through OpenSSH (all on this machine); a pull of a tree the
    # base says is small only where the daemon was told to (DIRECT_PULLS).
    if direction == "push" or daemon.extra_env.get("SYNCD_DIRECT_PULL_BYTES") == "0":
        assert summary["direct"] is True, summary
    return summary


def flush(daemon: DaemonProc, name: str, cli: bool = False) -> dict[str, Any]:
    """A flush barrier; returns the session's status afterwards."""
    if cli:
        row = ok_json(daemon.cli("flush", name, "--json"))
    else:
        row = daemon.rpc("flush", {"name": name, "timeout": 60.0}, timeout=70.0)
    assert isinstance(row, dict)
    return row


def resync_background(daemon: DaemonProc, name: str, direction: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*CLI, "resync", name, f"--{direction}", "--json", "--socket", str(daemon.socket)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base_env(),
                            stdin=subprocess.DEVNULL)


def finish(proc: subprocess.Popen[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def counters(row: dict[str, Any]) -> tuple[int, int]:
    return row["sent_files"], row["received_files"]


def skips(summary: dict[str, Any], reason: Optional[str] = None) -> dict[str, str]:
    """{path: reason} of the summary's skipped entries (only ``reason`` ones if given)."""
    for skip in summary["skipped"]:
        assert set(skip) == {"path", "reason", "detail"}, skip
        assert skip["detail"], skip
    return {s["path"]: s["reason"] for s in summary["skipped"] if reason is None or s["reason"] == reason}


# ---------------------------------------------------------------------------------------
# trees
# ---------------------------------------------------------------------------------------

PathLike = Union[str, bytes, Path]


def write(path: PathLike, data: Union[bytes, str], mode: Optional[int] = None,
          mtime_ns: Optional[int] = None) -> None:
    raw = os.fsencode(path)
    os.makedirs(os.path.dirname(raw), exist_ok=True)
    with open(raw, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        os.chmod(raw, mode)
    if mtime_ns is not None:
        os.utime(raw, ns=(mtime_ns, mtime_ns))


def read(path: PathLike) -> bytes:
    with open(os.fsencode(path), "rb") as fh:
        return fh.read()


def temp_names(root: Path) -> list[str]:
    """syncd temp files and staging directories anywhere under ``root``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            if name.startswith(TEMP_PREFIX.encode()):
                found.append(os.fsdecode(os.path.join(dirpath, name)))
    return found


def snapshot(root: Path, skip: Callable[[str], bool] = lambda rel: False) -> Snap:
    """``{rel: (kind, perm, sha256 or link target, mtime_ns)}`` of every entry (symlinks
    never followed; directories with their mtimes too). ``skip(rel)`` leaves an entry (and
    what is under it) out; syncd's temp names are always left out."""
    out: Snap = {}
    base = os.fsencode(root)
    stack = [b""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(base, rel_dir) if rel_dir else base) as it:
            for item in it:
                rel_b = os.path.join(rel_dir, item.name) if rel_dir else item.name
                rel = os.fsdecode(rel_b)
                if item.name.startswith(TEMP_PREFIX.encode()) or skip(rel):
                    continue
                st = item.stat(follow_symlinks=False)
                perm = stat.S_IMODE(st.st_mode)
                if stat.S_ISDIR(st.st_mode):
                    out[rel] = ("dir", perm, None, st.st_mtime_ns)
                    stack.append(rel_b)
                elif stat.S_ISLNK(st.st_mode):
                    out[rel] = ("link", None, os.fsdecode(os.readlink(item.path)), st.st_mtime_ns)
                elif stat.S_ISREG(st.st_mode):
                    out[rel] = ("file", perm, hashlib.sha256(read(item.path)).hexdigest(), st.st_mtime_ns)
                else:
                    out[rel] = ("special", perm, None, None)
    return out


def diff(a: Snap, b: Snap, names: tuple[str, str] = ("local", "remote")) -> str:
    lines = [f"  {k!r}: {names[0]}={a.get(k)} {names[1]}={b.get(k)}"
             for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return f"{len(lines)} difference(s):\n" + "\n".join(lines[:40])


def assert_same(a: Snap, b: Snap, names: tuple[str, str] = ("local", "remote")) -> None:
    assert a == b, diff(a, b, names)


def ignored_by_default(rel: str, extra: Iterable[str] = ("node_modules",)) -> bool:
    """What the sessions here ignore: their ``--ignore`` names and AppleDouble files."""
    parts = rel.split("/")
    return parts[-1].startswith("._") or any(p in extra for p in parts)


LONG_DIR = "l" * 60 + "/" + "m" * 60
LONG_PATH = LONG_DIR + "/" + "n" * 120 + ".txt"  # > 100 bytes: beyond ustar's name field
OLD_MTIME = 1_600_000_000_123_456_789


def make_rich_tree(root: Path, tag: str) -> None:
    """Everything a resync must carry exactly: contents, exec bits, nanosecond mtimes,
    symlinks (to a file, to a dir, dangling), empty dirs, names that are not UTF-8, long
    paths and hard links."""
    write(root / "src/main.py", f"print('{tag}')\n")
    write(root / "src/lib/util.py", f"# util {tag}\n" * 50)
    write(root / "bin/run.sh", f"#!/bin/sh\necho {tag}\n", mode=0o755)
    write(root / "docs/readme.md", f"readme {tag}\n", mode=0o640, mtime_ns=OLD_MTIME)
    write(root / "same-path.txt", f"{tag} version\n", mode=0o600)
    write(root / "big.bin", os.urandom(3 * MB + 17))
    os.symlink("src/main.py", root / "link-to-file")
    os.symlink("src", root / "link-to-dir")
    os.symlink("does/not/exist", root / "dangling")
    (root / "empty").mkdir()
    (root / "nested/empty/deeper").mkdir(parents=True)
    write(os.path.join(os.fsencode(root), b"caf\xe9.txt"), b"latin-1 name\n")
    write(os.path.join(os.fsencode(root), b"d\xff", b"n\xfe.bin"), b"undecodable dir and name\n")
    write(root / LONG_PATH, f"long path {tag}\n")
    write(root / "hard/a", f"hard-linked {tag}\n", mode=0o644)
    os.link(root / "hard/a", root / "hard/b")
    write(root / LONG_DIR / "hard-a", f"hard-linked under a long name {tag}\n")  # a link name > 100 bytes
    os.link(root / LONG_DIR / "hard-a", root / LONG_DIR / "hard-b")
    os.symlink("t" * 150, root / "long-target")  # a link target > 100 bytes
    write(root / "kind-swap", "a file here\n")
    write(root / "dir-swap/inner.txt", "a dir here\n")
    os.utime(root / "docs", ns=(OLD_MTIME, OLD_MTIME))
    os.utime(root / "nested/empty", ns=(OLD_MTIME + 1, OLD_MTIME + 1))
    os.utime(root / "link-to-file", ns=(OLD_MTIME + 2, OLD_MTIME + 2), follow_symlinks=False)


def unique_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root``, each inode once."""
    seen: dict[tuple[int, int], int] = {}
    for dirpath, _, filenames in os.walk(os.fsencode(root)):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def make_big_files(root: Path, count: int, size_mb: int) -> None:
    block = os.urandom(MB)
    for i in range(count):
        with open(root / f"big{i}.bin", "wb") as fh:
            fh.write(str(i).encode())
            for _ in range(size_mb):
                fh.write(block)


def shrink_big_files(root: Path) -> None:
    for i in range(BIG_FILES):
        write(root / f"big{i}.bin", f"small now {i}\n")


def staging_with_data(root: Path, pattern: str) -> Optional[re.Match[str]]:
    """The staging directory (``pattern`` matched against its name) once it holds a file
    with some bytes in it: the stream is flowing."""
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(root):
            found = re.fullmatch(pattern, name)
            if found is None:
                continue
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(root / name):
                    if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_size > 0:
                        return found
    return None


# ---------------------------------------------------------------------------------------
# 1. push
# ---------------------------------------------------------------------------------------


def test_push_makes_the_remote_identical_and_keeps_its_ignored_entries(
        daemon: DaemonProc, sshd: SshServer, tmp_path: Path) -> None:
    name = "push-rich"
    local, remote = add_session(daemon, sshd, tmp_path, name, ignore=["node_modules"])
    try:
        make_rich_tree(local, "local")
        # The remote: other contents, entries the local lacks, kinds swapped, ignored entries.
        write(remote / "src/main.py", "old main\n", mode=0o755)
        write(remote / "same-path.txt", "remote version, longer than the local one\n", mode=0o644)
        write(remote / "extra.txt", "only on the remote\n")
        write(remote / "extra-dir/a/b.txt", "deep remote-only\n")
        write(remote / "hard/a", "not linked\n")
        write(remote / "kind-swap/x.txt", "the remote has a directory where the local has a file\n")
        write(remote / "dir-swap", "the remote has a file where the local has a directory\n")
        write(remote / "link-to-dir/real.txt", "the remote has a real directory here\n")
        outside = tmp_path / "outside"
        write(outside / "bystander.txt", "reached only through a remote symlink\n")
        os.symlink(outside, remote / "docs")  # the remote has a symlink where the local has a directory
        write(remote / "node_modules/pkg/index.js", "ignored top level\n")
        write(remote / "src/node_modules/x.js", "ignored, nested in a synced directory\n")
        write(remote / "._remote-apple", "AppleDouble: excluded by default\n")
        ignored_before = {rel: v for rel, v in snapshot(remote).items() if ignored_by_default(rel)}
        before = status(daemon, name)

        summary = resync(daemon, name, "push", cli=True)

        local_snap = snapshot(local)
        assert summary["skipped"] == [], summary
        assert summary["files"] == len(local_snap), summary
        assert summary["bytes"] == unique_bytes(local), summary
        # extra.txt, extra-dir/a/b.txt, extra-dir/a, extra-dir, kind-swap/x.txt, link-to-dir/real.txt
        assert summary["deleted"] >= 6, summary
        assert temp_names(remote) == []

        # Synced part: identical (contents, modes, mtimes, links as links, empty dirs, odd names).
        assert_same(local_snap, snapshot(remote, ignored_by_default))
        assert os.path.islink(remote / "link-to-dir") and os.path.islink(remote / "dangling")
        assert read(os.path.join(os.fsencode(remote), b"d\xff", b"n\xfe.bin")) == b"undecodable dir and name\n"
        assert read(remote / LONG_PATH) == b"long path local\n"
        for x, y in (("hard/a", "hard/b"), (f"{LONG_DIR}/hard-a", f"{LONG_DIR}/hard-b")):
            a, b = os.stat(remote / x), os.stat(remote / y)
            assert (a.st_ino, a.st_nlink) == (b.st_ino, 2), f"the hard link {y} was not kept as one"
        # Ignored entries stay as they were; nothing was written through the replaced symlink.
        assert {rel: v for rel, v in snapshot(remote).items() if ignored_by_default(rel)} == ignored_before
        assert os.listdir(outside) == ["bystander.txt"]

        # Live again, and nothing left to do: the base index is what both sides hold.
        assert wait_state(daemon, name, LIVE)["halt_reason"] == ""
        flushed = flush(daemon, name, cli=True)
        assert counters(flushed) == counters(before), (before, flushed)
        assert counters(status(daemon, name)) == counters(before)
        assert_same(local_snap, snapshot(local))
    finally:
        remove_session(daemon, name)


def test_push_keeps_a_remote_directory_holding_ignored_entries_and_makes_it_locally(
        daemon: DaemonProc, sshd: SshServer, tmp_path: Path) -> None:
    """A remote directory the local side lacks but which holds ignored entries stays; the
    resync makes it (empty) locally too, so both sides agree and the live sync has nothing
    to undo."""
    name = "push-kept-dir"
    local, remote = add_session(daemon, sshd, tmp_path, name, ignore=["node_modules"])
    try:
        write(local / "kept.txt", "local\n")
        write(remote / "gone/file.txt", "deleted by the push\n")
        write(remote / "gone/node_modules/keep.js", "ignored, in a directory the local lacks\n")
        before = status(daemon, name)

        summary = resync(daemon, name, "push")
        assert summary["skipped"] == [] and summary["deleted"] >= 1, summary
        # The directory stays on the remote: it holds an ignored entry.
        assert sorted(os.listdir(remote / "gone")) == ["node_modules"]
        assert read(remote / "gone/node_modules/keep.js") == b"ignored, in a directory the local lacks\n"
        assert (local / "gone").is_dir() and os.listdir(local / "gone") == []

        flushed = flush(daemon, name)
        assert counters(flushed) == counters(before), (before, flushed)
        assert os.listdir(local / "gone") == [] and (remote / "gone/node_modules/keep.js").exists()
    finally:
        remove_session(daemon, name)


def test_push_reports_a_remote_directory_it_cannot_replace_as_kept(
        daemon: DaemonProc, sshd: SshServer, tmp_path: Path) -> None:
    name = "push-kept"
    local, remote = add_session(daemon, sshd, tmp_path, name, ignore=["node_modules"])
    try:
        write(local / "thing", "a file locally\n")
        write(local / "other.txt", "other\n")
        write(remote / "thing/synced.txt", "goes\n")
        write(remote / "thing/node_modules/x.js", "ignored: keeps the directory\n")

        summary = resync(daemon, name, "push")

        assert skips(summary) == {"thing": "kept"}, summary
        assert read(remote / "other.txt") == b"other\n"
        assert sorted(os.listdir(remote / "thing")) == ["node_modules"]
        assert read(remote / "thing/node_modules/x.js") == b"ignored: keeps the directory\n"
        # Not checked here: what the live sync does next with a file on one side and a
        # directory on the other that the base index does not know (today: a conflict).
    finally:
        remove_session(daemon, name)


# ---------------------------------------------------------------------------------------
# 2. pull
# ---------------------------------------------------------------------------------------


def test_pull_makes_the_local_identical_and_keeps_its_ignored_entries(
        daemon: DaemonProc, sshd: SshServer, tmp_path: Path) -> None:
    name = "pull-rich"
    local, remote = add_session(daemon, sshd, tmp_path, name, ignore=["node_modules"])
    try:
        make_rich_tree(remote, "remote")
        write(remote / "._remote-apple", "AppleDouble: never sent\n")
        write(remote / "sub/._nested-apple", "AppleDouble: never sent\n")
        write(remote / "node_modules/remote.js", "ignored: never sent\n")
        # The local: other contents, extra entries, swapped kinds, ignored entries to keep.
        write(local / "bin/run.sh", "stale local script\n", mode=0o700)
        write(local / "local-only.txt", "deleted by the pull\n")
        write(local / "local-dir/x/y.txt", "deleted by the pull\n")
        write(local / "kind-swap/x.txt", "a directory where the remote has a file\n")
        write(local / "dir-swap", "a file where the remote has a directory\n")
        write(local / "node_modules/local.js", "ignored: kept\n")
        write(local / "._local-apple", "AppleDouble: ignored, kept\n")
        outside = tmp_path / "outside"
        write(outside / "main.py", "reached only through a local symlink\n")
        os.symlink(outside, local / "src")  # a symlink where the remote has a directory
        ignored_before = {rel: v for rel, v in snapshot(local).items() if ignored_by_default(rel)}
        before = status(daemon, name)

        summary = resync(daemon, name, "pull", cli=True)

        remote_snap = snapshot(remote, ignored_by_default)
        assert summary["skipped"] == [], summary
        assert summary["files"] == len(remote_snap), summary
        assert summary["bytes"] == unique_bytes(remote) - sum(
            len(read(remote / p)) for p in ("._remote-apple", "sub/._nested-apple", "node_modules/remote.js")), summary
        assert summary["deleted"] >= 6, summary
        assert temp_names(local) == []

        assert_same(snapshot(local, ignored_by_default), remote_snap)
        assert not os.path.lexists(local / "._remote-apple") and not os.path.lexists(local / "sub/._nested-apple")
        assert not os.path.lexists(local / "node_modules/remote.js")
        assert os.listdir(outside) == ["main.py"]
        assert read(outside / "main.py") == b"reached only through a local symlink\n"
        assert {rel: v for rel, v in snapshot(local).items() if ignored_by_default(rel)} == ignored_before
        for x, y in (("hard/a", "hard/b"), (f"{LONG_DIR}/hard-a", f"{LONG_DIR}/hard-b")):
            a, b = os.stat(local / x), os.stat(local / y)
            assert (a.st_ino, a.st_nlink) == (b.st_ino, 2), f"the hard link {y} was not kept as one"

        wait_state(daemon, name, LIVE)
        flushed = flush(daemon, name, cli=True)
        assert counters(flushed) == counters(before), (before, flushed)
        assert_same(snapshot(local, ignored_by_default), snapshot(remote, ignored_by_default))
    finally:
        remove_session(daemon, name)


def test_pull_keeps_preserve_absent_entries_and_the_directories_holding_them(
        daemon: DaemonProc, sshd: SshServer, tmp_path: Path) -> None:
    name = "pull-preserve"
    local, remote = add_session(daemon, sshd, tmp_path, name, ignore=["node_modules"],
                                preserve=["secrets/", "*.env"])
    try:
        write(remote / "shared.env", "remote's shared.env\n")  # present on both: the remote's wins
        write(remote / "code/app.py", "app\n")
        write(local / "shared.env", "local's shared.env\n")
        write(local / "secrets/token", "preserved through its directory\n")
        write(local / "secrets/sub/deeper.txt", "preserved through its directory\n")
        write(local / "deep/a/b/local.env", "preserved by name\n")
        write(local / "deep/a/other.txt", "deleted by the pull\n")
        write(local / "deep/c/x.txt", "deleted by the pull\n")
        write(local / "plain.txt", "deleted by the pull\n")
        write(local / "old/node_modules/deep.js", "ignored: kept, and so is old/\n")
        write(local / "old/stale.txt", "deleted by the pull\n")
        preserved = {rel: v for rel, v in snapshot(local).items()
                     if rel.startswith("secrets") or (rel.endswith(".env") and rel != "shared.env")}

        summary = resync(daemon, name, "pull")

        assert summary["skipped"] == [], summary
        # deep/a/other.txt, deep/c/x.txt, deep/c, plain.txt, old/stale.txt
        assert summary["deleted"] >= 5, summary
        now = snapshot(local)
        assert {rel: v for rel, v in now.items() if rel in preserved} == preserved
        assert read(local / "shared.env") == b"remote's shared.env\n"
        assert read(local / "code/app.py") == b"app\n"
        for gone in ("deep/a/other.txt", "deep/c", "plain.txt"):
            assert not os.path.lexists(local / gone), gone
        # What remains of deep/ is exactly the chain of directories holding the preserved file.
        assert sorted(rel for rel in now if rel.startswith("deep")) == ["deep", "deep/a", "deep/a/b",
                                                                       "deep/a/b/local.env"]
        # Ignored entries stay too, and so does the directory holding them.
        assert sorted(rel for rel in now if rel.startswith("old")) == ["old", "old/node_modules",
                                                                      "old/node_modules/deep.js"]
        # The live sync afterwards leaves the preserved local-only entries local: only the
        # directories that hold them (deep/, deep/a/b/, old/) are made on the remote by the
        # resync, so both sides agree and a flush moves nothing.
        before = status(daemon, name)
        flushed = flush(daemon, name)
        assert counters(flushed) == counters(before), (before, flushed)
        remote_now = snapshot(remote)
        assert not any(rel.startswith("secrets") or rel.endswith("local.env") for rel in remote_now), remote_now
        assert {"deep", "deep/a", "deep/a/b", "old"} <= set(remote_now), remote_now
        assert os.listdir(remote / "deep/a/b") == [] and os.listdir(remote / "old") == []
        # A later local edit of a preserved file is a new change: it is sent.
        write(local / "deep/a/b/local.env", "edited after the pull\n")
        flush(daemon, name)
        assert read(remote / "deep/a/b/local.env") == b"edited after the pull\n"
    finally:
        remove_session(daemon, name)


# ---------------------------------------------------------------------------------------
# 3. back to live syncing; a halt lifted
# ---------------------------------------------------------------------------------------


def test_resync_goes_back_to_live_sync_and_lifts_a_halt(daemon: DaemonProc, sshd: SshServer, tmp_path: Path) -> None:
    name = "live-after"
    local, remote = add_session(daemon, sshd, tmp_path, name, paused=False)
    try:
        for i in range(30):
            write(local / f"d{i % 3}/f{i:02d}.txt", f"file {i}\n")
        write(local / "top.txt", "top\n")
        flush(daemon, name)

        resync(daemon, name, "push")  # of a live session: it stops, is rebuilt, and goes on
        wait_state(daemon, name, LIVE)
        write(local / "top.txt", "edited locally after the resync\n")
        write(remote / "from-remote.txt", "made remotely after the resync\n")
        wait_until(lambda: (remote / "top.txt").read_text() == "edited locally after the resync\n", 20,
                   message="a local edit to reach the remote")
        wait_until(lambda: (local / "from-remote.txt").exists(), 20, message="a remote edit to reach the local")

        # Empty the remote root under the live session: it halts instead of deleting locally.
        trash = tmp_path / "trash"
        trash.mkdir()
        for child in sorted(remote.iterdir()):
            os.rename(child, trash / child.name)
        halted = wait_state(daemon, name, "halted")
        assert halted["halt_reason"], halted
        assert (local / "top.txt").exists()

        summary = resync(daemon, name, "push")
        assert summary["skipped"] == [], summary
        row = wait_state(daemon, name, LIVE)
        assert row["halt_reason"] == "", row
        assert_same(snapshot(local), snapshot(remote))
        write(remote / "after-halt.txt", "synced again\n")
        wait_until(lambda: (local / "after-halt.txt").exists(), 20, message="live sync after the halt was lifted")
    finally:
        remove_session(daemon, name)


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_an_empty_source_is_refused_unless_forced(daemon: DaemonProc, sshd: SshServer, tmp_path: Path,
                                                  direction: str) -> None:
    """A vanished or emptied sandbox must not wipe the other side by a resync by mistake."""
    name = f"empty-{direction}"
    local, remote = add_session(daemon, sshd, tmp_path, name)
    destination = remote if direction == "push" else local
    try:
        for i in range(5):
            write(destination / f"work/f{i}.txt", f"precious {i}\n")
        before = snapshot(destination)
        done = daemon.cli("resync", name, f"--{direction}", "--json")
        assert done.returncode == EXIT_ERROR, describe(done)
        assert "empty" in done.stderr and "--force" in done.stderr, describe(done)
        assert snapshot(destination) == before
        assert status(daemon, name)["state"] == "paused"

        forced = ok_json(daemon.cli("resync", name, f"--{direction}", "--force", "--json"))
        assert forced["deleted"] == 6, forced
        assert snapshot(destination) == {}
        wait_state(daemon, name, LIVE)
    finally:
        remove_session(daemon, name)


# ---------------------------------------------------------------------------------------
# 4. interrupted resyncs leave the destination as it was
# ---------------------------------------------------------------------------------------

BIG_FILES, BIG_MB = 3, 40  # enough to be caught mid-stream


def _prepare_interrupted(daemon: DaemonProc, server: SshServer, base: Path, name: str,
                         source: str) -> tuple[Path, Path]:
    local, remote = add_session(daemon, server, base, name)
    src, dst = (local, remote) if source == "local" else (remote, local)
    make_big_files(src, BIG_FILES, BIG_MB)
    write(src / "small/new.txt", "new\n")
    write(dst / "big1.bin", "the destination's own version\n")
    write(dst / "small/old.txt", "only on the destination\n")
    write(dst / "keep/nested.txt", "only on the destination\n", mode=0o600)
    return local, remote


def test_push_cut_by_killing_the_agent_leaves_the_remote_as_it_was(
        daemon: DaemonProc, sshd: SshServer, tmp_path: Path) -> None:
    name = "push-kill-agent"
    local, remote = _prepare_interrupted(daemon, sshd, tmp_path, name, "local")
    try:
        remote_before = snapshot(remote)
        running = resync_background(daemon, name, "push")
        found = wait_until(lambda: staging_with_data(remote, rf"{re.escape(TEMP_PREFIX)}(\d+)-tar-\d+"), 30,
                           message="the push to stream into the remote staging directory")
        progress = status(daemon, name)["resync"]
        assert isinstance(progress, dict), progress
        assert progress["direction"] == "push" and progress["phase"] == "streaming", progress
        assert progress["total_bytes"] >= BIG_FILES * BIG_MB * MB, progress
        with pytest.raises(RemoteError, match="already running"):
            daemon.rpc("resync", {"name": name, "direction": "pull"})
        os.kill(int(found.group(1)), signal.SIGKILL)  # the agent dies mid-stream

        result = finish(running)
        assert result.returncode == EXIT_ERROR, describe(result)
        assert "resync" in result.stderr and "Traceback" not in result.stderr, describe(result)
        row = wait_state(daemon, name, "paused")
        assert row["resync"] is None, row
        assert_same(remote_before, snapshot(remote), ("before", "after"))

        assert len(temp_names(remote)) == 1  # the dead agent's staging directory, until a scan

        # The next session start reaps it, and a new push works (lighter: the data did its part).
        shrink_big_files(local)
        summary = resync(daemon, name, "push")
        assert summary["skipped"] == [], summary
        assert temp_names(remote) == []
        assert_same(snapshot(local), snapshot(remote))
    finally:
        remove_session(daemon, name)


def test_pull_cut_by_killing_the_daemon_leaves_the_local_as_it_was(sshd: SshServer, tmp_path: Path) -> None:
    own = DaemonProc(tmp_path / "own-daemon")
    (tmp_path / "own-daemon").mkdir()
    own.start()
    name = "pull-kill-daemon"
    try:
        local, remote = _prepare_interrupted(own, sshd, tmp_path, name, "remote")
        local_before, remote_before = snapshot(local), snapshot(remote)
        assert own.proc is not None
        staging = rf"{re.escape(TEMP_PREFIX)}{own.proc.pid}-resync"
        running = resync_background(own, name, "pull")
        wait_until(lambda: staging_with_data(local, staging), 30,
                   message="the pull to stream into the local staging directory")
        progress = status(own, name)["resync"]
        assert progress["direction"] == "pull" and progress["phase"] == "streaming", progress
        own.kill()
        result = finish(running)
        assert result.returncode != 0, describe(result)

        assert_same(local_before, snapshot(local), ("before", "after"))
        assert_same(remote_before, snapshot(remote), ("before", "after"))
        assert len(temp_names(local)) == 1  # the dead daemon's staging directory, until a scan

        shrink_big_files(remote)
        own.start()  # the session comes back (paused, as it was before the resync)
        assert status(own, name)["state"] == "paused"
        summary = resync(own, name, "pull")
        assert summary["skipped"] == [], summary
        assert temp_names(local) == [], "the dead daemon's staging directory was not reaped"
        assert_same(snapshot(local), snapshot(remote))
    finally:
        own.stop()


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_a_resync_cut_by_a_pause_leaves_the_destination_as_it_was(
        daemon: DaemonProc, sshd: SshServer, tmp_path: Path, direction: str) -> None:
    name = f"{direction}-pause"
    local, remote = _prepare_interrupted(daemon, sshd, tmp_path, name, "local" if direction == "push" else "remote")
    destination, staging = (remote, r"\d+-tar-\d+") if direction == "push" else (local, r"\d+-resync")
    try:
        before = snapshot(destination)
        running = resync_background(daemon, name, direction)
        wait_until(lambda: staging_with_data(destination, re.escape(TEMP_PREFIX) + staging), 30,
                   message=f"the {direction} to stream into the staging directory")
        daemon.rpc("pause", {"name": name})

        result = finish(running)
        assert result.returncode == EXIT_ERROR, describe(result)
        assert "interrupted" in result.stderr, describe(result)
        wait_state(daemon, name, "paused")
        # The staging area is discarded as soon as the stream is abandoned.
        wait_until(lambda: temp_names(destination) == [], 20, message="the staging directory to go")
        assert_same(before, snapshot(destination), ("before", "after"))
    finally:
        remove_session(daemon, name)


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[None]:
    """A tmpfs of ``size`` mounted over ``path`` (skips where mounting is not allowed)."""
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_a_full_disk_fails_the_resync_clearly_and_changes_nothing(
        daemon: DaemonProc, sshd: SshServer, tmp_path: Path, direction: str) -> None:
    name = f"{direction}-full"
    local, remote, source, destination = add_directed(daemon, sshd, tmp_path, name, direction)
    try:
        with small_disk(destination, "3m"):
            write(destination / "mine/keep.txt", "already here\n")
            for i in range(4):
                (source / f"big{i}.bin").write_bytes(os.urandom(2 << 20))  # 8 MiB: more than fits
            write(source / "small.txt", "small\n")
            before = snapshot(destination)
            done = daemon.cli("resync", name, f"--{direction}", "--json")
            assert done.returncode == EXIT_ERROR, describe(done)
            assert "No space left on device" in done.stderr, describe(done)
            assert len(done.stderr.strip().splitlines()) == 1, describe(done)  # one clear line
            wait_until(lambda: temp_names(destination) == [], 20, message="the staging directory to go")
            assert snapshot(destination) == before
            assert status(daemon, name)["state"] == "paused"
    finally:
        remove_session(daemon, name)


# ---------------------------------------------------------------------------------------
# 5. special and unreadable entries
# ---------------------------------------------------------------------------------------


def _make_socket(path: Path) -> None:
    """A Unix socket file at ``path`` (bound in a short directory, then moved: bind()
    limits the path to 108 bytes)."""
    short = tempfile.mkdtemp(prefix="sock-", dir="/tmp")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(os.path.join(short, "s"))
            os.rename(os.path.join(short, "s"), path)
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_fifos_and_sockets_are_skipped_with_a_reason(daemon: DaemonProc, sshd: SshServer, tmp_path: Path) -> None:
    name = "special"
    local, remote = add_session(daemon, sshd, tmp_path, name)
    try:
        write(local / "regular.txt", "regular\n")
        os.mkfifo(local / "pipe")
        (local / "dir").mkdir()
        _make_socket(local / "dir/sock")

        pushed = resync(daemon, name, "push")
        assert skips(pushed) == {"pipe": "special", "dir/sock": "special"}, pushed
        assert sorted(os.listdir(remote)) == ["dir", "regular.txt"]
        assert os.listdir(remote / "dir") == []

        os.mkfifo(remote / "remote-pipe")
        write(remote / "pulled.txt", "pulled\n")
        pulled = resync(daemon, name, "pull")
        assert skips(pulled) == {"remote-pipe": "special"}, pulled
        assert read(local / "pulled.txt") == b"pulled\n"
        assert not os.path.lexists(local / "remote-pipe")
        # The local special files are not synced entries: the pull leaves them alone.
        assert stat.S_ISFIFO(os.lstat(local / "pipe").st_mode)
    finally:
        remove_session(daemon, name)


def test_unreadable_remote_entries_are_skipped_and_the_local_keeps_its_own(
        unprivileged_sshd: tuple[SshServer, Path, pwd.struct_passwd], tmp_path: Path) -> None:
    # A daemon of its own: what the live sync does with these entries afterwards is not
    # what is tested here, and must not show in the shared daemon's log.
    server, area, nobody = unprivileged_sshd
    own = DaemonProc(tmp_path / "own-daemon", env=DIRECT_PULLS)  # the archive lacks what tar cannot read
    (tmp_path / "own-daemon").mkdir()
    own.start()
    name = "unreadable"
    local, remote = area / "local", area / "remote"
    local.mkdir()
    remote.mkdir()
    os.chown(remote, nobody.pw_uid, nobody.pw_gid)
    try:
        own.rpc("add", {"name": name, "spec": spec_for(server, local, remote)})
        wait_state(own, name, LIVE)
        pause(own, name)
        write(remote / "readable.txt", "readable\n")
        write(remote / "locked.txt", "the agent cannot read this\n", mode=0o000)
        write(remote / "locked-dir/inside.txt", "nor list this directory\n")
        os.chmod(remote / "locked-dir", 0o000)
        write(local / "locked.txt", "local copy of the unreadable file\n")
        write(local / "locked-dir/mine.txt", "local content under the unlistable directory\n")
        write(local / "stale.txt", "deleted by the pull\n")

        summary = resync(own, name, "pull", cli=True)

        assert skips(summary) == {"locked.txt": "unreadable", "locked-dir": "unreadable"}, summary
        assert read(local / "locked.txt") == b"local copy of the unreadable file\n"
        assert read(local / "locked-dir/mine.txt") == b"local content under the unlistable directory\n"
        assert read(local / "readable.txt") == b"readable\n"
        assert not (local / "stale.txt").exists()
        assert temp_names(local) == []
    finally:
        own.stop()
        with contextlib.suppress(FileNotFoundError):
            os.chmod(remote / "locked-dir", 0o700)


# ---------------------------------------------------------------------------------------
# 7. a file written while it is archived
# ---------------------------------------------------------------------------------------


def test_a_file_changing_during_a_push_is_reported_and_synced_live_afterwards(
        daemon: DaemonProc, sshd: SshServer, tmp_path: Path) -> None:
    name = "changing"
    local, remote = add_session(daemon, sshd, tmp_path, name)
    stop = threading.Event()
    appended = threading.Event()

    def append() -> None:
        with open(local / "growing.log", "ab") as fh:
            while not stop.is_set():
                fh.write(b"x" * 4096 + b"\n")
                fh.flush()
                appended.set()
                time.sleep(0.002)

    try:
        for i in range(20):
            write(local / f"small/f{i}.txt", f"small {i}\n")
        write(local / "growing.log", os.urandom(40 * MB))  # read for a while, appended to all along
        write(local / "steady.txt", "steady\n")
        write(remote / "growing.log", "the remote's old version\n")
        writer = threading.Thread(target=append, daemon=True)
        writer.start()
        appended.wait(5)
        try:
            summary = resync(daemon, name, "push")
        finally:
            stop.set()
            writer.join(10)
        assert skips(summary) == {"growing.log": "changed"}, summary
        assert read(remote / "steady.txt") == b"steady\n"
        assert read(remote / "small/f7.txt") == b"small 7\n"

        # Not fatal: the session is live, and it carries the file once it settles.
        wait_state(daemon, name, LIVE)
        flush(daemon, name)
        wait_until(lambda: snapshot(local) == snapshot(remote), 30,
                   message=lambda: "the changed file to be synced live; " + diff(snapshot(local), snapshot(remote)))
    finally:
        stop.set()
        remove_session(daemon, name)


# ---------------------------------------------------------------------------------------
# 4. the answer comes once the tree is in place; the base is recorded after it
# ---------------------------------------------------------------------------------------


def index_of(state_dir: Path, name: str) -> Path:
    """The session's base index (its SQLite file)."""
    (index,) = (state_dir / "sessions").glob(f"{name}-*.sqlite")
    return index


def read_index(state_dir: Path, name: str, query: str) -> list[Any]:
    """The rows ``query`` finds in the session's base index, opened read-only."""
    con = sqlite3.connect(f"file:{index_of(state_dir, name)}?mode=ro", uri=True)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


def base_paths(state_dir: Path, name: str) -> set[str]:
    """The paths the session's base index holds."""
    return {os.fsdecode(path) for (path,) in read_index(state_dir, name, "SELECT path FROM base")}


def make_many_files(root: Path, count: int) -> None:
    for i in range(count):
        write(root / f"d{i % 40:02d}/f{i:05d}.txt", f"file {i}\n")


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_a_pause_right_after_the_answer_still_records_the_whole_base(
        daemon: DaemonProc, sshd: SshServer, tmp_path: Path, direction: str) -> None:
    name = f"{direction}-then-pause"
    local, remote, source, destination = add_directed(daemon, sshd, tmp_path, name, direction)
    try:
        # Enough rows for their writing to outlast a few round trips of the status below.
        make_many_files(source, 6000)
        write(destination / "only-here.txt", "deleted by the resync\n")
        answers: list[Any] = []
        running = threading.Thread(target=lambda: answers.append(resync(daemon, name, direction)), daemon=True)
        running.start()
        wait_until(lambda: (status(daemon, name)["resync"] or {}).get("phase") == "recording", 60, interval=0,
                   message="the resync to be recording its base")
        daemon.rpc("pause", {"name": name})  # the tree is in place, the base is being written
        running.join(30)
        (summary,) = answers
        assert summary["files"] == 6000 + 40 and summary["skipped"] == [], summary
        wait_until(lambda: status(daemon, name)["resync"] is None, 30, message="the resync's session to end")
        row = status(daemon, name)
        assert row["state"] == "paused" and row["last_error"] == "", row
        said = [line for line in daemon.log().splitlines() if name in line and "interrupted" in line]
        assert said == [], said  # it was not: only the base was left to write, and it was

        assert_same(snapshot(local), snapshot(remote))
        expected = set(snapshot(source))
        recorded = base_paths(daemon.state_dir, name)
        assert recorded == expected, (f"{len(expected - recorded)} paths missing from the base, "
                                      f"{len(recorded - expected)} extra")
    finally:
        remove_session(daemon, name)


def base_digests(state_dir: Path, name: str) -> dict[str, Optional[bytes]]:
    """Each file row's digest in the session's base index."""
    rows = read_index(state_dir, name, "SELECT path, digest FROM base WHERE kind = 0")  # 0: a file
    return {os.fsdecode(path): digest for path, digest in rows}


def test_a_pull_places_files_unhashed_then_records_their_digests(
        daemon: DaemonProc, sshd: SshServer, tmp_path: Path) -> None:
    """A direct pull puts the tree in place without hashing it; the live session then
    hashes the local files in the background: ``unhashed`` in status counts down to 0,
    every file row ends with the digest of its content, and a file renamed afterwards
    travels as a move, not as content."""
    name = "pull-digests"
    local, remote = add_session(daemon, sshd, tmp_path, name)
    try:
        make_many_files(remote, 3000)
        write(remote / "big.bin", os.urandom(3 << 20))
        summary = resync(daemon, name, "pull")
        assert summary["direct"] is True and summary["skipped"] == [], summary
        wait_state(daemon, name, LIVE)
        wait_until(lambda: status(daemon, name)["unhashed"] == 0, 60, message="the digests to be recorded")
        recorded = base_digests(daemon.state_dir, name)
        assert len(recorded) == 3001
        wrong = [rel for rel, digest in recorded.items() if digest != digest_bytes(read(local / rel))]
        assert wrong == [], f"{len(wrong)} files recorded without their content's digest, e.g. {wrong[:3]}"

        before = status(daemon, name)
        os.rename(local / "big.bin", local / "d00" / "big-renamed.bin")
        wait_until(lambda: os.path.exists(remote / "d00" / "big-renamed.bin"), 30, message="the rename to land")
        after = flush(daemon, name)
        assert not os.path.exists(remote / "big.bin")
        assert after["sent_files"] == before["sent_files"], "the renamed file was sent again, not moved"

        # Digests still missing when a session starts (it stopped during the fill) are
        # filled then.
        pause(daemon, name)
        con = sqlite3.connect(index_of(daemon.state_dir, name))
        with con:
            con.execute("UPDATE base SET digest = NULL WHERE kind = 0")
        con.close()
        daemon.rpc("resume", {"name": name})
        wait_state(daemon, name, LIVE)
        wait_until(lambda: status(daemon, name)["unhashed"] == 0, 60, message="the digests to be recorded again")
        again = base_digests(daemon.state_dir, name)
        assert again == {rel: digest_bytes(read(local / rel)) for rel in again} and len(again) == 3001
    finally:
        remove_session(daemon, name)


def test_a_base_left_unrecorded_by_a_crash_converges_without_transfers(sshd: SshServer, tmp_path: Path) -> None:
    """The daemon answers a resync before writing the new base: a crash in between leaves
    the old base (played here by putting it back) beside two identical trees. The next
    start agrees on every path: nothing travels, nothing is deleted, no conflict."""
    (tmp_path / "own-daemon").mkdir()
    own = DaemonProc(tmp_path / "own-daemon")
    own.start()
    name = "stale-base"
    try:
        local, remote = add_session(own, sshd, tmp_path, name, paused=False)
        for i in range(20):
            write(local / f"kept/f{i:02d}.txt", f"kept {i}\n")
        write(local / "edited-locally.txt", "old\n")
        write(local / "edited-remotely.txt", "old\n")
        write(local / "deleted-locally.txt", "old\n")
        flush(own, name)
        assert base_paths(own.state_dir, name) >= {"edited-locally.txt", "deleted-locally.txt"}
        pause(own, name)
        index = index_of(own.state_dir, name)
        old_base = tmp_path / "old-base.sqlite"
        shutil.copy(index, old_base)

        # Both sides move apart while paused; the push makes the remote the local tree again.
        write(local / "edited-locally.txt", "new\n")
        write(local / "new-locally.txt", "new\n")
        os.unlink(local / "deleted-locally.txt")
        write(remote / "edited-remotely.txt", "changed remotely\n")
        write(remote / "new-remotely.txt", "made remotely\n")
        summary = resync(own, name, "push")
        assert summary["deleted"] == 2, summary  # new-remotely.txt, deleted-locally.txt
        pause(own, name)
        pushed = snapshot(local)
        assert_same(pushed, snapshot(remote))

        assert own.stop() == 0
        for leftover in index.parent.glob(index.name + "-*"):  # the WAL of the new base
            leftover.unlink()
        shutil.copy(old_base, index)
        own.start()
        assert "edited-locally.txt" in base_paths(own.state_dir, name)  # the old base is back
        own.rpc("resume", {"name": name})
        wait_state(own, name, LIVE)
        row = flush(own, name)
        assert counters(row) == (0, 0), row
        assert row["conflicts"] == 0, row
        assert_same(pushed, snapshot(local), ("pushed", "local"))
        assert_same(pushed, snapshot(remote), ("pushed", "remote"))
        recorded = base_paths(own.state_dir, name)
        assert recorded == set(pushed), recorded ^ set(pushed)
    finally:
        own.stop()
