#!/usr/bin/env python3
"""What moving bytes over asyncssh costs, with nothing else in the process: the floor under
any syncd stream (a resync, an initial sync), against OpenSSH's own ``ssh`` on the same
loopback sshd.

Sends ``--mb`` MiB to ``cat > /dev/null`` and receives as many from ``head -c N /dev/zero``,
in 1 MiB writes and reads, through asyncssh (the cipher syncd prefers) and through ``ssh``,
and prints the wall time and the CPU seconds of the sending or receiving process.

    python3 bench/ssh_floor.py [--mb 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))

from syncd.transport.ssh import PREFERRED_CIPHERS  # noqa: E402  (after the path is set)

CHUNK = 1 << 20


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def through_asyncssh(server: Any, size: int) -> dict[str, tuple[float, float]]:
    import asyncssh

    conn = await asyncssh.connect(server.host, port=server.port, username=server.user,
                                  client_keys=[str(server.client_key)], known_hosts=str(server.known_hosts),
                                  encryption_algs=PREFERRED_CIPHERS, compression_algs=None)
    out: dict[str, tuple[float, float]] = {}
    data = os.urandom(CHUNK)
    try:
        proc = await conn.create_process("cat > /dev/null", encoding=None)
        cpu, wall = own_cpu(), time.perf_counter()
        for _ in range(size // CHUNK):
            proc.stdin.write(data)
            await proc.stdin.drain()
        proc.stdin.write_eof()
        await proc.wait()
        out["send"] = (time.perf_counter() - wall, own_cpu() - cpu)
        proc = await conn.create_process(f"head -c {size} /dev/zero", encoding=None)
        cpu, wall = own_cpu(), time.perf_counter()
        while await proc.stdout.read(CHUNK):
            pass
        await proc.wait()
        out["receive"] = (time.perf_counter() - wall, own_cpu() - cpu)
    finally:
        conn.close()
    return out


def through_ssh(server: Any, size: int) -> dict[str, tuple[float, float]]:
    ssh = shlex.join([*server.ssh_argv(), "-c", "aes128-gcm@openssh.com"])
    out = {}
    for label, command in (("send", f"head -c {size} /dev/zero | {ssh} 'cat > /dev/null'"),
                           ("receive", f"{ssh} 'head -c {size} /dev/zero' > /dev/null")):
        cpu, wall = children_cpu(), time.perf_counter()
        subprocess.run(["bash", "-c", command], check=True)
        # The local side's CPU: ssh (and head or nothing); sshd's is not ours to count.
        out[label] = (time.perf_counter() - wall, children_cpu() - cpu)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=1024)
    args = parser.parse_args(argv)
    size = args.mb * CHUNK
    sshd = importlib.import_module("tests.sshd")
    reason = sshd.sshd_missing_reason()
    if reason is not None:
        print(f"bench: {reason}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="syncd-ssh-floor-") as work, sshd.start_sshd(Path(work)) as server:
        ours = asyncio.run(through_asyncssh(server, size))
        theirs = through_ssh(server, size)
    print(f"{args.mb} MiB over loopback: wall seconds / CPU seconds of the local process(es)")
    for label in ("send", "receive"):
        a, o = ours[label], theirs[label]
        print(f"{label:8} asyncssh {a[0]:6.2f} s / {a[1]:5.2f} cpu   ssh {o[0]:6.2f} s / {o[1]:5.2f} cpu   "
              f"cpu ratio {a[1] / max(o[1], 1e-6):4.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
