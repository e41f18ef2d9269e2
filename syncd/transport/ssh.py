"""SSH carrier for the agent, through asyncssh.

Honours ~/.ssh/config (or --ssh-config), known_hosts, identity files and ssh-agent; an
unknown or changed host key is refused. Prefers AES-GCM, which asyncssh moves fastest.
"""

from __future__ import annotations

import asyncio
import os
import socket

import asyncssh

from syncd.transport.channel import Channel, TransportError
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


class SshChannel(Channel):
    """The agent as an exec channel on an SSH connection."""

    def __init__(self, conn: asyncssh.SSHClientConnection, proc: asyncssh.SSHClientProcess[bytes]) -> None:
        super().__init__()
        self.conn = conn
        self.proc = proc
        self._stderr_task = asyncio.ensure_future(self._pump_stderr())

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

    async def close(self) -> None:
        try:
            self.proc.stdin.write_eof()
        except (asyncssh.Error, OSError):
            pass
        try:
            await asyncio.wait_for(self.proc.wait_closed(), 3)
        except (TimeoutError, asyncssh.Error, OSError):
            self.proc.close()
        self.conn.close()
        try:
            await asyncio.wait_for(self.conn.wait_closed(), 3)
        except (TimeoutError, asyncssh.Error, OSError):
            pass

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


async def open_channel(host: str, user: str | None, opts: SshOptions, command: str) -> SshChannel:
    conn = await connect(host, user, opts)
    try:
        proc = await conn.create_process(command, encoding=None)
    except asyncssh.Error as exc:
        conn.close()
        raise TransportError(f"cannot start a command on {host}: {exc}") from None
    return SshChannel(conn, proc)
