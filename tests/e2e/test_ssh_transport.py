"""End to end: syncd's SSH connection to a real sshd, with the empty MSG_IGNOREs left out."""

from __future__ import annotations

import asyncio
import hashlib
import os

from syncd.transport import ssh
from syncd.transport.options import SshOptions
from tests.sshd import SshServer


def test_a_bulk_stream_arrives_whole_without_the_empty_ignores(sshd: SshServer) -> None:
    opts = SshOptions(port=sshd.port, identity=str(sshd.client_key), known_hosts=str(sshd.known_hosts))
    data = os.urandom(3 << 20)

    async def go() -> str:
        conn = await ssh.connect(sshd.host, sshd.user, opts)
        try:
            assert conn.get_extra_info("send_cipher") == "aes128-gcm@openssh.com"
            assert "skip_empty_ignores" in conn.send_packet.__qualname__  # installed on this connection
            proc = await conn.create_process("sha256sum", encoding=None)
            for i in range(0, len(data), 100_000):
                proc.stdin.write(data[i:i + 100_000])
                await proc.stdin.drain()
            proc.stdin.write_eof()
            out = await proc.stdout.read()
            await proc.wait()
            return out.split()[0].decode()
        finally:
            conn.close()
            await conn.wait_closed()

    assert asyncio.run(go()) == hashlib.sha256(data).hexdigest()
