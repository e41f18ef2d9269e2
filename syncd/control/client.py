"""Blocking control-socket client for the CLI."""

from __future__ import annotations

import os
import socket
from typing import Any

from syncd.control import wire


class DaemonUnavailable(Exception):
    """No daemon answers on the socket."""


class RemoteError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def default_socket_path() -> str:
    """The socket a daemon started the same way would use."""
    explicit = os.environ.get("SYNCD_SOCKET")
    if explicit:
        return explicit
    if os.geteuid() == 0 and not os.environ.get("XDG_RUNTIME_DIR"):
        return "/run/syncd/syncd.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/syncd-{os.geteuid()}"
    return os.path.join(runtime, "syncd", "syncd.sock")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise DaemonUnavailable("the daemon closed the connection")
        buf += chunk
    return bytes(buf)


def call(socket_path: str, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = 30.0) -> Any:
    """Send one request and return its result, or raise RemoteError / DaemonUnavailable."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(socket_path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonUnavailable(f"the syncd daemon is not running (no socket at {socket_path})") from None
        except PermissionError:
            raise DaemonUnavailable(f"permission denied on {socket_path}") from None
        try:
            sock.sendall(wire.pack({"v": wire.VERSION, "cmd": cmd, "args": args or {}}))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon answered before reading (a refusal): read that answer
        try:
            length = wire.check_length(_recv_exact(sock, wire.HEADER.size))
            reply = wire.unpack_body(_recv_exact(sock, length))
        except TimeoutError:
            raise RemoteError(wire.E_TIMEOUT, f"no answer from the daemon within {timeout:.0f}s") from None
    finally:
        sock.close()
    if not isinstance(reply, dict) or "ok" not in reply:
        raise RemoteError(wire.E_FAILED, "malformed reply from the daemon")
    if not reply["ok"]:
        raise RemoteError(str(reply.get("code")), str(reply.get("message")))
    return reply.get("result")
