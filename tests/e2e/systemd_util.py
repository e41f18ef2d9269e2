"""Helpers for the systemd tests (``tests/e2e/test_systemd_*.py``).

- :func:`real_syncd`: the ``syncd`` console script of the python running the tests.
- :func:`unit_with_exec`: a shipped unit with its ExecStart binary replaced.
- :class:`IsolatedSystemd`: a real ``/lib/systemd/systemd --system`` booted as PID 1 of a
  fresh PID, mount, cgroup and UTS namespace, driven with ``nsenter ... systemctl``.

Isolation of :class:`IsolatedSystemd` (systemd as PID 1 would otherwise change the host):

- ``unshare --pid --fork --mount --mount-proc`` as issue 4 asks, then ``mount
  --make-rprivate /`` so nothing mounted inside propagates out, and fresh tmpfs on
  ``/tmp``, ``/var/tmp``, ``/run`` and ``/etc/systemd/system`` (systemd's boot-time
  clean-up would otherwise empty the host's real /tmp). Test files therefore live under
  a directory in ``/var/lib`` made by the test, never under /tmp.
- ``--cgroup`` too: the namespace is started inside a fresh cgroup v2 directory made for it,
  and a cgroup2 file system mounted over ``/sys/fs/cgroup`` inside the namespace shows only
  that directory. Without it, systemd takes the host's cgroup v1 hierarchies for its own,
  creates ``init.scope`` in each and moves itself out of the memory cgroup the test runs
  in (seen on this machine).
- ``--uts``: systemd sets the host name at boot.
- ``/proc/sys`` is bind-mounted read-only: systemd raises ``fs.file-max`` and other global
  sysctls at boot (``fs.file-max`` went to 2^63-1 on this machine without it).
- systemd's console is a pty bind-mounted on ``/dev/console``; a thread copies what it
  prints to a log file under the test's directory.
"""

from __future__ import annotations

import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
UNITS_DIR = REPO_ROOT / "systemd"
SYSTEMD = Path("/lib/systemd/systemd")
BOOT_TIMEOUT = 20.0


def real_syncd() -> Optional[str]:
    """The ``syncd`` console script next to the running python, else the one on PATH.

    A pyenv shim on PATH is a shell script that needs the caller's environment; the script
    next to ``sys.executable`` runs with the bare environment systemd gives a service.
    """
    beside = Path(sys.executable).parent / "syncd"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("syncd")
    return os.path.realpath(found) if found else None


def unit_with_exec(text: str, binary: str) -> str:
    """*text* with the binary of every ``ExecStart=`` line replaced by *binary*."""
    out = []
    replaced = 0
    for line in text.splitlines():
        if line.startswith("ExecStart="):
            argv = line[len("ExecStart="):].split(None, 1)
            assert argv and argv[0].endswith("/syncd"), f"unexpected ExecStart line: {line}"
            line = "ExecStart=" + " ".join([binary, *argv[1:]])
            replaced += 1
        out.append(line)
    assert replaced == 1, f"expected one ExecStart= line, found {replaced}"
    return "\n".join(out) + "\n"


def parse_unit(text: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """``[(section, [(key, value), ...]), ...]`` in file order (comments dropped)."""
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            sections.append((line[1:-1], []))
            continue
        key, _, value = line.partition("=")
        assert sections, f"setting outside a section: {raw}"
        sections[-1][1].append((key.strip(), value.strip()))
    return sections


def render_unit(sections: list[tuple[str, list[tuple[str, str]]]]) -> str:
    return "".join(
        f"[{name}]\n" + "".join(f"{k}={v}\n" for k, v in items) + "\n" for name, items in sections
    )


# ---------------------------------------------------------------------------------------
# systemd as PID 1 of its own namespaces
# ---------------------------------------------------------------------------------------


class SystemdUnavailable(Exception):
    """This machine cannot boot an isolated systemd; the message says why (a skip reason)."""


def _cgroup2_mount() -> Optional[str]:
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            if right.split()[:1] == ["cgroup2"]:
                return left.split()[4]
    return None


def _own_cgroup2_path() -> str:
    with open("/proc/self/cgroup") as fh:
        for line in fh:
            if line.startswith("0::"):
                return line[3:].strip()
    return "/"


def isolation_missing_reason() -> Optional[str]:
    """Why an isolated systemd cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "booting systemd in namespaces needs root"
    if not SYSTEMD.exists():
        return f"{SYSTEMD} is missing (apt-get install systemd)"
    for tool in ("unshare", "nsenter", "systemctl", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (apt-get install util-linux systemd)"
    mount = _cgroup2_mount()
    if mount is None:
        return "no cgroup2 file system is mounted to give the isolated systemd a cgroup of its own"
    # The whole set-up once, with `true` in place of systemd.
    probe_cgroup = Path(mount + _own_cgroup2_path()) / f"syncd-test-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe_cgroup.mkdir()
    except OSError as exc:
        return f"cannot create a cgroup for the isolated systemd under {probe_cgroup.parent}: {exc}"
    try:
        probe = subprocess.run(
            ["sh", "-c", f"echo $$ > {shlex.quote(str(probe_cgroup / 'cgroup.procs'))} && exec unshare --pid"
             " --fork --mount --mount-proc --cgroup --uts sh -c 'mount --make-rprivate / &&"
             " mount -t tmpfs tmpfs /tmp && mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup'"],
            capture_output=True, text=True, timeout=20, check=False,
        )
    finally:
        IsolatedSystemd._remove_cgroup(probe_cgroup)
    if probe.returncode != 0:
        return f"unshare --pid --mount --cgroup (and the mounts inside) not permitted here: {probe.stderr.strip()}"
    return None


class IsolatedSystemd:
    """``systemd --system --unit=TARGET`` as PID 1 of fresh namespaces; see the module doc.

    *units* are written to ``/run/systemd/system`` inside the namespace. Everything of the
    test (the log, state, sockets) lives under *workdir*, which must not be under /tmp,
    /var/tmp or /run (those are fresh tmpfs inside).
    """

    def __init__(self, workdir: Path, units: dict[str, str], target: str) -> None:
        for hidden in ("/tmp", "/var/tmp", "/run", "/etc/systemd/system"):
            assert not str(workdir).startswith(hidden + "/"), f"{workdir} is hidden inside the namespace"
        self.workdir = workdir
        self.units = units
        self.target = target
        self.log_path = workdir / "systemd.log"
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.pid = 0  # systemd's pid as seen from here
        self.cgroup: Optional[Path] = None
        self._console_name = ""
        self._console_fds: list[int] = []
        self._reader: Optional[threading.Thread] = None
        self._reading = threading.Event()

    # -- boot and teardown -----------------------------------------------------------------

    def _boot_script(self) -> str:
        units_dir = self.workdir / "units"
        units_dir.mkdir(parents=True, exist_ok=True)
        for name, text in self.units.items():
            (units_dir / name).write_text(text)
        q = shlex.quote
        return "\n".join([
            "set -eu",
            "mount --make-rprivate /",
            "for d in /tmp /var/tmp /run /etc/systemd/system; do mount -t tmpfs -o mode=0755 tmpfs \"$d\"; done",
            "chmod 1777 /tmp /var/tmp",
            # Only this namespace's cgroup: the directory made for it, as the root.
            "mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup",
            "mount --bind /proc/sys /proc/sys",
            "mount -o remount,bind,ro /proc/sys",
            # systemd logs to /dev/console only if it is a tty: a pty whose master we read.
            f"mount --bind {q(self._console_name)} /dev/console",
            "mkdir -p /run/systemd/system",
            f"cp {q(str(units_dir))}/* /run/systemd/system/",
            f"exec {q(str(SYSTEMD))} --system --unit={q(self.target)} --log-target=console"
            " --log-level=info --log-color=no --show-status=no",
            "",
        ])

    def _open_console(self) -> None:
        master, slave = os.openpty()
        self._console_fds = [master, slave]  # holding the slave open: no EIO between openers
        self._console_name = os.ttyname(slave)
        self._reading.set()
        self._reader = threading.Thread(target=self._copy_console, args=(master,), daemon=True)
        self._reader.start()

    def _copy_console(self, master: int) -> None:
        with open(self.log_path, "ab", buffering=0) as log:
            while self._reading.is_set():
                ready, _, _ = select.select([master], [], [], 0.1)
                if not ready:
                    continue
                try:
                    data = os.read(master, 65536)
                except OSError:
                    time.sleep(0.05)
                    continue
                log.write(data.replace(b"\r\n", b"\n"))

    def _close_console(self) -> None:
        self._reading.clear()
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None
        for fd in self._console_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._console_fds = []

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path.write_bytes(b"")
        self._open_console()
        script = self.workdir / "boot.sh"
        script.write_text(self._boot_script())
        mount = _cgroup2_mount()
        if mount is None:
            raise SystemdUnavailable("no cgroup2 mount")
        self.cgroup = Path(mount + _own_cgroup2_path()) / f"syncd-test-{uuid.uuid4().hex[:12]}"
        self.cgroup.mkdir()
        # Enter the fresh cgroup first: the cgroup namespace is rooted where unshare runs.
        launcher = (
            f"echo $$ > {shlex.quote(str(self.cgroup / 'cgroup.procs'))} && "
            f"exec unshare --pid --fork --mount --mount-proc --cgroup --uts sh {shlex.quote(str(script))}"
        )
        with open(self.workdir / "unshare.out", "wb") as out:
            self.proc = subprocess.Popen(["sh", "-c", launcher], stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the namespace exited {self.proc.returncode} while booting\n{self.describe()}")
            if not self.pid:
                self.pid = self._child_of(self.proc.pid)
            if self.pid and self._comm(self.pid) == "systemd":
                state = self.systemctl("is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            if time.monotonic() >= deadline:
                raise AssertionError(f"systemd did not finish booting within {BOOT_TIMEOUT:.0f}s\n{self.describe()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Kill PID 1 of the namespace (which kills everything in it) and remove its cgroup."""
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            if self.proc.poll() is None and not self.pid:
                os.killpg(self.proc.pid, signal.SIGKILL)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self.cgroup is not None:
            self._remove_cgroup(self.cgroup)
        self._close_console()

    @staticmethod
    def _remove_cgroup(root: Path) -> None:
        deadline = time.monotonic() + 10
        while root.exists():
            dirs = sorted((Path(d) for d, _, _ in os.walk(root)), key=lambda p: len(p.parts), reverse=True)
            for d in dirs:
                try:
                    d.rmdir()
                except OSError:
                    pass
            if not root.exists() or time.monotonic() >= deadline:
                break
            time.sleep(0.1)

    def __enter__(self) -> IsolatedSystemd:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- driving it --------------------------------------------------------------------------

    def nsenter(self, *argv: str, timeout: float = 20.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", *argv],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}\nstdout: {result.stdout}\n"
                f"stderr: {result.stderr}\n{self.describe()}"
            )
        return result

    def systemctl(self, *args: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        return self.nsenter("systemctl", "--no-pager", *args, timeout=timeout, check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, "-p", ",".join(props)).stdout
        values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        return {p: values.get(p, "") for p in props}

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def describe(self, tail: int = 6000) -> str:
        extra = ""
        out = self.workdir / "unshare.out"
        if out.exists():
            extra = f"--- unshare output ---\n{out.read_text(errors='replace')[-2000:]}\n"
        return f"{extra}--- systemd log ({self.log_path}) ---\n{self.log()[-tail:]}"

    @staticmethod
    def _child_of(pid: int) -> int:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return 0
        return int(children[0]) if children else 0

    @staticmethod
    def _comm(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return ""
