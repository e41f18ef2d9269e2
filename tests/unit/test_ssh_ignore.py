"""The hook that leaves out asyncssh's empty MSG_IGNORE packets (a fake connection: the
real one is exercised by every end-to-end test over sshd)."""

from __future__ import annotations

from typing import Any

import pytest
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_IGNORE
from asyncssh.packet import String, UInt32

from syncd.transport.ssh_ignore import skip_empty_ignores


class _Conn:
    def __init__(self, cipher: str | None) -> None:
        self.cipher = cipher
        self.sent: list[tuple[Any, ...]] = []

    def get_extra_info(self, name: str) -> Any:
        return self.cipher if name == "send_cipher" else None

    def send_packet(self, pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype != MSG_IGNORE:  # as asyncssh does once encrypting
            self.send_packet(MSG_IGNORE, String(b""))
        self.sent.append((pkttype, *args))


HOOK_CASES = [
    # (cipher, hook installed, packets on the wire for one data packet)
    ("aes128-gcm@openssh.com", True, [MSG_CHANNEL_DATA]),
    ("chacha20-poly1305@openssh.com", True, [MSG_CHANNEL_DATA]),
    ("aes128-ctr", False, [MSG_IGNORE, MSG_CHANNEL_DATA]),  # not AEAD: left as asyncssh has it
    ("aes256-cbc", False, [MSG_IGNORE, MSG_CHANNEL_DATA]),
    (None, False, [MSG_IGNORE, MSG_CHANNEL_DATA]),
]


@pytest.mark.parametrize(("cipher", "installed", "wire"), HOOK_CASES, ids=[str(c[0]) for c in HOOK_CASES])
def test_empty_ignores_are_left_out_only_under_an_aead_cipher(cipher: str | None, installed: bool,
                                                              wire: list[int]) -> None:
    conn = _Conn(cipher)
    assert skip_empty_ignores(conn) is installed
    conn.send_packet(MSG_CHANNEL_DATA, UInt32(0), String(b"x" * 100))
    assert [p[0] for p in conn.sent] == wire
    assert conn.sent[-1] == (MSG_CHANNEL_DATA, UInt32(0), String(b"x" * 100))  # unchanged


def test_an_ignore_with_a_payload_still_goes() -> None:
    conn = _Conn("aes128-gcm@openssh.com")
    skip_empty_ignores(conn)
    conn.send_packet(MSG_IGNORE, String(b"padding"))
    assert conn.sent == [(MSG_IGNORE, String(b"padding"))]
