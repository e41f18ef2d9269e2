"""systemd notification protocol (sd_notify) without libsystemd."""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends READY=1, STATUS=, WATCHDOG=1, STOPPING=1 to $NOTIFY_SOCKET when set."""

    def __init__(self) -> None:
        self.address = os.environ.get("NOTIFY_SOCKET") or ""
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        enabled = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_interval = int(usec) / 2e6 if enabled else 0.0
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> None:
        if not self.address:
            return
        address = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.sendto("\n".join(fields).encode(), address)
        except OSError:
            pass  # systemd going away must not take the daemon with it

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
