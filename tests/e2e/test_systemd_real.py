"""The real service under a real systemd booted as PID 1 of fresh namespaces (issue 4).

systemd runs as ``unshare --pid --fork --mount --mount-proc`` (plus ``--cgroup --uts``, see
``systemd_util``) with fresh tmpfs on /tmp, /var/tmp, /run and /etc/systemd/system; the
units live in /run/systemd/system. It is driven with ``nsenter -t PID -m -p systemctl``
and PID 1 is killed at the end, whatever happens.

The unit is ``systemd/syncd.service`` as shipped, with these changes (:func:`service_unit`):

- ``DefaultDependencies=no`` and no ``After=/Wants=network-online.target``: nothing but
  the test target is booted.
- ``ExecStart=`` the real ``syncd`` script with ``daemon --socket`` in the test directory
  (reachable from outside the namespace, whose /run is its own); ``RestartSec=1``,
  ``WatchdogSec=3`` to keep the test short.
- ``StateDirectory=``/``StateDirectoryMode=`` dropped for ``STATE_DIRECTORY=`` pointing
  into the test directory: /var/lib is the host's real one, and the test must not create
  /var/lib/syncd there.
- ``SYNCD_DEBUG_HOOKS=1`` (the ``debug-hang`` request), ``PYTHONPATH`` = this checkout,
  output appended to a log file (no journald runs), ``LimitCORE=0`` (the watchdog's SIGABRT
  must not leave a core file in the host's /, which is the service's working directory).

Every sandboxing option of the shipped unit is kept: they all work under this systemd.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from syncd.control import wire
from syncd.control.client import RemoteError, call
from tests.e2e.daemon_util import wait_until
from tests.e2e.systemd_util import (
    REPO_ROOT,
    UNITS_DIR,
    IsolatedSystemd,
    isolation_missing_reason,
    parse_unit,
    real_syncd,
    render_unit,
)

pytestmark = pytest.mark.timeout(90)

UNIT = "syncd-e2e.service"
TARGET = "syncd-e2e.target"
WATCHDOG_SEC = 3
T = TypeVar("T")


def service_unit(syncd: str, socket_path: Path, state_dir: Path, log_path: Path) -> str:
    """systemd/syncd.service adapted to the isolated systemd (see the module doc)."""
    sections = parse_unit((UNITS_DIR / "syncd.service").read_text())
    drop = {
        "Unit": {"After", "Wants"},
        "Service": {"ExecStart", "RestartSec", "WatchdogSec", "StateDirectory", "StateDirectoryMode"},
    }
    out: list[tuple[str, list[tuple[str, str]]]] = []
    for name, items in sections:
        if name == "Install":
            continue
        kept = [(k, v) for k, v in items if k not in drop.get(name, set())]
        if name == "Unit":
            kept.append(("DefaultDependencies", "no"))
        if name == "Service":
            assert ("Type", "notify") in kept and ("Restart", "on-failure") in kept, kept
            kept += [
                ("ExecStart", f"{syncd} daemon --socket {socket_path}"),
                ("RestartSec", "1"),
                ("WatchdogSec", str(WATCHDOG_SEC)),
                ("Environment", f"STATE_DIRECTORY={state_dir} SYNCD_DEBUG_HOOKS=1 PYTHONPATH={REPO_ROOT}"),
                ("StandardOutput", f"append:{log_path}"),
                ("StandardError", "inherit"),
                ("LimitCORE", "0"),
            ]
        out.append((name, kept))
    return render_unit(out)


TARGET_UNIT = f"""[Unit]
Description=syncd end-to-end test target
DefaultDependencies=no
Wants={UNIT}
"""


class Rig:
    def __init__(self, sd: IsolatedSystemd, base: Path) -> None:
        self.sd = sd
        self.base = base
        self.socket = base / "sock" / "syncd.sock"
        self.state = base / "state"
        self.log = base / "daemon.log"

    def describe(self) -> str:
        try:
            daemon = self.log.read_text(errors="replace")[-6000:]
        except OSError:
            daemon = "(no daemon log)"
        status = self.sd.systemctl("status", UNIT, check=False).stdout
        return f"--- systemctl status ---\n{status}\n--- daemon log ---\n{daemon}\n{self.sd.describe()}"

    def show(self) -> dict[str, str]:
        return self.sd.show(UNIT, "ActiveState", "SubState", "Result", "MainPID", "NRestarts",
                            "StatusText", "ExecMainStatus", "ExecMainCode")

    def wait(self, predicate: Callable[[], T], timeout: float, what: str) -> T:
        value: T = wait_until(predicate, timeout, 0.1,
                              message=lambda: f"{what}; unit: {self.show()}\n{self.describe()}")
        return value

    def wait_running(self, timeout: float = 20.0, *, other_than: str = "") -> dict[str, str]:
        """Wait for active (running) with a STATUS= and a MainPID other than *other_than*."""
        def ready() -> dict[str, str] | None:
            props = self.show()
            ok = (props["ActiveState"], props["SubState"]) == ("active", "running") and props["StatusText"]
            return props if ok and props["MainPID"] not in ("0", other_than) else None

        return self.wait(ready, timeout, "active (running) with a STATUS")

    def ensure_running(self) -> dict[str, str]:
        self.sd.systemctl("start", UNIT, timeout=30)
        return self.wait_running()

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), SYNCD_SOCKET=str(self.socket))
        return subprocess.run([sys.executable, "-m", "syncd.cli", *args], capture_output=True, text=True,
                              timeout=timeout, env=env, stdin=subprocess.DEVNULL, check=False)

    def workspace(self) -> tuple[Path, Path]:
        local, remote = self.base / "ws-local", self.base / "ws-remote"
        local.mkdir(exist_ok=True)
        remote.mkdir(exist_ok=True)
        return local, remote

    def add_session(self) -> tuple[Path, Path]:
        """Session "ws" (local: remote); `add` is idempotent, so tests may call it again."""
        local, remote = self.workspace()
        added = self.cli("add", "ws", str(local), f"local:{remote}")
        assert added.returncode == 0, f"{added.stdout}{added.stderr}\n{self.describe()}"
        return local, remote

    def assert_session_survived(self, tag: str) -> None:
        """After a restart: "ws" is still there (from the state directory) and syncs."""
        listed = self.cli("list", "--json")
        assert listed.returncode == 0 and '"ws"' in listed.stdout, f"{listed.stdout}{listed.stderr}"
        local, remote = self.workspace()
        (remote / f"{tag}.txt").write_text(tag)
        flushed = self.cli("flush", "ws", "--timeout", "30")
        assert flushed.returncode == 0, f"{flushed.stdout}{flushed.stderr}\n{self.describe()}"
        assert (local / f"{tag}.txt").read_text() == tag

    def read_only_mounts(self, pid: str) -> set[str]:
        """Mount points that are read-only for process *pid* (a pid inside the namespace)."""
        mounts = self.sd.nsenter("cat", f"/proc/{pid}/mountinfo").stdout
        return {fields[4] for fields in (line.split() for line in mounts.splitlines())
                if "ro" in fields[5].split(",")}

    def call(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        return call(str(self.socket), cmd, args, timeout)


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    reason = isolation_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    syncd = real_syncd()
    if syncd is None:
        pytest.skip("no syncd console script (pip install -e .)")
    # Not under /tmp: that is a fresh tmpfs inside the namespace.
    base = Path("/var/lib") / f"syncd-e2e-{uuid.uuid4().hex[:10]}"
    base.mkdir(mode=0o700)
    (base / "sock").mkdir()
    (base / "state").mkdir()
    units = {TARGET: TARGET_UNIT}
    sd = IsolatedSystemd(base / "systemd", units, TARGET)
    r = Rig(sd, base)
    units[UNIT] = service_unit(syncd, r.socket, r.state, r.log)
    try:
        with sd:
            yield r
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_unit_reaches_active_running_with_status(rig: Rig) -> None:
    props = rig.ensure_running()
    assert re.match(r"^\d+ sessions?\b", props["StatusText"]), props
    assert rig.call("ping")["pid"] == int(props["MainPID"]), rig.describe()
    assert rig.socket.exists() and oct(rig.socket.stat().st_mode & 0o777) == "0o600"


def test_session_added_over_the_socket_syncs(rig: Rig) -> None:
    rig.ensure_running()
    local, remote = rig.workspace()
    (local / "from-local.txt").write_text("hello from local\n")
    (remote / "from-remote.txt").write_text("hello from remote\n")
    rig.add_session()
    flushed = rig.cli("flush", "ws", "--timeout", "30")
    assert flushed.returncode == 0, f"{flushed.stdout}{flushed.stderr}\n{rig.describe()}"
    assert (remote / "from-local.txt").read_text() == "hello from local\n"
    assert (local / "from-remote.txt").read_text() == "hello from remote\n"
    rig.wait(lambda: re.match(r"^1 sessions?\b", rig.show()["StatusText"]), 10, "STATUS= to count the session")
    (local / "second.txt").write_text("second\n")
    flushed = rig.cli("flush", "ws", "--timeout", "30")
    assert flushed.returncode == 0, f"{flushed.stdout}{flushed.stderr}\n{rig.describe()}"
    assert (remote / "second.txt").read_text() == "second\n"


def test_shipped_sandboxing_is_in_force(rig: Rig) -> None:
    """The options kept from systemd/syncd.service really apply to the daemon."""
    pid = rig.ensure_running()["MainPID"]
    status = rig.sd.nsenter("cat", f"/proc/{pid}/status").stdout
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
    assert re.search(r"^Seccomp:\s+2$", status, re.M), status  # RestrictAddressFamilies= etc.
    read_only = rig.read_only_mounts(pid)
    outside = rig.read_only_mounts("1")
    # ProtectSystem=full: /usr and /etc; ProtectKernelTunables=: /sys (all writable for PID 1).
    for path in ("/usr", "/etc", "/sys"):
        assert path not in outside, f"{path} is read-only for systemd itself: the check proves nothing"
        assert path in read_only, f"{path} is writable for the daemon: {sorted(read_only)}"
    assert str(rig.state) not in read_only


def test_stop_is_clean(rig: Rig) -> None:
    rig.ensure_running()
    rig.sd.systemctl("stop", UNIT, timeout=40)
    props = rig.show()
    assert props["ActiveState"] == "inactive", f"{props}\n{rig.describe()}"
    assert props["Result"] == "success", f"{props}\n{rig.describe()}"
    assert props["ExecMainCode"] == "1" and props["ExecMainStatus"] == "0", (
        f"the daemon did not exit 0 on SIGTERM: {props}\n{rig.describe()}")
    assert not rig.socket.exists(), "the socket was left behind"


def test_sigkilled_daemon_is_restarted(rig: Rig) -> None:
    before = rig.ensure_running()
    rig.add_session()
    restarts = int(before["NRestarts"])
    rig.sd.systemctl("kill", "-s", "KILL", UNIT)
    after = rig.wait(
        lambda: (p := rig.show())["NRestarts"] != str(restarts) and p,
        15, "a restart after SIGKILL",
    )
    assert int(after["NRestarts"]) == restarts + 1, after
    props = rig.wait_running(15, other_than=before["MainPID"])
    assert rig.call("ping")["pid"] == int(props["MainPID"])
    assert "status=9/KILL" in rig.sd.log(), rig.describe()
    rig.assert_session_survived("after-sigkill")


def test_hung_loop_is_killed_by_the_watchdog_and_restarted(rig: Rig) -> None:
    before = rig.ensure_running()
    rig.add_session()
    restarts = int(before["NRestarts"])
    started = time.monotonic()
    try:
        rig.call("debug-hang", {"seconds": 3600}, timeout=1)
    except RemoteError as exc:  # the reply never comes: the loop is blocked
        assert exc.code == wire.E_TIMEOUT, exc
    else:
        raise AssertionError("debug-hang returned: are SYNCD_DEBUG_HOOKS honoured?\n" + rig.describe())
    after = rig.wait(
        lambda: (p := rig.show())["NRestarts"] != str(restarts) and p,
        WATCHDOG_SEC + 15, "the watchdog to restart the hung daemon",
    )
    elapsed = time.monotonic() - started
    assert int(after["NRestarts"]) == restarts + 1, after
    assert elapsed >= WATCHDOG_SEC - 1, f"restarted after {elapsed:.1f}s: before the watchdog could fire"
    props = rig.wait_running(15, other_than=before["MainPID"])
    assert rig.call("ping")["pid"] == int(props["MainPID"])
    log = rig.sd.log()
    assert f"{UNIT}: Watchdog timeout" in log and "Failed with result 'watchdog'" in log, (
        f"systemd did not report a watchdog kill\n{rig.describe()}")
    rig.assert_session_survived("after-watchdog")

