"""Helpers for the end-to-end tests of ``syncd daemon`` (``tests/e2e/test_daemon_*.py``).

- :class:`DaemonProc`: a real ``python -m syncd.cli daemon --socket S`` process with
  ``STATE_DIRECTORY`` pointing into the test's tmp dir (never the machine's own state);
  its stderr goes to a log file.
- :func:`cli` / :func:`cli_many`: real CLI subprocesses over the real socket (one, or
  several at once: each CLI start costs ~0.7 s of imports, so independent calls run in
  parallel).
- :func:`rpc`: one request through ``syncd.control.client.call`` in this process (fast,
  for set-up that is not itself under test).
- :func:`raw_exchange`: send arbitrary bytes on the control socket and read one reply.
- :func:`closed_port` / :class:`BlackHole`: an ssh endpoint that refuses connections, and
  one that accepts TCP but never says anything (a hung remote).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import msgpack

from syncd.control.client import call

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI = (sys.executable, "-m", "syncd.cli")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
CLI_TIMEOUT = 60.0

StrPath = Union[str, "os.PathLike[str]"]

# Environment that must never leak from the machine running the tests into a test daemon.
_SCRUB = ("SYNCD_SOCKET", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "RUNTIME_DIRECTORY",
          "STATE_DIRECTORY", "SYNCD_DEBUG_HOOKS", "LISTEN_FDS", "LISTEN_PID")


def base_env(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if extra:
        env.update(extra)
    return env


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
               message: Union[str, Callable[[], str]] = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for: {text}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------
# the daemon
# ---------------------------------------------------------------------------------------


class DaemonProc:
    """One daemon process. ``start()`` waits until the socket answers ``ping``."""

    def __init__(self, base: Path, socket_path: Optional[Path] = None, state_dir: Optional[Path] = None,
                 config: Optional[Path] = None, env: Optional[Mapping[str, str]] = None,
                 log_name: str = "daemon.log") -> None:
        self.base = base
        self.socket = socket_path or base / "run" / "syncd.sock"
        self.state_dir = state_dir or base / "state"
        self.config = config
        self.extra_env = dict(env or {})
        self.log_path = base / log_name
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def argv(self) -> list[str]:
        argv = [*CLI, "daemon", "--socket", str(self.socket), "-v"]
        if self.config is not None:
            argv += ["--config", str(self.config)]
        return argv

    def env(self) -> dict[str, str]:
        return base_env({"STATE_DIRECTORY": str(self.state_dir), **self.extra_env})

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it to serve."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=self.env(), cwd=str(self.base))
        return self.proc

    def start(self, timeout: float = START_TIMEOUT) -> DaemonProc:
        self.spawn()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(Exception):
                call(str(self.socket), "ping", {}, timeout=2.0)
                return self
            if time.monotonic() > deadline:
                raise AssertionError(f"the daemon did not answer within {timeout}s:\n{self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = STOP_TIMEOUT) -> Optional[int]:
        """SIGTERM, wait; SIGKILL if it does not go. Returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def rpc(self, cmd: str, args: Optional[dict[str, Any]] = None, timeout: float = 30.0) -> Any:
        return call(str(self.socket), cmd, args or {}, timeout=timeout)

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT,
            env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess[str]:
        return cli(*args, "--socket", str(self.socket), timeout=timeout, env=env)


@contextlib.contextmanager
def running_daemon(base: Path, **kwargs: Any) -> Iterator[DaemonProc]:
    daemon = DaemonProc(base, **kwargs)
    try:
        yield daemon.start()
    finally:
        daemon.stop()


# ---------------------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------------------


def cli(*args: str, timeout: float = CLI_TIMEOUT,
        env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env=base_env(env), stdin=subprocess.DEVNULL, check=False)


def cli_many(calls: Sequence[Sequence[str]], timeout: float = CLI_TIMEOUT,
             env: Optional[Mapping[str, str]] = None) -> list[subprocess.CompletedProcess[str]]:
    """Run several CLI invocations at once; results in the order given."""
    procs = [subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=base_env(env), stdin=subprocess.DEVNULL) for args in calls]
    out = []
    for args, proc in zip(calls, procs):
        stdout, stderr = proc.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess([*CLI, *args], proc.returncode, stdout, stderr))
    return out


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return f"{' '.join(map(str, result.args[2:]))} -> exit {result.returncode}\nstdout: {result.stdout}\n" \
           f"stderr: {result.stderr}"


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, describe(result)
    return json.loads(result.stdout)


def rpc(socket_path: StrPath, cmd: str, args: Optional[dict[str, Any]] = None, timeout: float = 30.0) -> Any:
    return call(str(socket_path), cmd, args or {}, timeout=timeout)


# ---------------------------------------------------------------------------------------
# raw socket
# ---------------------------------------------------------------------------------------

HEADER = struct.Struct(">I")


def frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def _recv_exact(sock: socket.socket, n: int) -> Optional[bytes]:
    buf = b""
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        buf += chunk
    return buf


def read_reply(sock: socket.socket) -> Optional[dict[str, Any]]:
    """One reply, or None when the daemon closed the connection instead."""
    header = _recv_exact(sock, HEADER.size)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    body = _recv_exact(sock, length)
    if body is None:
        return None
    reply = msgpack.unpackb(body, raw=False)
    assert isinstance(reply, dict), reply
    return reply


def raw_exchange(socket_path: StrPath, data: bytes, timeout: float = 5.0) -> Optional[dict[str, Any]]:
    """Send *data* as is; return the first reply, or None when the connection is closed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        return read_reply(sock)


# ---------------------------------------------------------------------------------------
# remotes that do not answer
# ---------------------------------------------------------------------------------------


def closed_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BlackHole:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte (a hung remote)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.accepted: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in self.accepted:
            conn.close()
        self._thread.join(2)


def ssh_remote(port: int, path: StrPath, user: str = "nobody") -> str:
    return f"ssh://{user}@127.0.0.1:{port}{os.path.abspath(os.fspath(path))}"


def make_pair(base: Path, name: str) -> tuple[Path, Path]:
    local = base / f"{name}-local"
    remote = base / f"{name}-remote"
    local.mkdir(parents=True)
    remote.mkdir(parents=True)
    return local, remote
