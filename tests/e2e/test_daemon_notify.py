"""sd_notify as systemd sees it (a test NOTIFY_SOCKET), and SIGHUP configuration reloads."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.control.client import RemoteError
from tests.e2e.daemon_util import DaemonProc, make_pair, wait_until


class NotifyListener:
    """An AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, list[str]]] = []  # (monotonic time, fields)
        self._lock = threading.Lock()
        self.on_ready: list[object] = []
        self._ready_probe: Path | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, control_socket: Path) -> NotifyListener:
        self._ready_probe = control_socket
        self._thread.start()
        return self

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = data.decode().split("\n")
            if "READY=1" in fields and self._ready_probe is not None:
                # The moment READY=1 arrives, the control socket must already accept.
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(str(self._ready_probe))
                    self.on_ready.append(True)
                except OSError as exc:
                    self.on_ready.append(exc)
                finally:
                    probe.close()
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def fields(self) -> list[str]:
        with self._lock:
            return [f for _, fs in self.messages for f in fs]

    def times_of(self, field: str) -> list[float]:
        with self._lock:
            return [t for t, fs in self.messages if field in fs]

    def wait_for(self, field: str, timeout: float = 15.0) -> None:
        wait_until(lambda: field in self.fields(), timeout, message=lambda: f"{field}; got {self.fields()}")

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        self._thread.join(2)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    path = tmp_path / "notify.sock"
    if len(str(path)) > 100:
        pytest.skip(f"tmp path too long for an AF_UNIX address: {path}")
    listen = NotifyListener(path)
    yield listen
    listen.close()


def write_config(path: Path, sessions: dict[str, tuple[Path, Path]]) -> None:
    blocks = [f'[sessions.{name}]\nlocal = "{local}"\nremote = "local:{remote}"\n'
              for name, (local, remote) in sessions.items()]
    path.write_text("\n".join(blocks))


def test_ready_status_watchdog_stopping(tmp_path: Path, listener: NotifyListener) -> None:
    local, remote = make_pair(tmp_path, "static")
    config = tmp_path / "syncd.toml"
    write_config(config, {"static": (local, remote)})
    daemon = DaemonProc(tmp_path, config=config,
                        env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "400000"})
    listener.start(daemon.socket)
    daemon.spawn()
    try:
        listener.wait_for("READY=1")
        assert listener.on_ready == [True], f"READY=1 came before the socket listened: {listener.on_ready}"
        ready_at = listener.times_of("READY=1")[0]
        ready_message = next(fs for _, fs in listener.messages if "READY=1" in fs)
        # Sessions were loaded before READY: the summary sent with it counts the static one.
        assert any(f.startswith("STATUS=1 session") for f in ready_message), ready_message
        assert [r["name"] for r in daemon.rpc("list")] == ["static"]

        time.sleep(max(0.0, ready_at + 1.05 - time.monotonic()))
        in_first_second = [t for t in listener.times_of("WATCHDOG=1") if ready_at - 0.05 <= t <= ready_at + 1.05]
        assert len(in_first_second) >= 3, f"WATCHDOG=1 at {in_first_second} (READY at {ready_at})"
        statuses = [f for f in listener.fields() if f.startswith("STATUS=")]
        assert statuses and all(len(s) > len("STATUS=") and "\n" not in s for s in statuses), statuses
        # The summary follows the session: it reaches "watching" once synced.
        wait_until(lambda: any("watching" in f for f in listener.fields() if f.startswith("STATUS=")), 15,
                   message=lambda: f"a STATUS= with the session watching; got {listener.fields()}")

        # Without SYNCD_DEBUG_HOOKS=1 the hang hook is refused.
        with pytest.raises(RemoteError, match="disabled"):
            daemon.rpc("debug-hang", {"seconds": 5.0})

        assert "STOPPING=1" not in listener.fields()
        daemon.signal(signal.SIGTERM)
        assert daemon.proc is not None
        assert daemon.proc.wait(15) == 0, daemon.log()
        listener.wait_for("STOPPING=1", 5)
        stopping_at = listener.times_of("STOPPING=1")[0]
        assert listener.times_of("READY=1") == [ready_at], "READY=1 sent more than once"
        assert stopping_at > ready_at
    finally:
        daemon.stop()


def test_debug_hang_stops_the_watchdog(tmp_path: Path, listener: NotifyListener) -> None:
    daemon = DaemonProc(tmp_path, env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "200000",
                                       "SYNCD_DEBUG_HOOKS": "1"})
    listener.start(daemon.socket)
    daemon.spawn()
    try:
        listener.wait_for("READY=1")
        wait_until(lambda: len(listener.times_of("WATCHDOG=1")) >= 3, 5, message="a steady watchdog")
        hang = 1.5
        outcome: list[object] = []

        def hang_loop() -> None:
            try:
                outcome.append(daemon.rpc("debug-hang", {"seconds": hang}, timeout=30))
            except Exception as exc:  # noqa: BLE001 - reported below
                outcome.append(exc)

        thread = threading.Thread(target=hang_loop)
        asked = time.monotonic()
        thread.start()
        thread.join(30)
        answered = time.monotonic()
        assert outcome == [None], outcome
        assert answered - asked >= hang - 0.1
        wait_until(lambda: any(t > answered for t in listener.times_of("WATCHDOG=1")), 3,
                   message="WATCHDOG=1 again once the loop is free")
        beats = listener.times_of("WATCHDOG=1")
        # The loop was blocked for `hang` seconds ending just before the answer came back.
        during = [t for t in beats if answered - hang + 0.1 < t < answered - 0.05]
        assert during == [], f"WATCHDOG=1 sent while the loop was blocked: {during}"
        gaps = [b - a for a, b in zip(beats, beats[1:])]
        assert max(gaps) >= hang - 0.3, gaps
        before = [t for t in beats if t < asked]
        assert len(before) >= 3
        assert daemon.rpc("ping")["sessions"] == 0
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_sighup_reload_and_bad_config_keeps_the_old_one(tmp_path: Path) -> None:
    pair1 = make_pair(tmp_path, "static1")
    pair2 = make_pair(tmp_path, "static2")
    dyn_local, dyn_remote = make_pair(tmp_path, "dyn")
    config = tmp_path / "syncd.toml"
    write_config(config, {"static1": pair1})
    daemon = DaemonProc(tmp_path, config=config)
    daemon.start()

    def names() -> list[str]:
        return [r["name"] for r in daemon.rpc("list")]

    def reloads(word: str) -> int:
        return daemon.log().count(word)

    try:
        assert names() == ["static1"]
        daemon.rpc("add", {"name": "dyn", "spec": {"local": str(dyn_local), "remote": f"local:{dyn_remote}"}})
        with pytest.raises(RemoteError, match="declared in"):
            daemon.rpc("rm", {"name": "static1"})

        # A good change is picked up.
        write_config(config, {"static1": pair1, "static2": pair2})
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: names() == ["dyn", "static1", "static2"], 10, message=lambda: f"reload: {names()}")
        (pair2[0] / "via-reloaded.txt").write_text("r")
        daemon.rpc("flush", {"name": "static2", "timeout": 30.0})
        assert (pair2[1] / "via-reloaded.txt").read_text() == "r"

        # Malformed TOML: an error naming the file, and the old configuration stays.
        bad_cases = [
            ("malformed", '[sessions.static1\nlocal = "/oops"\n'),
            ("invalid session", '[sessions.static1]\nlocal = "relative/path"\nremote = "local:/x"\n'),
            ("unknown daemon setting", '[daemon]\nspeed = 11\n'),
        ]
        for label, text in bad_cases:
            before = reloads("keeping the current configuration")
            config.write_text(text)
            daemon.signal(signal.SIGHUP)
            wait_until(lambda n=before: reloads("keeping the current configuration") > n, 10,  # type: ignore[misc]
                       message=f"{label}: an error logged")
            line = [ln for ln in daemon.log().splitlines() if "keeping the current configuration" in ln][-1]
            assert line.startswith("ERROR"), line
            assert str(config) in line, line
            assert daemon.alive(), daemon.log()
            assert names() == ["dyn", "static1", "static2"], (label, names())
            assert daemon.rpc("status", {"name": "static1"})[0]["local"] == str(pair1[0])

        # The old sessions still sync after the failed reloads.
        (pair1[0] / "still-live.txt").write_text("s")
        daemon.rpc("flush", {"name": "static1", "timeout": 30.0})
        assert (pair1[1] / "still-live.txt").read_text() == "s"

        # A session dropped from the file goes; the dynamic one stays.
        write_config(config, {"static1": pair1})
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: names() == ["dyn", "static1"], 10, message=lambda: f"drop static2: {names()}")
    finally:
        with contextlib.suppress(OSError):
            config.write_text("")
        assert daemon.stop() == 0, daemon.log()
