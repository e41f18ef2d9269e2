"""End-to-end: `syncd upload NAME LOCAL_DIR REMOTE_DIR` through a real daemon, the real CLI
and a real OpenSSH sshd in front of the remote root.

The module has one sshd of its own, whose sessions get ``XDG_RUNTIME_DIR`` (sshd's
``SetEnv``) pointing at a directory of the test, so ``--runtime`` uploads land there and
never in the home directory of the machine running the tests. One daemon and one session
serve the module; the session is paused (an upload uses a connection of its own, so it
works whatever the live session does), and each test uploads to directories of its own.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import pytest

from syncd.control.client import RemoteError
from tests.e2e.daemon_util import DaemonProc, cli_many, describe, ok_json, wait_until
from tests.sshd import SshServer, start_sshd

EXIT_UNKNOWN_SESSION = 4
TEMP_PREFIX = ".syncd-tmp-"
UPLOAD_FIELDS = {"name", "files", "bytes", "seconds", "where", "skipped"}
NAME = "up"
MB = 1 << 20

Snap = dict[str, tuple[Any, ...]]


@dataclass
class Setup:
    daemon: DaemonProc
    server: SshServer
    local: Path  # the session's local root (unused by uploads)
    remote: Path  # the session's remote root
    runtime: Path  # XDG_RUNTIME_DIR of the remote sessions
    base: Path

    def upload(self, *args: str, name: str = NAME) -> Any:
        """``syncd upload NAME ARGS --json``; the parsed summary (exit 0 asserted)."""
        summary = ok_json(self.daemon.cli("upload", name, *args, "--json"))
        assert set(summary) == UPLOAD_FIELDS, summary
        assert summary["name"] == name
        return summary


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("upload")
    runtime = base / "xdg-runtime"
    runtime.mkdir(mode=0o700)
    with start_sshd(base / "sshd", extra_config=[f"SetEnv XDG_RUNTIME_DIR={runtime}"]) as server:
        daemon = DaemonProc(base / "daemon")
        (base / "daemon").mkdir()
        daemon.start()
        try:
            local, remote = base / "local", base / "remote"
            local.mkdir()
            remote.mkdir()
            daemon.rpc("add", {"name": NAME, "spec": {
                "local": str(local), "remote": server.url(remote), "identity": str(server.client_key),
                "known_hosts": str(server.known_hosts)}})
            wait_until(lambda: daemon.rpc("status", {"name": NAME})[0]["state"] == "watching", 30,
                       message=lambda: f"the session to come up\n{daemon.log()[-3000:]}")
            daemon.rpc("pause", {"name": NAME})
            wait_until(lambda: (row := daemon.rpc("status", {"name": NAME})[0])["state"] == "paused"
                       and row["cycles"] == 0, 20, message="the session to stop")
            yield Setup(daemon, server, local, remote, runtime, base)
        finally:
            status = daemon.stop()
            assert status == 0, f"the daemon exited with {status} on SIGTERM:\n{daemon.log()}"
            assert "Traceback" not in daemon.log(), daemon.log()


# ---------------------------------------------------------------------------------------
# trees
# ---------------------------------------------------------------------------------------


def write(path: Union[str, Path], data: Union[bytes, str], mode: Optional[int] = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        os.chmod(path, mode)


def snapshot(root: Path, with_mtimes: bool = True) -> Snap:
    """``{rel: (kind, perm, sha256 or link target, mtime_ns)}``; symlinks never followed."""
    out: Snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            mtime = st.st_mtime_ns if with_mtimes else None
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", None, os.readlink(full), mtime)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), None, mtime)
            elif not stat.S_ISREG(st.st_mode):
                out[rel] = ("other", stat.S_IMODE(st.st_mode), None, None)
            else:
                with open(full, "rb") as fh:
                    out[rel] = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(fh.read()).hexdigest(), mtime)
    return out


def temp_names(root: Path) -> list[str]:
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files if n.startswith(TEMP_PREFIX)]


def dead_pid() -> int:
    """A pid no process has (for staging names of "killed" writers)."""
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def skipped(summary: dict[str, Any]) -> dict[str, str]:
    return {s["path"]: s["reason"] for s in summary["skipped"]}


# ---------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------


def test_upload_replaces_the_remote_directory(setup: Setup, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "main.py", "print('new')\n")
    write(src / "sub/mod.py", "x = 1\n" * 100)
    write(src / "run.sh", "#!/bin/sh\n", mode=0o755)
    write(src / "big.bin", os.urandom(2 * MB + 3))
    (src / "empty").mkdir()
    os.symlink("main.py", src / "link-file")
    os.symlink("sub", src / "link-dir")
    os.symlink("nowhere", src / "dangling")
    write(src / "build/out.o", "excluded by directory\n")
    write(src / "sub/cache.pyc", "excluded by pattern\n")
    write(src / "._main.py", "AppleDouble: never sent\n")
    os.utime(src / "sub", ns=(1_600_000_000_000_000_001,) * 2)
    target = setup.remote / "deploy/app"
    write(target / "old.txt", "replaced\n")
    write(target / "olddir/x.txt", "replaced\n")
    write(setup.remote / "deploy/sibling.txt", "not part of the upload: stays\n")
    write(setup.remote / f"deploy/{TEMP_PREFIX}{dead_pid()}-tar-7/half.bin", "a killed upload's staging\n")

    summary = setup.upload(str(src), "deploy/app", "--exclude", "build/", "--exclude", "*.pyc")

    expected = {rel: v for rel, v in snapshot(src).items()
                if not rel.startswith(("build", "._")) and not rel.endswith(".pyc")}
    assert snapshot(target) == expected
    assert all(os.path.islink(target / n) for n in ("link-file", "link-dir", "dangling"))
    assert (setup.remote / "deploy/sibling.txt").read_text() == "not part of the upload: stays\n"
    assert summary["where"] == str(target), summary
    assert summary["skipped"] == [], summary
    assert summary["files"] == len(expected), summary
    assert summary["bytes"] == sum((src / p).stat().st_size for p in ("main.py", "sub/mod.py", "run.sh", "big.bin"))
    assert temp_names(setup.remote) == []


def test_upload_follow_symlinks_sends_what_they_point_to(setup: Setup, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside / "file.txt", "outside file\n")
    write(outside / "dir/inner.txt", "outside dir\n", mode=0o600)
    src = tmp_path / "src"
    write(src / "real.txt", "real\n")
    os.symlink("real.txt", src / "link-file")
    os.symlink(outside / "file.txt", src / "abs-link-file")
    os.symlink(outside / "dir", src / "link-dir")
    os.symlink("nowhere", src / "dangling")

    summary = setup.upload(str(src), "followed", "--follow-symlinks")

    target = setup.remote / "followed"
    now = snapshot(target, with_mtimes=False)
    perm = stat.S_IMODE(os.stat(src / "real.txt").st_mode)
    assert now["link-file"][:3] == ("file", perm, hashlib.sha256(b"real\n").hexdigest())
    assert now["abs-link-file"][:3] == ("file", perm, hashlib.sha256(b"outside file\n").hexdigest())
    assert now["link-dir"][0] == "dir"
    assert now["link-dir/inner.txt"][:3] == ("file", 0o600, hashlib.sha256(b"outside dir\n").hexdigest())
    assert "dangling" not in now
    assert skipped(summary) == {"dangling": "dangling"}, summary
    assert (outside / "dir/inner.txt").read_text() == "outside dir\n"  # the source is left alone
    assert os.path.islink(src / "link-dir")


def test_upload_runtime_goes_under_the_agents_runtime_dir(setup: Setup, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "tool.sh", "#!/bin/sh\necho tool\n", mode=0o755)
    write(src / "lib/data.txt", "data\n")
    write(setup.runtime / "syncd/run/tools/v1/stale.txt", "an older upload: replaced\n")
    remote_before = snapshot(setup.remote)

    result = setup.daemon.cli("upload", NAME, str(src), "tools/v1", "--runtime")

    assert result.returncode == 0, describe(result)
    where = setup.runtime / "syncd" / "run" / "tools" / "v1"
    assert str(where) in result.stdout, describe(result)  # it says where it went
    assert snapshot(where) == snapshot(src)
    assert snapshot(setup.remote) == remote_before, "a --runtime upload wrote into the remote root"


def test_upload_refuses_remote_dirs_outside_the_root(setup: Setup, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "payload.txt", "must not land anywhere\n")
    remote_before, runtime_before = snapshot(setup.remote), snapshot(setup.runtime)
    around = sorted(os.listdir(setup.base))  # the parent of both
    s = ["--socket", str(setup.daemon.socket)]
    for result in cli_many([["upload", NAME, str(src), remote_dir, *s] for remote_dir in ("../x", "/abs")]):
        assert result.returncode != 0, describe(result)
        err = result.stderr.strip()
        assert err.startswith("syncd: error:") and "REMOTE_DIR" in err, describe(result)
        assert "Traceback" not in err, describe(result)
    # The same check, for more shapes, through the socket (the CLI adds nothing to it).
    for remote_dir, runtime in (("/", False), ("a/../../b", False), (".", False), ("", False),
                                ("../escape", True), ("/abs", True)):
        with pytest.raises(RemoteError) as info:
            setup.daemon.rpc("upload", {"name": NAME, "local": str(src), "remote": remote_dir, "runtime": runtime})
        assert "REMOTE_DIR" in str(info.value), (remote_dir, info.value)
    assert snapshot(setup.remote) == remote_before
    assert snapshot(setup.runtime) == runtime_before
    assert sorted(os.listdir(setup.base)) == around
    assert not os.path.lexists("/abs")


def test_upload_through_a_symlinked_parent_writes_nothing_outside(setup: Setup, tmp_path: Path) -> None:
    """A remote symlink as the parent of REMOTE_DIR (planted there by whatever runs on the
    remote) must not make the upload stage or write anything where it points."""
    outside = tmp_path / "outside-target"
    stale = outside / f"{TEMP_PREFIX}{dead_pid()}-tar-1"  # looks like a killed upload's staging
    write(stale / "keep.txt", "not the upload's to remove\n")
    os.symlink(outside, setup.remote / "planted")
    src = tmp_path / "src"
    write(src / "big.bin", os.urandom(8 * MB))  # long enough to be seen while it streams
    seen: list[str] = [stale.name]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.extend(n for n in os.listdir(outside) if n not in seen)
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = setup.daemon.cli("upload", NAME, str(src), "planted/app")
    finally:
        done.set()
        watcher.join(10)
    assert result.returncode != 0, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    assert seen == [stale.name], f"the upload wrote through the symlink: {seen}"
    assert os.listdir(outside) == [stale.name] and (stale / "keep.txt").exists()
    assert os.path.islink(setup.remote / "planted")

    # A symlink as REMOTE_DIR itself is replaced, never written through.
    os.unlink(src / "big.bin")
    write(src / "small.txt", "small\n")
    os.symlink(outside, setup.remote / "planted-target")
    setup.upload(str(src), "planted-target")
    assert not os.path.islink(setup.remote / "planted-target")
    assert os.listdir(setup.remote / "planted-target") == ["small.txt"]
    assert os.listdir(outside) == [stale.name] and os.listdir(stale) == ["keep.txt"]


def test_upload_to_an_unknown_session_exits_4(setup: Setup, tmp_path: Path) -> None:
    result = setup.daemon.cli("upload", "no-such-session", str(tmp_path), "x")
    assert result.returncode == EXIT_UNKNOWN_SESSION, describe(result)
    assert "no-such-session" in result.stderr, describe(result)
    assert not (setup.remote / "x").exists()
