"""SSH carrier for the agent, through asyncssh.

Honours ~/.ssh/config (or --ssh-config), known_hosts, identity files and ssh-agent; an
unknown or changed host key is refused. Prefers AES-GCM, which asyncssh moves fastest.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import socket
import tempfile

import asyncssh

from syncd.transport.channel import Channel, OnLink, TransportError
from syncd.transport.options import SshOptions
from syncd.transport.ssh_ignore import skip_empty_ignores

PREFERRED_CIPHERS = [
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
]
CONNECT_TIMEOUT = 15.0
PIN_ALIAS = "syncd-pinned-host"  # the name the pinned host key goes under for OpenSSH


class Beside:
    """Command lines for OpenSSH's ``ssh`` reaching the host of a verified connection."""

    def __init__(self, conn: asyncssh.SSHClientConnection, host: str, user: str | None,
                 opts: SshOptions | None) -> None:
        self.conn = conn
        self.host = host
        self.user = user
        self.opts = opts
        self._pin_dir: tempfile.TemporaryDirectory[str] | None = None

    def argv(self, script: str) -> list[str] | None:
        """OpenSSH's ``ssh`` running ``script`` on the same host, as the same user, with the
        same options, and accepting only the host key this connection verified (pinned in
        a known_hosts file of its own): OpenSSH moves bulk data for about 60% of the CPU
        asyncssh needs, in a process of its own. None without an ``ssh`` binary or a plain
        host key."""
        ssh = shutil.which("ssh")
        key = self.conn.get_server_host_key()
        if ssh is None or self.opts is None or not isinstance(key, asyncssh.SSHKey) or not self.host:
            return None
        if self._pin_dir is None:
            self._pin_dir = _pin_directory()
            if self._pin_dir is None:
                return None
            with open(os.path.join(self._pin_dir.name, "known_hosts"), "wb") as pin:
                pin.write(PIN_ALIAS.encode() + b" " + key.export_public_key("openssh").strip() + b"\n")
        return [*openssh_argv(ssh, self.host, self.user, self.opts,
                              os.path.join(self._pin_dir.name, "known_hosts")), shlex.join(["sh", "-c", script])]

    def cleanup(self) -> None:
        if self._pin_dir is not None:
            self._pin_dir.cleanup()


class SshChannel(Channel):
    """The agent as an exec channel on an SSH connection."""

    def __init__(self, conn: asyncssh.SSHClientConnection, proc: asyncssh.SSHClientProcess[bytes],
                 beside: Beside) -> None:
        super().__init__()
        self.conn = conn
        self.proc = proc
        self.beside = beside
        self._stderr_task = asyncio.ensure_future(self._pump_stderr())

    def direct_argv(self, script: str) -> list[str] | None:
        """See Beside.argv."""
        return self.beside.argv(script)

    async def _pump_stderr(self) -> None:
        try:
            while chunk := await self.proc.stderr.read(4096):
                self._keep_stderr(chunk)
        except (asyncssh.Error, OSError):
            pass

    async def _read_raw(self) -> bytes:
        try:
            return await self.proc.stdout.read(1 << 20)
        except (asyncssh.Error, OSError) as exc:
            raise ConnectionError(f"ssh connection lost: {exc}") from None

    def write(self, data: bytes) -> None:
        try:
            self.proc.stdin.write(data)
        except (asyncssh.Error, OSError, BrokenPipeError) as exc:
            raise ConnectionError(f"ssh connection lost: {exc}") from None

    async def drain(self) -> None:
        try:
            await self.proc.stdin.drain()
        except (asyncssh.Error, OSError) as exc:
            raise ConnectionError(f"ssh connection lost: {exc}") from None

    async def _end_process(self) -> None:
        try:
            self.proc.stdin.write_eof()
        except (asyncssh.Error, OSError):
            pass
        try:
            await asyncio.wait_for(self.proc.wait_closed(), 3)
        except (TimeoutError, asyncssh.Error, OSError):
            self.proc.close()

    async def rerun(self, command: str) -> SshChannel:
        await self._end_process()
        try:
            proc = await self.conn.create_process(command, encoding=None)
        except asyncssh.Error as exc:
            await self.close()
            raise TransportError(f"cannot start a command: {exc}") from None
        return SshChannel(self.conn, proc, self.beside)

    async def close(self) -> None:
        await self._end_process()
        self.conn.close()
        try:
            await asyncio.wait_for(self.conn.wait_closed(), 3)
        except (TimeoutError, asyncssh.Error, OSError):
            pass
        self.beside.cleanup()

    async def exit_status(self, timeout: float = 2.0) -> int | None:
        try:
            await asyncio.wait_for(self.proc.wait_closed(), timeout)
        except (TimeoutError, asyncssh.Error, OSError):
            return None
        await asyncio.wait([self._stderr_task], timeout=1)
        return self.proc.exit_status


async def connect(host: str, user: str | None, opts: SshOptions) -> asyncssh.SSHClientConnection:
    """Open an SSH connection, translating failures into one-line TransportErrors."""
    kwargs: dict[str, object] = {
        "keepalive_interval": opts.keepalive_interval,
        "keepalive_count_max": opts.keepalive_count_max,
        "encryption_algs": PREFERRED_CIPHERS,
        "compression_algs": None,
        "connect_timeout": CONNECT_TIMEOUT,
    }
    if opts.port:
        kwargs["port"] = opts.port
    if user:
        kwargs["username"] = user
    if opts.identity:
        kwargs["client_keys"] = [os.path.expanduser(opts.identity)]
    if opts.known_hosts:
        kwargs["known_hosts"] = os.path.expanduser(opts.known_hosts)
    if opts.ssh_config:
        kwargs["config"] = [os.path.expanduser(opts.ssh_config)]
    where = f"{host}:{opts.port}" if opts.port else host
    try:
        conn = await asyncssh.connect(host, **kwargs)  # type: ignore[arg-type]
        skip_empty_ignores(conn)
        return conn
    except asyncssh.HostKeyNotVerifiable as exc:
        raise TransportError(
            f"host key of {where} is not trusted (unknown or changed): {exc.reason}; "
            "refusing to connect. Check the key, then add it to known_hosts or pass --known-hosts FILE"
        ) from None
    except asyncssh.PermissionDenied:
        raise TransportError(f"authentication failed for {user or 'default user'}@{where}") from None
    except asyncssh.DisconnectError as exc:
        raise TransportError(f"ssh to {where} failed: {exc.reason}") from None
    except TimeoutError:
        raise TransportError(f"cannot reach {where}: timed out after {CONNECT_TIMEOUT:.0f}s") from None
    except socket.gaierror as exc:
        raise TransportError(f"cannot resolve {host}: {exc.strerror}") from None
    except OSError as exc:
        raise TransportError(f"cannot reach {where}: {exc.strerror or exc}") from None
    except asyncssh.Error as exc:
        raise TransportError(f"ssh to {where} failed: {exc}") from None


async def open_channel(host: str, user: str | None, opts: SshOptions, command: str,
                       on_link: OnLink | None = None) -> SshChannel:
    """Connect and run ``command``; ``on_link`` learns, before the command is asked for,
    how to run a script beside it (see Beside.argv)."""
    conn = await connect(host, user, opts)
    beside = Beside(conn, host, user, opts)
    if on_link is not None:
        on_link(beside.argv)
    try:
        proc = await conn.create_process(command, encoding=None)
    except asyncssh.Error as exc:
        conn.close()
        beside.cleanup()
        raise TransportError(f"cannot start a command on {host}: {exc}") from None
    return SshChannel(conn, proc, beside)


# OpenSSH splits UserKnownHostsFile on whitespace and expands %-tokens in it: the pinned
# file must live where the path holds neither.
_PLAIN_PATH = re.compile(r"[A-Za-z0-9_./+-]+")


def _pin_directory() -> tempfile.TemporaryDirectory[str] | None:
    """A private (0700) directory for the pinned known_hosts file, under the first
    temporary directory whose path OpenSSH reads as written; None if there is none."""
    for base in (tempfile.gettempdir(), "/tmp", "/dev/shm", "/var/tmp"):
        if _PLAIN_PATH.fullmatch(base) and os.path.isdir(base):
            try:
                made = tempfile.TemporaryDirectory(prefix="syncd-ssh-", dir=base)
            except OSError:
                continue
            if _PLAIN_PATH.fullmatch(made.name):
                return made
            made.cleanup()
    return None


def openssh_argv(ssh: str, host: str, user: str | None, opts: SshOptions, pinned_known_hosts: str) -> list[str]:
    """An OpenSSH command line reaching ``host`` as ``connect`` does (port, user, identity,
    config file, keepalives, ciphers), never prompting, and trusting only the host key in
    ``pinned_known_hosts`` (under the alias PIN_ALIAS). Append the remote command."""
    argv = [ssh, "-T", "-x", "-a", "-e", "none",
            "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT:.0f}",
            "-o", f"ServerAliveInterval={opts.keepalive_interval:.0f}",
            "-o", f"ServerAliveCountMax={opts.keepalive_count_max}",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={pinned_known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", f"HostKeyAlias={PIN_ALIAS}",
            "-o", "UpdateHostKeys=no", "-o", "ControlMaster=no", "-o", "ControlPath=none",
            "-o", "Compression=no", "-c", ",".join(PREFERRED_CIPHERS)]
    if opts.ssh_config:
        argv[1:1] = ["-F", os.path.expanduser(opts.ssh_config)]
    if opts.port:
        argv += ["-p", str(opts.port)]
    if user:
        argv += ["-l", user]
    if opts.identity:  # OpenSSH expands %-tokens in identity paths: a literal % is %%
        argv += ["-i", os.path.expanduser(opts.identity).replace("%", "%%"), "-o", "IdentitiesOnly=yes"]
    return [*argv, "--", host]
