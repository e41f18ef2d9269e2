"""Fan-out: 20 live sessions in one daemon, plus dead remotes that must not stall them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.control.client import RemoteError
from tests.e2e.daemon_util import BlackHole, DaemonProc, closed_port, make_pair, ok_json, ssh_remote, wait_until

LIVE = 20
FLUSH_LIMIT = 5.0


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    hole = BlackHole()
    yield hole
    hole.close()


def test_twenty_live_sessions_and_dead_remotes_do_not_stall_them(tmp_path: Path, black_hole: BlackHole) -> None:
    daemon = DaemonProc(tmp_path)
    daemon.start()
    try:
        pairs = {f"s{i:02d}": make_pair(tmp_path, f"s{i:02d}") for i in range(LIVE)}
        # Dead remotes first, so that they are already retrying while the others start.
        dead_local = tmp_path / "dead-local"
        dead_local.mkdir()
        daemon.rpc("add", {"name": "refused", "spec": {"local": str(dead_local),
                                                       "remote": ssh_remote(closed_port(), "/nowhere")}})
        daemon.rpc("add", {"name": "silent", "spec": {"local": str(dead_local),
                                                      "remote": ssh_remote(black_hole.port, "/nowhere")}})
        for name, (local, remote) in pairs.items():
            (local / "seed.txt").write_text(name)
            daemon.rpc("add", {"name": name, "spec": {"local": str(local), "remote": f"local:{remote}"}})

        def states() -> dict[str, str]:
            return {r["name"]: r["state"] for r in daemon.rpc("list")}

        wait_until(lambda: all(states()[n] == "watching" for n in pairs), 60, interval=0.1,
                   message=lambda: f"all {LIVE} sessions watching: {states()}")
        for name, (_, remote) in pairs.items():
            assert (remote / "seed.txt").read_text() == name
        assert states()["refused"] in ("disconnected", "connecting")
        assert states()["silent"] == "connecting"  # stuck in the TCP/SSH handshake
        assert black_hole.accepted, "the silent remote was never dialled"

        # A flush on the silent session is pending in the daemon while the others run.
        pending: list[object] = []

        def flush_silent() -> None:
            try:
                pending.append(daemon.rpc("flush", {"name": "silent", "timeout": 5.0}))
            except RemoteError as exc:
                pending.append(exc.code)

        waiter = threading.Thread(target=flush_silent)
        waiter.start()
        time.sleep(0.1)

        # One edit per session, alternating sides; each travels live, without a flush.
        expected: dict[str, Path] = {}
        for i, (name, (local, remote)) in enumerate(pairs.items()):
            src, dst = (local, remote) if i % 2 == 0 else (remote, local)
            (src / f"edit-{name}.txt").write_text(f"edit {name}")
            expected[name] = dst / f"edit-{name}.txt"
        wait_until(lambda: all(p.exists() for p in expected.values()), 20, interval=0.05,
                   message=lambda: f"live edits: missing {[n for n, p in expected.items() if not p.exists()]}")
        assert waiter.is_alive(), "the silent session's flush should still be pending"

        # And each flush (a full barrier) is quick, with the silent flush still pending.
        durations: dict[str, float] = {}
        for name in pairs:
            started = time.monotonic()
            row = daemon.rpc("flush", {"name": name, "timeout": 30.0})
            durations[name] = time.monotonic() - started
            assert row["state"] == "watching" and row["pending_local"] == row["pending_remote"] == 0, row
            assert expected[name].read_text() == f"edit {name}"
        slow = {n: round(d, 2) for n, d in durations.items() if d >= FLUSH_LIMIT}
        assert not slow, f"flushes over {FLUSH_LIMIT}s: {slow}"

        for name in ("refused", "silent"):
            with pytest.raises(RemoteError) as info:
                daemon.rpc("flush", {"name": name, "timeout": 0.5})
            assert info.value.code == "timeout", (name, info.value)
        waiter.join(20)
        assert pending == ["timeout"], pending

        rows = {r["name"]: r for r in ok_json(daemon.cli("status", "--json"))["sessions"]}
        assert len(rows) == LIVE + 2
        assert all(rows[n]["state"] in ("watching", "scanning", "syncing") for n in pairs), rows
        assert all(not rows[n]["last_error"] and not rows[n]["errors"] for n in pairs), rows
        assert rows["refused"]["last_error"], rows["refused"]
        assert daemon.alive()
    finally:
        # Hang up on the silent remote first: a session stuck in the SSH handshake holds up
        # SIGTERM until asyncssh's connect timeout (see test_sigterm_with_a_hung_remote_...).
        black_hole.close()
        assert daemon.stop() == 0, daemon.log()
