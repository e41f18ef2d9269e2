"""A real OpenSSH server (``/usr/sbin/sshd``) on 127.0.0.1 for end-to-end tests.

Everything a server needs lives in one temporary directory: a generated ed25519 host
key, a generated ed25519 client key (no passphrase), ``authorized_keys``, ``sshd_config``,
a client ``known_hosts`` holding the host key for ``[127.0.0.1]:PORT``, an ssh client
config (``Host syncd-test``) and the server log.

Use the pytest fixtures in ``tests/conftest.py`` (``sshd``, ``sshd_no_python``,
``sshd_factory``) or, for a throw-away server, the context manager here::

    from tests.sshd import start_sshd

    with start_sshd(tmp_path, host_key=other_key) as server:
        ...

``start_sshd`` skips the calling test when OpenSSH is not installed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import pytest

SSHD = Path("/usr/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")
HOST = "127.0.0.1"
HOST_ALIAS = "syncd-test"
STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

# The only commands a session on a "no python" server can find on its PATH.
NO_PYTHON_TOOLS: tuple[str, ...] = (
    *("sh", "cat", "mkdir", "mv", "rm", "ls", "test"),
    *("env", "chmod", "uname", "head", "sha256sum", "dd"),
)
# Where the real binaries are looked up (never put on the session PATH itself).
_TOOL_SEARCH_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
_SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")

StrPath = Union[str, "os.PathLike[str]"]


class SshdError(RuntimeError):
    """sshd could not be set up or did not come up."""


@dataclass
class SshServer:
    """A running sshd and the client-side files needed to talk to it."""

    host: str
    port: int
    user: str
    client_key: Path
    known_hosts: Path
    ssh_config: Path
    host_key: Path
    log_path: Path
    workdir: Path
    process: Optional["subprocess.Popen[bytes]"] = field(default=None, repr=False, compare=False)

    # -- addressing -------------------------------------------------------------------

    def url(self, path: StrPath) -> str:
        """``ssh://USER@127.0.0.1:PORT/abs/path`` for *path* on this server."""
        return f"ssh://{self.user}@{self.host}:{self.port}{os.path.abspath(os.fspath(path))}"

    def ssh_argv(self, *, destination: bool = True) -> list[str]:
        """An OpenSSH ``ssh`` command prefix; append the remote command to it.

        With ``destination=False`` the ``USER@HOST`` argument is left out, which gives a
        command usable as ``rsync -e`` (see :meth:`ssh_command`).
        """
        argv = [
            "ssh",
            "-F",
            str(self.ssh_config),
            "-p",
            str(self.port),
            "-i",
            str(self.client_key),
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
        ]
        if destination:
            argv.append(f"{self.user}@{self.host}")
        return argv

    def ssh_command(self) -> str:
        """The :meth:`ssh_argv` prefix without destination, as one shell string."""
        return shlex.join(self.ssh_argv(destination=False))

    def known_hosts_line(self) -> str:
        """The ``[127.0.0.1]:PORT KEYTYPE KEY`` line for this server's host key."""
        return _known_hosts_line(self.host, self.port, self.host_key)

    # -- process ----------------------------------------------------------------------

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, *, kill_sessions: bool = True) -> None:
        """Stop the listener (SIGTERM, then SIGKILL).

        With ``kill_sessions`` (the default) the per-connection sshd processes and
        everything started in their sessions are stopped too, as if the host went away;
        otherwise open connections stay up and only new ones are refused.
        """
        proc = self.process
        if proc is None:
            return
        sessions = _descendants(proc.pid) if kill_sessions else []
        if proc.poll() is None:
            proc.terminate()
        _signal_all(sessions, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        deadline = time.monotonic() + STOP_TIMEOUT
        while sessions and time.monotonic() < deadline:
            sessions = [pid for pid in sessions if _alive(pid)]
            if sessions:
                time.sleep(0.05)
        _signal_all(sessions, signal.SIGKILL)


# ------------------------------------------------------------------------------------
# starting a server
# ------------------------------------------------------------------------------------


def sshd_missing_reason() -> Optional[str]:
    """Why a real sshd cannot be run here, or None if it can."""
    if not SSHD.exists():
        return f"OpenSSH server not installed ({SSHD} missing; apt-get install openssh-server)"
    for tool in ("ssh-keygen", "ssh"):
        if shutil.which(tool) is None:
            return f"OpenSSH client not installed ({tool} missing; apt-get install openssh-client)"
    return None


def require_sshd() -> None:
    """pytest.skip the current test if a real sshd cannot be run."""
    reason = sshd_missing_reason()
    if reason is not None:
        pytest.skip(reason)


@contextlib.contextmanager
def start_sshd(
    tmpdir: StrPath,
    *,
    port: Optional[int] = None,
    host_key: Optional[StrPath] = None,
    client_key: Optional[StrPath] = None,
    no_python: bool = False,
    force_command: Optional[str] = None,
    extra_config: Sequence[str] = (),
    startup_timeout: float = STARTUP_TIMEOUT,
) -> Iterator[SshServer]:
    """Run a throw-away sshd on 127.0.0.1; stop it (and its sessions) on exit.

    The server's files go into a fresh directory under *tmpdir* (so several servers can
    share one *tmpdir*). Options:

    - ``port``: listen on this port (e.g. to replace a stopped server); default: a free one.
    - ``host_key``: use a copy of this private host key instead of a new one (``.pub``
      next to it is used if present). A new key on the same port as an old server is how
      to test a changed host key.
    - ``client_key``: authorize this private client key (its ``.pub`` must exist) instead
      of a generated one, so an existing client setup keeps working.
    - ``no_python``: sessions run with a PATH holding only :data:`NO_PYTHON_TOOLS`.
    - ``force_command``: a ``ForceCommand`` for all sessions (exclusive with no_python).
    - ``extra_config``: more ``sshd_config`` lines, appended at the end.
    """
    require_sshd()
    if no_python and force_command is not None:
        raise ValueError("no_python and force_command are mutually exclusive")
    base = Path(tmpdir)
    base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="sshd-", dir=base)).resolve()
    if any(ch.isspace() or ch in "%\"'" for ch in str(workdir)):
        raise SshdError(f"sshd work directory path is not usable in ssh configs: {workdir}")
    _ensure_privsep_dir()

    user = pwd.getpwuid(os.geteuid()).pw_name

    # Host key.
    host_key_path = workdir / "ssh_host_ed25519_key"
    if host_key is None:
        _keygen(host_key_path, comment="syncd-test-host")
    else:
        _copy_key(Path(host_key), host_key_path)

    # Client key + authorized_keys.
    if client_key is None:
        client_key_path = workdir / "id_ed25519"
        _keygen(client_key_path, comment="syncd-test-client")
    else:
        client_key_path = Path(client_key).resolve()
        if not Path(f"{client_key_path}.pub").exists():
            raise SshdError(f"client key {client_key_path} has no .pub next to it")
    authorized_keys = workdir / "authorized_keys"
    authorized_keys.write_text(Path(f"{client_key_path}.pub").read_text())
    authorized_keys.chmod(0o600)

    if no_python:
        force_command = shlex.quote(str(_write_no_python_wrapper(workdir)))

    log_path = workdir / "sshd.log"
    config_path = workdir / "sshd_config"
    known_hosts = workdir / "known_hosts"
    ssh_config = workdir / "ssh_config"

    attempts = 1 if port is not None else 5
    proc: Optional[subprocess.Popen[bytes]] = None
    for attempt in range(attempts):
        use_port = port if port is not None else _free_port()
        config_path.write_text(
            _sshd_config(
                port=use_port,
                host_key=host_key_path,
                workdir=workdir,
                authorized_keys=authorized_keys,
                force_command=force_command,
                extra_config=extra_config,
            )
        )
        try:
            proc = _launch(config_path, log_path, use_port, startup_timeout)
            break
        except SshdError:
            log = _read(log_path)
            if attempt + 1 < attempts and "Address already in use" in log:
                continue  # lost the race for the free port; pick another
            raise
    assert proc is not None

    known_hosts.write_text(_known_hosts_line(HOST, use_port, host_key_path) + "\n")
    ssh_config.write_text(
        f"Host {HOST_ALIAS}\n"
        f"    HostName {HOST}\n"
        f"    Port {use_port}\n"
        f"    User {user}\n"
        f"    IdentityFile {client_key_path}\n"
        f"    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {known_hosts}\n"
        f"    GlobalKnownHostsFile /dev/null\n"
        f"    StrictHostKeyChecking yes\n"
        f"    BatchMode yes\n"
        f"    LogLevel ERROR\n"
    )

    server = SshServer(
        host=HOST,
        port=use_port,
        user=user,
        client_key=client_key_path,
        known_hosts=known_hosts,
        ssh_config=ssh_config,
        host_key=host_key_path,
        log_path=log_path,
        workdir=workdir,
        process=proc,
    )
    try:
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------


def _sshd_config(
    *,
    port: int,
    host_key: Path,
    workdir: Path,
    authorized_keys: Path,
    force_command: Optional[str],
    extra_config: Sequence[str],
) -> str:
    lines = [
        f"Port {port}",
        f"ListenAddress {HOST}",
        "AddressFamily inet",
        f"HostKey {host_key}",
        f"PidFile {workdir / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized_keys}",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password",
        "UsePAM no",
        "StrictModes no",
        "Subsystem sftp internal-sftp",
        "LogLevel VERBOSE",
        "MaxStartups 100",
        "MaxSessions 100",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "X11Forwarding no",
        "AllowTcpForwarding yes",
        "LoginGraceTime 30",
    ]
    if force_command is not None:
        lines.append(f"ForceCommand {force_command}")
    lines.extend(extra_config)
    return "\n".join(lines) + "\n"


def _launch(config: Path, log_path: Path, port: int, timeout: float) -> subprocess.Popen[bytes]:
    """Start ``sshd -D -e -f CONFIG`` and wait until it answers on *port*."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SshdError(
                f"sshd exited with status {proc.returncode} before listening on "
                f"{HOST}:{port}; log {log_path}:\n{_read(log_path)}"
            )
        if _answers_ssh(port):
            # Someone else could own the port; make sure it is still our sshd.
            time.sleep(0.01)
            if proc.poll() is None:
                return proc
            continue
        if time.monotonic() >= deadline:
            _terminate(proc)
            raise SshdError(
                f"sshd did not accept connections on {HOST}:{port} within {timeout:.0f} s; "
                f"log {log_path}:\n{_read(log_path)}"
            )
        time.sleep(0.05)


def _answers_ssh(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as sock:
            sock.settimeout(2.0)
            return sock.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _ensure_privsep_dir() -> None:
    if PRIVSEP_DIR.is_dir():
        return
    try:
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    except PermissionError:
        pass  # not root: sshd does not chroot then, so it does not need the directory


def _keygen(path: Path, *, comment: str) -> None:
    result = subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SshdError(f"ssh-keygen failed for {path}: {result.stderr.strip()}")


def _copy_key(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    dst.chmod(0o600)
    pub = Path(f"{src}.pub")
    dst_pub = Path(f"{dst}.pub")
    if pub.exists():
        shutil.copyfile(pub, dst_pub)
        return
    result = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(dst)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SshdError(f"cannot derive public key from {src}: {result.stderr.strip()}")
    dst_pub.write_text(result.stdout)


def _known_hosts_line(host: str, port: int, host_key: Path) -> str:
    keytype, key = Path(f"{host_key}.pub").read_text().split()[:2]
    return f"[{host}]:{port} {keytype} {key}"


def _write_no_python_wrapper(workdir: Path) -> Path:
    """A ForceCommand wrapper running the client's command with a python-less PATH."""
    bindir = workdir / "nopy-bin"
    bindir.mkdir()
    for tool in NO_PYTHON_TOOLS:
        real = shutil.which(tool, path=_TOOL_SEARCH_PATH)
        if real is None:
            raise SshdError(f"basic tool {tool!r} not found in {_TOOL_SEARCH_PATH}")
        (bindir / tool).symlink_to(real)
    sftp = (
        f"    exec {shlex.quote(str(_SFTP_SERVER))}\n"
        if _SFTP_SERVER.exists()
        else "    echo 'sftp not available' >&2; exit 1\n"
    )
    wrapper = workdir / "no-python-session"
    wrapper.write_text(
        "#!/bin/sh\n"
        "# sshd ForceCommand: run the requested command where python3 cannot be found.\n"
        f"PATH={shlex.quote(str(bindir))}\n"
        "export PATH\n"
        'if [ -z "${SSH_ORIGINAL_COMMAND:-}" ]; then\n'
        "    exec /bin/sh\n"
        "fi\n"
        'if [ "$SSH_ORIGINAL_COMMAND" = internal-sftp ]; then\n'
        f"{sftp}"
        "fi\n"
        'exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return "(no log)"


def _descendants(pid: int) -> list[int]:
    """All live descendants of *pid* (via /proc), parents before children."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ..." -- comm may contain spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) < 2:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop(0)
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2 :][:1]
    return state != b"Z"


def _signal_all(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
