"""Link loss during churn: the daemon's session reconnects by itself and converges (issue 4).

``syncd run`` exits on link loss (exit 1); the component that reconnects is the daemon, so
these tests start ``syncd daemon`` on a socket of their own, ``syncd add`` one session over
SSH, and edit both trees while the link is cut:

- through a TCP relay on 127.0.0.1 that the test controls: every relayed connection is
  closed during churn and the relay refuses new ones for a while, then accepts again;
- by killing (SIGKILL) the sshd process that serves the session's connection.

While cut, ``syncd status NAME --json`` must say "disconnected" with a last error; then the
session must come back on its own (backoff starts at 1 s) and, after ``syncd flush``, both
trees must be identical and hold every edit, including those made while the link was down.
Each side edits its own files only (``L*`` locally, ``R*`` on the remote), so the expected
final tree is known exactly: no conflicts are involved.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from syncd.control.client import call
from tests.e2e.daemon_util import wait_until
from tests.e2e.helpers import cli_argv, cli_env, snapshot_diff, tree_snapshot
from tests.sshd import HOST, SshServer, _descendants

CUT_SECONDS = 2.0
FLUSH_TIMEOUT = 30  # a flush after the churn normally takes about a second

pytestmark = [pytest.mark.timeout(180)]


# ---------------------------------------------------------------------------------------
# a TCP relay the test can cut
# ---------------------------------------------------------------------------------------


class Relay:
    """Forwards 127.0.0.1:port to 127.0.0.1:target, one thread pair per connection.

    :meth:`cut` closes every relayed connection and stops listening (new connections are
    refused); :meth:`restore` listens again on the same port. While :attr:`reject` is set,
    connections are accepted and closed at once (and counted in :attr:`attempts`).
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.accepted = 0
        self.attempts: list[float] = []  # time.monotonic() of every connection accepted
        self.reject = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed
            self.attempts.append(time.monotonic())
            if self.reject.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection((HOST, self.target), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self.accepted += 1
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for s in self._conns if s.fileno() != -1) // 2

    def cut(self) -> None:
        """Close every relayed connection (RST-free: a shutdown both ways) and refuse new ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            # close() alone does not wake a thread blocked in accept(), which would then
            # take one more connection: shutdown() does (EINVAL).
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.drop_connections()

    def restore(self) -> None:
        self.start()

    def drop_connections(self) -> None:
        """Close every relayed connection, keep listening."""
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.cut()


# ---------------------------------------------------------------------------------------
# the daemon and the CLI
# ---------------------------------------------------------------------------------------


@dataclass
class Daemon:
    base: Path
    socket: Path = field(init=False)
    state: Path = field(init=False)
    log: Path = field(init=False)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.socket = self.base / "syncd.sock"
        self.state = self.base / "state"
        self.log = self.base / "daemon.log"

    def start(self) -> None:
        config = self.base / "empty.toml"  # not /etc/syncd/syncd.toml, whatever this machine has
        config.write_text("")
        env = dict(cli_env(), STATE_DIRECTORY=str(self.state))
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [*cli_argv(), "daemon", "--config", str(config), "--socket", str(self.socket), "-v"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
            )
        deadline = time.monotonic() + 20
        while self.cli("list").returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the daemon did not come up\n{self.describe()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the daemon did not stop on SIGTERM\n{self.describe()}") from None

    def cli(self, *args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli_argv(), *args, "--socket", str(self.socket)], capture_output=True, text=True,
                              timeout=timeout, env=cli_env(), stdin=subprocess.DEVNULL, check=False)

    def poll(self, name: str) -> dict[str, Any]:
        """The status row through the control socket directly: fast enough to poll."""
        rows = call(str(self.socket), "status", {"name": name}, 10.0)
        assert len(rows) == 1, rows
        return dict(rows[0])

    def status(self, name: str) -> dict[str, Any]:
        """``syncd status NAME --json``."""
        result = self.cli("status", name, "--json")
        assert result.returncode == 0, f"status exited {result.returncode}: {result.stderr}\n{self.describe()}"
        rows = json.loads(result.stdout)["sessions"]
        assert len(rows) == 1, rows
        return dict(rows[0])

    def describe(self) -> str:
        code = None if self.proc is None else self.proc.poll()
        try:
            text = self.log.read_text(errors="replace")[-8000:]
        except OSError:
            text = "(no log)"
        return f"daemon exit status: {code}\n--- daemon log ---\n{text}"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "daemon")
    d.base.mkdir()
    d.start()
    try:
        yield d
    finally:
        d.stop()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, describe: Callable[[], str]) -> Any:
    return wait_until(predicate, timeout, message=lambda: f"{what}\n{describe()}")


# ---------------------------------------------------------------------------------------
# churn with a known outcome
# ---------------------------------------------------------------------------------------


class Churner(threading.Thread):
    """Random creates, rewrites, renames and deletes of this side's own files.

    ``expected`` is the side's own part of the final tree: {relpath: content}. ``during_cut``
    collects (path, content) written while :attr:`cut` is set.
    """

    def __init__(self, root: Path, prefix: str, seed: int, rate: float = 25.0) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.prefix = prefix
        self.rng = random.Random(seed)
        self.interval = 1.0 / rate
        self.expected: dict[str, str] = {}
        self.written: set[str] = set()  # every content ever written
        self.during_cut: list[tuple[str, str]] = []
        self.cut = threading.Event()
        self.halt = threading.Event()
        self.ops = 0
        self.error: BaseException | None = None
        self._n = 0

    def seed_files(self, count: int) -> None:
        for _ in range(count):
            self._create()

    def _content(self) -> str:
        self._n += 1
        return f"{self.prefix} version {self._n} {self.rng.random()}\n" * self.rng.randint(1, 40)

    def _write(self, rel: str, content: str) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{self._n}"  # atomic: no half-read file
        tmp.write_text(content)
        os.replace(tmp, path)
        self.expected[rel] = content
        self.written.add(content)
        if self.cut.is_set():
            self.during_cut.append((rel, content))

    def _create(self) -> None:
        rel = f"{self.prefix}{self.rng.randrange(6)}/{self.prefix}-{self._n + 1}.txt"
        self._write(rel, self._content())

    def step(self) -> None:
        names = sorted(self.expected)
        op = self.rng.random()
        if not names or op < 0.4:
            self._create()
        elif op < 0.7:
            self._write(self.rng.choice(names), self._content())
        elif op < 0.85:
            old = self.rng.choice(names)
            new = f"{self.prefix}{self.rng.randrange(6)}/{self.prefix}-moved-{self._n + 1}.txt"
            self._n += 1
            (self.root / new).parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.root / old, self.root / new)
            self.expected[new] = self.expected.pop(old)
            if self.cut.is_set():
                self.during_cut.append((new, self.expected[new]))
        else:
            old = self.rng.choice(names)
            os.unlink(self.root / old)
            del self.expected[old]
        self.ops += 1

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                self.step()
                time.sleep(self.interval)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)
        assert self.error is None, f"{self.prefix} churn failed: {self.error!r}"


def content_tree(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = path.read_text()
    return out


# ---------------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------------


@dataclass
class Workspace:
    local: Path
    remote: Path
    lc: Churner
    rc: Churner


def make_workspace(tmp_path: Path, seed: int) -> Workspace:
    local, remote = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    remote.mkdir()
    ws = Workspace(local, remote, Churner(local, "L", seed), Churner(remote, "R", seed + 1))
    ws.lc.seed_files(20)
    ws.rc.seed_files(20)
    return ws


def add_session(daemon: Daemon, server: SshServer, ws: Workspace, port: int, known_hosts: Path) -> None:
    remote = f"ssh://{server.user}@{HOST}:{port}{ws.remote}"
    added = daemon.cli("add", "ws", str(ws.local), remote, "--identity", str(server.client_key),
                       "--known-hosts", str(known_hosts))
    assert added.returncode == 0, f"add: {added.stdout}{added.stderr}\n{daemon.describe()}"


def flush(daemon: Daemon, what: str) -> float:
    started = time.monotonic()
    result = daemon.cli("flush", "ws", "--timeout", str(FLUSH_TIMEOUT), timeout=FLUSH_TIMEOUT + 30)
    if result.returncode != 0:
        # Each side edits only its own files: any conflict is one syncd made up.
        conflicts = daemon.cli("conflicts", "ws", "--json").stdout
        raise AssertionError(
            f"flush ({what}) exited {result.returncode}: {result.stdout}{result.stderr}\n"
            f"conflicts: {conflicts}\nstatus: {daemon.status('ws')}\n{daemon.describe()}")
    return time.monotonic() - started


def assert_converged(daemon: Daemon, ws: Workspace) -> None:
    """Both trees identical; every version nobody replaced or removed is there, unchanged.

    A file the churner no longer has may be present too (printed, not failed): a rename
    the link took away before its result came back is not recorded, and after reconnecting
    syncd takes it for the remote's own and keeps both names (see the report of bugs).
    It must then hold a version the churner wrote, never anything else.
    """
    local, remote = tree_snapshot(ws.local), tree_snapshot(ws.remote)
    assert local == remote, f"trees differ after flush: {snapshot_diff(local, remote)}\n{daemon.describe()}"
    expected = {**ws.lc.expected, **ws.rc.expected}
    written = ws.lc.written | ws.rc.written
    actual = content_tree(ws.local)
    missing = sorted(set(expected) - set(actual))
    wrong = sorted(p for p in set(expected) & set(actual) if actual[p] != expected[p])
    extra = sorted(set(actual) - set(expected))
    unknown = [p for p in extra if actual[p] not in written]
    assert not (missing or wrong or unknown), (
        f"missing {missing[:10]}, stale content {wrong[:10]}, unknown files {unknown[:10]}\n{daemon.describe()}")
    if extra:
        print(f"note: {len(extra)} file(s) kept under a name the churner had left: {extra[:10]}")
    for churner in (ws.lc, ws.rc):
        for rel, content in churner.during_cut:
            if churner.expected.get(rel) == content:  # not replaced or removed later
                assert (ws.local / rel).read_text() == content and (ws.remote / rel).read_text() == content


def _check_not_stuck(row: dict[str, Any]) -> None:
    """Fail at once on states the session does not leave by itself within the test."""
    assert row["state"] != "error", f"the session crashed instead of reconnecting: {row['last_error']}"
    assert "already syncing this session" not in row["last_error"], (
        f"the session locked itself out of its own index: {row['last_error']}")


def wait_disconnected(daemon: Daemon) -> dict[str, Any]:
    def seen() -> dict[str, Any] | None:
        row = daemon.poll("ws")
        _check_not_stuck(row)
        return row if row["state"] == "disconnected" and row["last_error"] else None

    return wait_for(seen, 15, 'state "disconnected" with a last_error', daemon.describe)


def wait_reconnected(daemon: Daemon, timeout: float = 30) -> dict[str, Any]:
    def seen() -> dict[str, Any] | None:
        row = daemon.poll("ws")
        _check_not_stuck(row)
        return row if row["state"] not in ("disconnected", "connecting", "starting") else None

    return wait_for(seen, timeout, "the session to reconnect by itself", daemon.describe)


def test_relay_cut_during_churn_reconnects_and_converges(
    sshd: SshServer, daemon: Daemon, tmp_path: Path
) -> None:
    ws = make_workspace(tmp_path, seed=int(os.environ.get("SYNCD_TEST_SEED", "4242")))
    relay = Relay(sshd.port)
    relay.start()
    try:
        # sshd's known_hosts line names [127.0.0.1]:SSHDPORT; the session dials the relay.
        keytype, key = sshd.known_hosts_line().split()[1:3]
        known_hosts = tmp_path / "known_hosts.relay"
        known_hosts.write_text(f"[{HOST}]:{relay.port} {keytype} {key}\n")
        add_session(daemon, sshd, ws, relay.port, known_hosts)
        flush(daemon, "initial sync")
        # The agent's connection, and maybe the login of the first sync's direct stream,
        # dropped once the agent found files in the remote root.
        assert relay.open_connections() >= 1 and relay.accepted in (1, 2), relay.accepted
        first_connections = relay.accepted
        assert_converged(daemon, ws)

        ws.lc.start()
        ws.rc.start()
        time.sleep(1.5)  # churn with the link up: cycles are in flight when it is cut
        ws.lc.cut.set()
        ws.rc.cut.set()
        cut_at = time.monotonic()
        relay.cut()
        wait_disconnected(daemon)
        row = daemon.status("ws")  # what `syncd status ws --json` shows while cut
        print(f"while cut: state={row['state']} last_error={row['last_error']!r}")
        assert row["state"] in ("disconnected", "connecting") and row["last_error"], row
        time.sleep(max(0.0, CUT_SECONDS - (time.monotonic() - cut_at)))
        row = daemon.status("ws")
        assert row["state"] in ("disconnected", "connecting") and row["last_error"], row
        relay.restore()
        ws.lc.cut.clear()
        ws.rc.cut.clear()
        restored_at = time.monotonic()
        reconnected = wait_reconnected(daemon)
        print(f"reconnected {time.monotonic() - restored_at:.1f}s after the relay came back: {reconnected['state']}")
        time.sleep(1.0)  # more churn on the new link
        ws.lc.stop()
        ws.rc.stop()
        assert ws.lc.during_cut and ws.rc.during_cut, "no edit was made while the link was cut"
        took = flush(daemon, "after the cut")
        print(f"ops local={ws.lc.ops} remote={ws.rc.ops}, during the cut local={len(ws.lc.during_cut)} "
              f"remote={len(ws.rc.during_cut)}; relay connections={relay.accepted}; flush {took:.2f}s")
        assert relay.accepted > first_connections  # it did reconnect through the relay
        assert_converged(daemon, ws)
    finally:
        ws.lc.halt.set()
        ws.rc.halt.set()
        relay.close()


def test_backoff_starts_over_after_a_link_that_worked(sshd: SshServer, daemon: Daemon, tmp_path: Path) -> None:
    """Failed attempts grow the backoff; once a link has worked, the next loss retries
    within BACKOFF_FIRST (1 s, jittered), not after the grown delay."""
    ws = make_workspace(tmp_path, seed=11)
    relay = Relay(sshd.port)
    relay.reject.set()
    relay.start()
    try:
        keytype, key = sshd.known_hosts_line().split()[1:3]
        known_hosts = tmp_path / "known_hosts.relay"
        known_hosts.write_text(f"[{HOST}]:{relay.port} {keytype} {key}\n")
        add_session(daemon, sshd, ws, relay.port, known_hosts)

        def failed_attempts() -> bool:
            _check_not_stuck(daemon.poll("ws"))
            return len(relay.attempts) >= 3

        wait_for(failed_attempts, 20, "three failed connection attempts (backoff then 8 s)", daemon.describe)
        relay.reject.clear()
        wait_reconnected(daemon, timeout=20)
        flush(daemon, "first connection")
        tried = len(relay.attempts)
        relay.reject.set()
        cut_at = time.monotonic()
        relay.drop_connections()

        def retried() -> bool:
            _check_not_stuck(daemon.poll("ws"))
            return len(relay.attempts) > tried

        wait_for(retried, 30, "a new connection attempt", daemon.describe)
        delay = relay.attempts[tried] - cut_at
        print(f"first retry {delay:.2f}s after the link that worked was cut")
        assert delay < 2.5, (
            f"the first retry after a working link came {delay:.1f}s after the cut, not within "
            f"BACKOFF_FIRST: the backoff grown by earlier failures was used\n{daemon.describe()}")
        relay.reject.clear()
        wait_reconnected(daemon)
        flush(daemon, "after the retry")
        assert_converged(daemon, ws)
    finally:
        relay.close()


def test_killed_sshd_child_reconnects_and_converges(
    sshd_factory: Callable[..., SshServer], daemon: Daemon, tmp_path: Path
) -> None:
    server = sshd_factory()  # its own server: every child of the listener serves this test
    ws = make_workspace(tmp_path, seed=int(os.environ.get("SYNCD_TEST_SEED", "4242")) + 7)
    try:
        add_session(daemon, server, ws, server.port, server.known_hosts)
        flush(daemon, "initial sync")
        assert server.process is not None
        ws.lc.start()
        ws.rc.start()
        time.sleep(1.5)
        children = _children(server.process.pid)
        assert children, "no sshd process serves the session"
        ws.lc.cut.set()
        ws.rc.cut.set()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        row = wait_disconnected(daemon)
        print(f"after SIGKILL of sshd {children}: state={row['state']} last_error={row['last_error']!r}")
        time.sleep(0.5)
        ws.lc.cut.clear()
        ws.rc.cut.clear()
        wait_reconnected(daemon)
        time.sleep(1.0)
        ws.lc.stop()
        ws.rc.stop()
        flush(daemon, "after the kill")
        assert set(_children(server.process.pid)).isdisjoint(children)
        assert_converged(daemon, ws)
    finally:
        ws.lc.halt.set()
        ws.rc.halt.set()


def _children(pid: int) -> list[int]:
    """Direct children of *pid*: one sshd per connection."""
    return [p for p in _descendants(pid) if _ppid(p) == pid]


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0
    return int(stat[stat.rfind(b")") + 2:].split()[1])
