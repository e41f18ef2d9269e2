"""The CLI against a real ``syncd daemon`` process over the real Unix socket.

Most tests share one daemon (module scope) and use session names of their own; the tests
about restarts, a second daemon and peer credentials start daemons of their own. Remotes are
``local:`` (the agent as a local subprocess); the unreachable remotes are ssh to a closed
port on 127.0.0.1 or to a listener that never answers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.control.client import RemoteError
from tests.e2e.daemon_util import (
    CLI,
    HEADER,
    BlackHole,
    DaemonProc,
    base_env,
    cli_many,
    closed_port,
    describe,
    frame,
    make_pair,
    ok_json,
    raw_exchange,
    read_reply,
    ssh_remote,
    wait_until,
)

EXIT_ERROR, EXIT_USAGE, EXIT_NO_DAEMON, EXIT_UNKNOWN, EXIT_TIMEOUT, EXIT_CONFLICTS = 1, 2, 3, 4, 6, 7

LIVE_STATES = ("watching", "scanning", "syncing")
STATUS_FIELDS = {
    "name", "local", "remote", "mode", "state", "last_error", "halt_reason", "last_cycle", "cycles",
    "pending_local", "pending_remote", "sent_files", "sent_bytes", "received_files", "received_bytes",
    "deleted", "conflicts", "errors", "unhashed",
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    proc = DaemonProc(tmp_path_factory.mktemp("daemon"))
    proc.start()
    yield proc
    status = proc.stop()
    assert status == 0, f"the shared daemon exited with {status} on SIGTERM:\n{proc.log()}"
    assert "Traceback" not in proc.log(), proc.log()


def status_of(daemon: DaemonProc, name: str) -> dict:
    return ok_json(daemon.cli("status", name, "--json"))["sessions"][0]


# ---------------------------------------------------------------------------------------
# socket, no daemon, unknown session
# ---------------------------------------------------------------------------------------


def test_socket_is_mode_0600(daemon: DaemonProc) -> None:
    st = os.stat(daemon.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_no_daemon_exits_3(tmp_path: Path) -> None:
    missing = tmp_path / "nothing" / "syncd.sock"
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(stale))  # a socket file nobody listens on
    by_option, by_env_stale = cli_many([
        ["list", "--socket", str(missing)],
        ["flush", "x", "--json"],
    ], env={"SYNCD_SOCKET": str(stale)})
    for result in (by_option, by_env_stale):
        assert result.returncode == EXIT_NO_DAEMON, describe(result)
        assert "not running" in result.stderr, describe(result)
        assert "Traceback" not in result.stderr, describe(result)


def test_unknown_session_exits_4(daemon: DaemonProc) -> None:
    s = ["--socket", str(daemon.socket)]
    results = cli_many([["status", "nope", "--json", *s], ["flush", "nope", "--timeout", "1", *s],
                        ["rm", "nope", *s]])
    for result in results:
        assert result.returncode == EXIT_UNKNOWN, describe(result)
        assert "nope" in result.stderr, describe(result)
    # The other commands share the CLI's code -> exit mapping; check the daemon's code.
    for cmd in ("pause", "resume", "conflicts"):
        with pytest.raises(RemoteError) as info:
            daemon.rpc(cmd, {"name": "nope"})
        assert info.value.code == "unknown-session", (cmd, info.value)


def test_flush_rejects_a_nonsense_timeout_as_usage(tmp_path: Path) -> None:
    sock = str(tmp_path / "none.sock")
    for result in cli_many([["flush", "x", "--timeout", value, "--socket", sock] for value in ("inf", "nan", "-20")]):
        assert result.returncode == EXIT_USAGE, describe(result)
        assert "Traceback" not in result.stderr, describe(result)


# ---------------------------------------------------------------------------------------
# add, flush, status, list, rm
# ---------------------------------------------------------------------------------------


def test_add_is_idempotent_and_refuses_other_endpoints(daemon: DaemonProc, tmp_path: Path) -> None:
    local, remote = make_pair(tmp_path, "idem")
    other = tmp_path / "idem-other"
    other.mkdir()
    s = ["--socket", str(daemon.socket)]
    first = daemon.cli("add", "idem", str(local), f"local:{remote}", "--ignore", "*.tmp")
    assert first.returncode == 0, describe(first)
    assert "added" in first.stdout

    same, other_remote = cli_many([
        ["add", "idem", str(local), f"local:{remote}", "--ignore", "*.tmp", *s],
        ["add", "idem", str(local), f"local:{other}", "--ignore", "*.tmp", *s],
    ])
    assert same.returncode == 0, describe(same)
    assert "unchanged" in same.stdout, describe(same)
    assert other_remote.returncode == EXIT_ERROR, describe(other_remote)
    assert "--replace" in other_remote.stderr, describe(other_remote)
    # Other options (the --ignore dropped) are "other settings" too.
    with pytest.raises(RemoteError) as info:
        daemon.rpc("add", {"name": "idem", "spec": {"local": str(local), "remote": f"local:{remote}"}})
    assert info.value.code == "exists"
    rows = {r["name"]: r for r in daemon.rpc("list")}
    assert rows["idem"]["remote"] == f"local:{remote}"

    replaced = daemon.cli("add", "idem", str(local), f"local:{other}", "--replace")
    assert replaced.returncode == 0, describe(replaced)
    assert "added" in replaced.stdout
    (local / "after-replace.txt").write_text("x")
    flushed = ok_json(daemon.cli("flush", "idem", "--timeout", "20", "--json"))
    assert flushed["remote"] == f"local:{other}"
    assert (other / "after-replace.txt").read_text() == "x"
    saved = tomllib.loads((daemon.state_dir / "sessions.toml").read_text())
    assert saved["sessions"]["idem"]["remote"] == f"local:{other}"
    assert saved["sessions"]["idem"]["ignore"] == []


def test_add_usage_errors_exit_2(daemon: DaemonProc, tmp_path: Path) -> None:
    s = ["--socket", str(daemon.socket)]
    results = cli_many([
        ["add", "bad name", str(tmp_path), f"local:{tmp_path}", *s],
        ["add", "ok", str(tmp_path), f"local:{tmp_path}", "--mode", "sideways", *s],
    ])
    for result in results:
        assert result.returncode == EXIT_USAGE, describe(result)
    names = [r["name"] for r in daemon.rpc("list")]
    assert "bad name" not in names and "ok" not in names


def test_flush_both_directions_status_and_list(daemon: DaemonProc, tmp_path: Path) -> None:
    local, remote = make_pair(tmp_path, "both")
    (local / "pre-existing.txt").write_text("before add\n")
    daemon.rpc("add", {"name": "both", "spec": {"local": str(local), "remote": f"local:{remote}"}})

    first = daemon.cli("flush", "both", "--timeout", "30")
    assert first.returncode == 0, describe(first)
    assert "in sync" in first.stdout
    assert (remote / "pre-existing.txt").read_text() == "before add\n"

    (local / "sub").mkdir()
    (local / "sub" / "to-remote.txt").write_text("L" * 1000)
    (remote / "to-local.txt").write_text("R" * 500)
    flushed = ok_json(daemon.cli("flush", "both", "--timeout", "30", "--json"))
    assert (remote / "sub" / "to-remote.txt").read_text() == "L" * 1000
    assert (local / "to-local.txt").read_text() == "R" * 500
    # The reply is the status at the barrier: nothing pending, idle.
    assert set(flushed) >= STATUS_FIELDS | {"flush_seconds"}, sorted(STATUS_FIELDS - set(flushed))
    assert isinstance(flushed["flush_seconds"], float)
    assert flushed["state"] == "watching", flushed
    assert flushed["pending_local"] == 0 and flushed["pending_remote"] == 0, flushed

    row = status_of(daemon, "both")
    assert set(row) >= STATUS_FIELDS, sorted(STATUS_FIELDS - set(row))
    assert row["name"] == "both"
    assert row["local"] == str(local) and row["remote"] == f"local:{remote}"
    assert row["mode"] == "two-way"
    assert row["state"] in LIVE_STATES, row  # an echo of our own writes may be re-checked
    assert isinstance(row["pending_local"], int) and isinstance(row["pending_remote"], int)
    assert row["sent_files"] >= 2 and row["sent_bytes"] >= 1000 + len("before add\n")
    assert row["received_files"] >= 1 and row["received_bytes"] >= 500
    assert row["conflicts"] == 0
    assert row["last_error"] == "" and row["halt_reason"] == "" and row["errors"] == []
    assert row["cycles"] >= 1 and row["last_cycle"] > time.time() - 120

    listed, table = cli_many([
        ["list", "--json", "--socket", str(daemon.socket)],
        ["status", "--socket", str(daemon.socket)],
    ])
    rows = {r["name"]: r for r in ok_json(listed)["sessions"]}
    assert set(rows["both"]) >= {"name", "local", "remote", "state"}
    assert rows["both"]["local"] == str(local)
    assert rows["both"]["state"] in LIVE_STATES
    assert table.returncode == 0 and "both" in table.stdout and "NAME" in table.stdout, describe(table)


def test_pause_holds_changes_and_resume_releases_them(daemon: DaemonProc, tmp_path: Path) -> None:
    local, remote = make_pair(tmp_path, "pz")
    daemon.rpc("add", {"name": "pz", "spec": {"local": str(local), "remote": f"local:{remote}"}})
    daemon.rpc("flush", {"name": "pz", "timeout": 30.0})

    paused = daemon.cli("pause", "pz")
    assert paused.returncode == 0, describe(paused)
    (local / "while-paused.txt").write_text("held")
    (remote / "remote-while-paused.txt").write_text("held too")
    # Status (a CLI start) plus a flush attempt give the daemon well over a second.
    status_result, flush_paused = cli_many([
        ["status", "pz", "--json", "--socket", str(daemon.socket)],
        ["flush", "pz", "--timeout", "2", "--socket", str(daemon.socket)],
    ])
    row = ok_json(status_result)["sessions"][0]
    assert row["state"] == "paused"
    assert flush_paused.returncode != 0, describe(flush_paused)
    assert "paused" in flush_paused.stderr, describe(flush_paused)
    time.sleep(0.3)
    assert not (remote / "while-paused.txt").exists()
    assert not (local / "remote-while-paused.txt").exists()
    saved = tomllib.loads((daemon.state_dir / "sessions.toml").read_text())
    assert saved["sessions"]["pz"]["paused"] is True

    resumed = daemon.cli("resume", "pz")
    assert resumed.returncode == 0, describe(resumed)
    daemon.rpc("flush", {"name": "pz", "timeout": 30.0})
    assert (remote / "while-paused.txt").read_text() == "held"
    assert (local / "remote-while-paused.txt").read_text() == "held too"
    saved = tomllib.loads((daemon.state_dir / "sessions.toml").read_text())
    assert saved["sessions"]["pz"]["paused"] is False


def test_rm_forgets_the_session_and_keeps_files(daemon: DaemonProc, tmp_path: Path) -> None:
    local, remote = make_pair(tmp_path, "gone")
    daemon.rpc("add", {"name": "gone", "spec": {"local": str(local), "remote": f"local:{remote}"}})
    (local / "kept.txt").write_text("k")
    daemon.rpc("flush", {"name": "gone", "timeout": 30.0})

    removed = daemon.cli("rm", "gone")
    assert removed.returncode == 0, describe(removed)
    assert "removed" in removed.stdout
    with pytest.raises(RemoteError) as info:
        daemon.rpc("rm", {"name": "gone"})
    assert info.value.code == "unknown-session"
    assert "gone" not in {r["name"] for r in daemon.rpc("list")}
    saved = tomllib.loads((daemon.state_dir / "sessions.toml").read_text())
    assert "gone" not in saved.get("sessions", {})
    assert (local / "kept.txt").read_text() == "k" and (remote / "kept.txt").read_text() == "k"
    (local / "after-rm.txt").write_text("not synced")
    time.sleep(0.3)
    assert not (remote / "after-rm.txt").exists()


# ---------------------------------------------------------------------------------------
# conflicts
# ---------------------------------------------------------------------------------------


def test_conflict_flush_exits_7_and_conflicts_lists_and_clears(daemon: DaemonProc, tmp_path: Path) -> None:
    local, remote = make_pair(tmp_path, "cf")
    (local / "doc.txt").write_text("base\n")
    daemon.rpc("add", {"name": "cf", "spec": {"local": str(local), "remote": f"local:{remote}"}})
    daemon.rpc("flush", {"name": "cf", "timeout": 30.0})
    assert (remote / "doc.txt").read_text() == "base\n"

    daemon.rpc("pause", {"name": "cf"})
    wait_until(lambda: daemon.rpc("status", {"name": "cf"})[0]["state"] == "paused", 5)
    (local / "doc.txt").write_text("local edit\n")
    (remote / "doc.txt").write_text("remote edit, longer\n")
    daemon.rpc("resume", {"name": "cf"})
    flushed = daemon.cli("flush", "cf", "--timeout", "30")
    assert flushed.returncode == EXIT_CONFLICTS, describe(flushed)
    assert "conflicts" in flushed.stderr

    listed = ok_json(daemon.cli("conflicts", "cf", "--json"))["conflicts"]
    assert len(listed) == 1, listed
    record = listed[0]
    assert {"path", "winner", "copy"} <= set(record), record
    assert record["path"] == "doc.txt"
    assert record["winner"] == "remote"  # the default policy
    assert record["copy"] != "doc.txt" and "conflict" in record["copy"]
    # The winner is on both sides; the loser is kept as the copy, nothing is lost.
    assert (local / "doc.txt").read_text() == "remote edit, longer\n"
    assert (remote / "doc.txt").read_text() == "remote edit, longer\n"
    assert (local / record["copy"]).read_text() == "local edit\n"

    cleared = daemon.cli("conflicts", "cf", "--clear")
    assert cleared.returncode == 0 and "doc.txt" in cleared.stdout, describe(cleared)
    assert daemon.rpc("conflicts", {"name": "cf"}) == []
    assert daemon.rpc("flush", {"name": "cf", "timeout": 30.0})["conflicts"] == 0
    assert (local / record["copy"]).read_text() == "local edit\n"  # --clear keeps the copies


# ---------------------------------------------------------------------------------------
# an unreachable remote
# ---------------------------------------------------------------------------------------


def test_flush_times_out_on_unreachable_remote(daemon: DaemonProc, tmp_path: Path) -> None:
    local = tmp_path / "dead-local"
    local.mkdir()
    port = closed_port()
    daemon.rpc("add", {"name": "dead", "spec": {"local": str(local),
                                                "remote": ssh_remote(port, tmp_path / "nowhere")}})
    try:
        started = time.monotonic()
        flushed = daemon.cli("flush", "dead", "--timeout", "1.5")
        elapsed = time.monotonic() - started
        assert flushed.returncode == EXIT_TIMEOUT, describe(flushed)
        assert elapsed < 8, f"flush --timeout 1.5 took {elapsed:.1f}s"

        def disconnected() -> dict | None:
            row = daemon.rpc("status", {"name": "dead"})[0]
            return row if row["state"] == "disconnected" and row["last_error"] else None

        wait_until(disconnected, 10, message="state disconnected with last_error")
        human = daemon.cli("status", "dead")
        assert human.returncode == 0, describe(human)
        assert "disconnected" in human.stdout or "connecting" in human.stdout, describe(human)
        assert "    ! " in human.stdout, describe(human)  # the last error, for people
    finally:
        daemon.rpc("rm", {"name": "dead"})


# ---------------------------------------------------------------------------------------
# malformed requests on the raw socket
# ---------------------------------------------------------------------------------------


def _garbage_cases() -> list[tuple[str, bytes]]:
    deep = b"\x91" * 5000 + b"\xc0"  # 5000 nested one-element arrays
    return [
        ("never-used msgpack byte", HEADER.pack(1) + b"\xc1"),
        ("trailing data after a map", HEADER.pack(2) + b"\x80\x01"),
        ("invalid utf-8 string", HEADER.pack(3) + b"\xa2\xff\xfe"),
        ("zero length", HEADER.pack(0)),
        ("length over the limit", HEADER.pack(1024 * 1024 + 1) + b"\x80"),
        ("huge length", b"\xff\xff\xff\xff" + b"\x00" * 64),
        ("not a map", frame([1, 2, 3])),
        ("no version", frame({"cmd": "list", "args": {}})),
        ("wrong version", frame({"v": 2, "cmd": "list", "args": {}})),
        ("unknown command", frame({"v": 1, "cmd": "explode", "args": {}})),
        ("pickle-looking command", frame({"v": 1, "cmd": "__reduce__", "args": {}})),
        ("args not a map", frame({"v": 1, "cmd": "list", "args": [1]})),
        ("unknown argument", frame({"v": 1, "cmd": "status", "args": {"name": "x", "evil": 1}})),
        ("wrong argument type", frame({"v": 1, "cmd": "flush", "args": {"name": 5}})),
        ("missing argument", frame({"v": 1, "cmd": "rm", "args": {}})),
        ("bad spec", frame({"v": 1, "cmd": "add", "args": {"name": "z", "spec": {"local": 1}}})),
        ("deeply nested", HEADER.pack(len(deep)) + deep),
        ("http request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    ]


def test_malformed_requests_get_an_error_and_the_daemon_keeps_serving(daemon: DaemonProc) -> None:
    for label, data in _garbage_cases():
        reply = raw_exchange(daemon.socket, data)
        if reply is not None:  # an error reply, or the connection closed: both are fine
            assert reply.get("ok") is False, (label, reply)
            assert isinstance(reply.get("code"), str) and isinstance(reply.get("message"), str), (label, reply)
        assert daemon.alive(), f"{label}: the daemon died:\n{daemon.log()}"
        assert daemon.rpc("ping")["pid"] == daemon.proc.pid  # type: ignore[union-attr]

    # Truncated requests: the client goes away mid-header and mid-body.
    for data in (b"\x00\x00", HEADER.pack(100) + b"\x80" * 10):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(daemon.socket))
            sock.sendall(data)

    # Two requests pipelined on one connection get two replies, in order.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(daemon.socket))
        sock.sendall(frame({"v": 1, "cmd": "ping", "args": {}}) + frame({"v": 1, "cmd": "list"}))
        first, second = read_reply(sock), read_reply(sock)
        assert first is not None and first["ok"] and "sessions" in first["result"], first
        assert second is not None and second["ok"] and isinstance(second["result"], list), second

    # A client stuck mid-request does not block the others.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stuck:
        stuck.connect(str(daemon.socket))
        stuck.sendall(HEADER.pack(50) + b"\x80")
        listed = daemon.cli("list", "--json")
        assert listed.returncode == 0, describe(listed)
        assert isinstance(ok_json(listed)["sessions"], list)
    assert "unexpected error" not in daemon.log(), daemon.log()


# ---------------------------------------------------------------------------------------
# restart, second daemon
# ---------------------------------------------------------------------------------------


def test_restart_keeps_sessions_without_resync(tmp_path: Path) -> None:
    daemon = DaemonProc(tmp_path)
    local, remote = make_pair(tmp_path, "keep")
    local2, remote2 = make_pair(tmp_path, "held")
    (local / "big.bin").write_bytes(os.urandom(300_000))
    (local / "small.txt").write_text("unchanged\n")
    (remote / "from-remote.txt").write_text("remote\n")
    daemon.start()
    try:
        daemon.rpc("add", {"name": "keep", "spec": {"local": str(local), "remote": f"local:{remote}"}})
        daemon.rpc("add", {"name": "held", "spec": {"local": str(local2), "remote": f"local:{remote2}"}})
        first = daemon.rpc("flush", {"name": "keep", "timeout": 30.0})
        assert first["sent_files"] == 2 and first["received_files"] == 1, first
        daemon.rpc("pause", {"name": "held"})
        started = time.monotonic()
        assert daemon.stop() == 0, daemon.log()
        assert time.monotonic() - started < 10
        assert not daemon.socket.exists(), "the socket file was left behind after SIGTERM"

        daemon.start()
        rows = {r["name"]: r for r in ok_json(daemon.cli("status", "--json"))["sessions"]}
        assert set(rows) == {"keep", "held"}, rows
        assert rows["held"]["state"] == "paused", rows["held"]
        again = ok_json(daemon.cli("flush", "keep", "--timeout", "30", "--json"))
        assert again["sent_files"] == 0 and again["received_files"] == 0, f"resynced after restart: {again}"
        assert again["sent_bytes"] == 0 and again["received_bytes"] == 0, again
        assert again["conflicts"] == 0 and again["deleted"] == 0, again

        # and it is live: a change after the restart travels, and only that one.
        (remote / "after-restart.txt").write_text("new")
        after = daemon.rpc("flush", {"name": "keep", "timeout": 30.0})
        assert (local / "after-restart.txt").read_text() == "new"
        assert after["received_files"] == 1 and after["sent_files"] == 0, after
    finally:
        daemon.stop()


def test_second_daemon_refuses_to_start(tmp_path: Path) -> None:
    first = DaemonProc(tmp_path / "one")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (tmp_path / "three").mkdir()
    first.start()
    try:
        same_socket = DaemonProc(tmp_path / "two", socket_path=first.socket, log_name="same-socket.log")
        same_state = DaemonProc(tmp_path / "three", state_dir=first.state_dir, log_name="same-state.log")
        procs = [same_socket.spawn(), same_state.spawn()]
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError("a second daemon did not refuse to start") from None
        assert procs[0].returncode != 0, same_socket.log()
        assert "another syncd daemon is listening on" in same_socket.log(), same_socket.log()
        assert str(first.socket) in same_socket.log()
        assert procs[1].returncode != 0, same_state.log()
        assert "another syncd daemon uses the state directory" in same_state.log(), same_state.log()
        for log in (same_socket.log(), same_state.log()):
            assert "Traceback" not in log, log
        assert not same_state.socket.exists()
        # The first daemon is unharmed: its socket is still there and it still answers.
        assert first.socket.exists()
        assert first.rpc("ping")["pid"] == first.proc.pid  # type: ignore[union-attr]
    finally:
        assert first.stop() == 0, first.log()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    """A socket file left by a daemon that was SIGKILLed does not stop the next one."""
    daemon = DaemonProc(tmp_path)
    daemon.start()
    daemon.kill()
    assert daemon.socket.exists()
    daemon.start()
    try:
        assert daemon.rpc("list") == []
    finally:
        assert daemon.stop() == 0


# ---------------------------------------------------------------------------------------
# peer credentials
# ---------------------------------------------------------------------------------------


def _setpriv_argv() -> list[str]:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    if os.geteuid() != 0:
        pytest.skip("running a client as another uid needs root")
    base = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    # CAP_DAC_READ_SEARCH lets uid 65534 read this interpreter and checkout wherever they
    # live (e.g. under a 0700 /root); it does not grant write access, so connecting still
    # needs the socket's 0666 mode, and SO_PEERCRED still reports uid 65534.
    probe = [*base, "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    check = subprocess.run([*probe, sys.executable, "-c", "import os, syncd.cli; print(os.getuid())"],
                           capture_output=True, text=True, env=base_env(), check=False)
    if check.returncode == 0 and check.stdout.strip() == "65534":
        return probe
    check = subprocess.run([*base, sys.executable, "-c", "import os, syncd.cli; print(os.getuid())"],
                           capture_output=True, text=True, env=base_env(), check=False)
    if check.returncode == 0 and check.stdout.strip() == "65534":
        return base
    pytest.skip(f"cannot run the syncd CLI as uid 65534: {check.stderr.strip()[-300:]}")


@pytest.fixture(scope="module")
def peer_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, list[str]]]:
    """A daemon whose socket uid 65534 can reach: a world-traversable directory (tmp_path
    is 0700) and the socket chmod 0666, so that only SO_PEERCRED stands in the way."""
    argv = _setpriv_argv()
    open_dir = Path(tempfile.mkdtemp(prefix="syncd-peercred-"))
    os.chmod(open_dir, 0o711)
    daemon = DaemonProc(tmp_path_factory.mktemp("peer"), socket_path=open_dir / "run" / "syncd.sock")
    try:
        daemon.start()
        os.chmod(open_dir / "run", 0o711)
        os.chmod(daemon.socket, 0o666)
        yield daemon, argv
    finally:
        with contextlib.suppress(OSError):
            os.chmod(daemon.socket, 0o600)
        status = daemon.stop()
        shutil.rmtree(open_dir, ignore_errors=True)
        assert status == 0, daemon.log()


def _as_nobody(argv: list[str], daemon: DaemonProc, runs: int) -> list[subprocess.CompletedProcess[str]]:
    command = [*argv, *CLI, "list", "--json", "--socket", str(daemon.socket)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base_env(),
                              cwd="/", stdin=subprocess.DEVNULL) for _ in range(runs)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        results.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
    return results


def test_other_uid_is_refused_and_logged(peer_daemon: tuple[DaemonProc, list[str]]) -> None:
    daemon, argv = peer_daemon
    local = daemon.base / "secret"
    local.mkdir()
    daemon.rpc("add", {"name": "secret", "spec": {"local": str(local), "remote": f"local:{daemon.base}/r"}})
    (result,) = _as_nobody(argv, daemon, 1)
    assert result.returncode not in (0, EXIT_NO_DAEMON), describe(result)
    assert "secret" not in result.stdout, describe(result)
    wait_until(lambda: "refused a connection" in daemon.log(), 5, message="a logged refusal")
    refusals = [line for line in daemon.log().splitlines() if "refused a connection" in line]
    assert any("uid 65534" in line for line in refusals), refusals
    # The owner (root here) is still served, over the same 0666 socket.
    assert [r["name"] for r in daemon.rpc("list")] == ["secret"]


def test_other_uid_refusal_says_permission_denied(peer_daemon: tuple[DaemonProc, list[str]]) -> None:
    daemon, argv = peer_daemon
    for result in _as_nobody(argv, daemon, 4):
        assert result.returncode not in (0, EXIT_NO_DAEMON), describe(result)
        assert "permission denied" in result.stderr.lower(), describe(result)
        assert "Traceback" not in result.stderr, describe(result)


def test_sigterm_while_a_session_connects_exits_0(tmp_path: Path) -> None:
    """SIGTERM with a session stuck connecting (a dead remote) still stops promptly and cleanly."""
    daemon = DaemonProc(tmp_path)
    daemon.start()
    local = tmp_path / "l"
    local.mkdir()
    daemon.rpc("add", {"name": "stuck", "spec": {"local": str(local),
                                                 "remote": ssh_remote(closed_port(), tmp_path / "r")}})
    time.sleep(0.3)
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.proc is not None
    assert daemon.proc.wait(15) == 0, daemon.log()
    assert time.monotonic() - started < 10


def test_a_crash_leaves_the_stack_of_every_thread_in_the_log(tmp_path: Path) -> None:
    """A fatal signal (a fault in an extension) does not go unexplained: the journal gets
    each thread's Python stack."""
    daemon = DaemonProc(tmp_path)
    daemon.start()
    daemon.signal(signal.SIGSEGV)
    assert daemon.proc is not None
    assert daemon.proc.wait(15) == -signal.SIGSEGV
    log = daemon.log()
    assert "Fatal Python error: Segmentation fault" in log, log
    assert "most recent call first" in log, log


def test_session_recovers_after_the_remote_comes_back(tmp_path: Path) -> None:
    """The first connection attempts fail (the remote's python refuses to start); once the
    remote works again, the retry with backoff connects and syncs, and last_error always
    named the real cause."""
    local, remote = make_pair(tmp_path, "flaky")
    (local / "waiting.txt").write_text("w")
    flag = tmp_path / "remote-is-up"
    wrapper = tmp_path / "flaky-python"
    wrapper.write_text(f'#!/bin/sh\n[ -e "{flag}" ] || {{ echo "remote not ready" >&2; exit 1; }}\n'
                       f'exec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    daemon = DaemonProc(tmp_path)
    daemon.start()
    try:
        daemon.rpc("add", {"name": "flaky", "spec": {"local": str(local), "remote": f"local:{remote}",
                                                     "remote_python": str(wrapper)}})
        errors: list[str] = []

        def failed_once() -> bool:
            row = daemon.rpc("status", {"name": "flaky"})[0]
            if row["last_error"]:
                errors.append(row["last_error"])
            return bool(row["last_error"])

        wait_until(failed_once, 10, message="a first failed attempt")
        assert "remote not ready" in errors[-1], errors
        flag.touch()

        def connected() -> bool:
            row = daemon.rpc("status", {"name": "flaky"})[0]
            if row["last_error"] and row["last_error"] not in errors:
                errors.append(row["last_error"])
            assert "another syncd process" not in row["last_error"], errors
            return bool(row["state"] == "watching")

        wait_until(connected, 15, interval=0.1, message=lambda: f"reconnection; errors: {errors}")
        daemon.rpc("flush", {"name": "flaky", "timeout": 20.0})
        assert (remote / "waiting.txt").read_text() == "w"
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_agents_started_with_the_daemon_keep_a_normal_umask(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    local, remote = make_pair(tmp_path, "boot")
    config = tmp_path / "syncd.toml"
    config.write_text(f'[sessions.boot]\nlocal = "{local}"\nremote = "local:{remote}"\n')
    daemon = DaemonProc(tmp_path, config=config, env={"HOME": str(home)})
    daemon.start()
    try:
        daemon.rpc("flush", {"name": "boot", "timeout": 30.0})
        cache = home / ".cache" / "syncd"  # made by the agent loader: os.makedirs(d, mode=0o700)
        assert cache.is_dir()
        assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700, oct(os.stat(cache).st_mode)
        assert stat.S_IMODE(os.stat(home / ".cache").st_mode) == 0o755, oct(os.stat(home / ".cache").st_mode)
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_sigterm_with_a_hung_remote_exits_promptly(tmp_path: Path) -> None:
    hole = BlackHole()
    daemon = DaemonProc(tmp_path)
    try:
        daemon.start()
        local = tmp_path / "l"
        local.mkdir()
        daemon.rpc("add", {"name": "hung", "spec": {"local": str(local),
                                                    "remote": ssh_remote(hole.port, tmp_path / "r")}})
        wait_until(lambda: hole.accepted, 10, message="the ssh connection attempt")
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.proc is not None
        try:
            status = daemon.proc.wait(5)
        except subprocess.TimeoutExpired:
            hole.close()  # let it go, then report
            daemon.proc.wait(30)
            pytest.fail(f"SIGTERM took {time.monotonic() - started:.1f}s with a session stuck connecting")
        assert status == 0, daemon.log()
    finally:
        hole.close()
        daemon.stop()
