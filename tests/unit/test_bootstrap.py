"""The agent loader (syncd.transport.bootstrap.LOADER) run locally through /bin/sh, as
the ``local:`` endpoint runs it: upload on first use, then an unpacked copy that keeps
its compiled modules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from syncd.protocol import messages as m
from syncd.protocol.codec import Connection
from syncd.transport import bootstrap


def start_agent(cache: Path) -> tuple[bool, m.Hello]:
    """Run the loader; return (whether it asked for the archive, the agent's Hello)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = subprocess.Popen(["/bin/sh", "-c", bootstrap.loader_command(sys.executable, str(cache))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = proc.stdout.readline()
        needed = line == bootstrap.NEED
        if needed:
            proc.stdin.write(bootstrap.agent_zipapp())
            proc.stdin.flush()
            line = proc.stdout.readline()
        assert line == bootstrap.READY, line
        conn = Connection("test")
        proc.stdin.write(conn.initiate())
        proc.stdin.flush()
        got: list[object] = []
        while not got:
            data = os.read(proc.stdout.fileno(), 1 << 16)
            assert data, proc.stderr.read() if proc.stderr else ""
            got = conn.receive_data(data)
        hello = got[0]
        assert isinstance(hello, m.Hello)
        proc.stdin.write(conn.send(m.Bye()))
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
        return needed, hello
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def unpacked(cache: Path) -> Path:
    return cache / ("agent-%s" % bootstrap.agent_digest()[:24])


def test_first_start_uploads_and_unpacks_later_ones_reuse(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    needed, hello = start_agent(cache)
    assert needed and "scan-tree" in hello.capabilities
    copy = unpacked(cache)
    assert (copy / "syncd" / "agent" / "main.py").is_file()
    assert list(copy.glob("syncd/**/__pycache__/*.pyc")), "compiled modules are kept"
    assert [p.name for p in cache.iterdir() if p.name.endswith(".tmp")] == []
    needed, _ = start_agent(cache)
    assert not needed


def test_a_leftover_from_a_killed_start_is_harmless(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    start_agent(cache)
    copy = unpacked(cache)
    os.rename(copy, str(copy) + ".999.tmp")  # as if a start died between unpacking and renaming
    needed, _ = start_agent(cache)
    assert not needed and copy.is_dir()


def test_runs_from_the_archive_when_it_cannot_unpack(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    unpacked(cache).write_bytes(b"in the way")
    needed, hello = start_agent(cache)
    assert needed and "scan-tree" in hello.capabilities
    needed, _ = start_agent(cache)
    assert not needed
