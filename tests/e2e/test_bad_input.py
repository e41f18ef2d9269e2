"""End-to-end: ``syncd run`` refuses bad set-ups with one clear line and a non-zero exit.

Every case checks: the exit status, that stderr is exactly one line starting with
``syncd: error:`` (usage errors excepted, see test_malformed_remote), that it ends within
~20 s, and that nothing was written into the remote directory.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.helpers import run_cli, single_error_line
from tests.sshd import HOST, SshServer

DEADLINE = 20.0


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    local, remote, state = tmp_path / "local", tmp_path / "remote", tmp_path / "state"
    local.mkdir()
    remote.mkdir()
    (local / "file.txt").write_text("must not travel\n")
    (local / "sub").mkdir()
    return local, remote, state


def _run(local: Path, remote_url: str, state: Path, identity: Path, known_hosts: Path,
         *extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    result = run_cli(
        ["run", str(local), remote_url, "--identity", str(identity), "--known-hosts", str(known_hosts),
         "--state-dir", str(state), *extra],
        timeout=DEADLINE + 10,
    )
    return result, time.monotonic() - start


def _check_failed(result: subprocess.CompletedProcess[str], elapsed: float, remote: Path,
                  code: int = 1) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert elapsed < DEADLINE, f"took {elapsed:.1f} s"
    line = single_error_line(result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == "", result.stdout
    assert os.listdir(remote) == [], f"something was written to the remote: {os.listdir(remote)}"
    return line


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])  # nothing listens once the socket is closed


def test_unreachable_host(sshd: SshServer, dirs: tuple[Path, Path, Path]) -> None:
    local, remote, state = dirs
    port = _closed_port()
    url = f"ssh://{sshd.user}@{HOST}:{port}{remote}"
    result, elapsed = _run(local, url, state, sshd.client_key, sshd.known_hosts)
    line = _check_failed(result, elapsed, remote)
    assert str(port) in line and ("reach" in line or "refused" in line.lower()), line


def test_failed_authentication(sshd: SshServer, dirs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    local, remote, state = dirs
    stranger = tmp_path / "stranger_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
                   check=True, capture_output=True)
    result, elapsed = _run(local, sshd.url(remote), state, stranger, sshd.known_hosts)
    line = _check_failed(result, elapsed, remote)
    assert "authentication" in line.lower(), line


def test_changed_host_key(sshd_factory: Callable[..., SshServer], dirs: tuple[Path, Path, Path]) -> None:
    """The server at [127.0.0.1]:PORT comes back with a new host key: refused."""
    local, remote, state = dirs
    original = sshd_factory()
    known_hosts = original.known_hosts  # pins the original key for [127.0.0.1]:PORT
    original.stop()
    impostor = sshd_factory(port=original.port, client_key=original.client_key)
    assert impostor.known_hosts_line() != original.known_hosts_line()
    result, elapsed = _run(local, impostor.url(remote), state, impostor.client_key, known_hosts)
    line = _check_failed(result, elapsed, remote)
    assert "host key" in line.lower(), line


def test_unknown_host_key(sshd: SshServer, dirs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    local, remote, state = dirs
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    result, elapsed = _run(local, sshd.url(remote), state, sshd.client_key, empty)
    line = _check_failed(result, elapsed, remote)
    assert "host key" in line.lower(), line


def test_remote_without_python3(sshd_no_python: SshServer, dirs: tuple[Path, Path, Path]) -> None:
    local, remote, state = dirs
    server = sshd_no_python
    result, elapsed = _run(local, server.url(remote), state, server.client_key, server.known_hosts)
    line = _check_failed(result, elapsed, remote)
    assert "python3" in line, line


def test_missing_local_directory(sshd: SshServer, dirs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, remote, state = dirs
    missing = tmp_path / "no-such-dir"
    result, elapsed = _run(missing, sshd.url(remote), state, sshd.client_key, sshd.known_hosts)
    line = _check_failed(result, elapsed, remote)
    assert str(missing) in line, line
    assert not missing.exists()


@contextlib.contextmanager
def _read_only_bind_mount(src: Path, dst: Path) -> Iterator[None]:
    dst.mkdir()
    mount = subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot bind-mount (needs root / CAP_SYS_ADMIN): {mount.stderr.strip()}")
    try:
        ro = subprocess.run(["mount", "-o", "remount,bind,ro", str(dst)], capture_output=True, text=True)
        if ro.returncode != 0:
            pytest.skip(f"cannot remount read-only: {ro.stderr.strip()}")
        probe = dst / "probe"
        with contextlib.suppress(OSError):
            probe.write_text("x")
        if probe.exists():
            probe.unlink()
            pytest.skip("the read-only bind mount is writable here")
        yield
    finally:
        subprocess.run(["umount", str(dst)], capture_output=True, check=False)


def test_read_only_remote_directory(sshd: SshServer, dirs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """As root permissions do not stop writes, so the remote root is a read-only bind mount."""
    local, src, state = dirs
    remote = tmp_path / "remote-ro"
    with _read_only_bind_mount(src, remote):
        result, elapsed = _run(local, sshd.url(remote), state, sshd.client_key, sshd.known_hosts)
        line = _check_failed(result, elapsed, remote)
    assert os.listdir(src) == []
    assert str(remote) in line and ("writ" in line.lower() or "read-only" in line.lower()), line


@pytest.mark.parametrize("spec", ["ssh://", "no-colon-here", "ssh://host:99999999/x", "local:", "exec:sh"])
def test_malformed_remote(sshd: SshServer, dirs: tuple[Path, Path, Path], spec: str) -> None:
    """A REMOTE that cannot be parsed is a usage error (exit 2), before any connection.

    click reports usage errors as "Usage: ... / Try ... / Error: MESSAGE"; what is checked
    is exactly one error line, naming the bad argument, and no traceback.
    """
    local, remote, state = dirs
    result, elapsed = _run(local, spec, state, sshd.client_key, sshd.known_hosts)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert elapsed < DEADLINE
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(("Error:", "syncd: error:"))]
    assert len(errors) == 1, result.stderr
    assert spec in errors[0] or "local:" in errors[0] or "exec:" in errors[0], errors[0]
    assert os.listdir(remote) == []
    assert not state.exists()
