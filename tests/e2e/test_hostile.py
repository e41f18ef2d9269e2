"""End-to-end: the remote agent facing a hostile daemon-side peer.

The test starts the agent itself over a real ``ssh`` (the loader command from
``syncd.transport.bootstrap``, answering SYNCD-NEED with the zipapp as
``syncd/transport/connect.py`` does), then speaks the protocol with
``syncd.protocol.codec.Connection``: it opens a root and asks for writes whose paths
escape it. Every one must come back ``unsafe`` with nothing written outside the root.
Garbage on the wire must make the agent exit non-zero, not hang.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from syncd.protocol import messages as m
from syncd.protocol.codec import Connection
from syncd.transport import bootstrap
from tests.e2e.helpers import tree_snapshot
from tests.sshd import SshServer

IO_TIMEOUT = 15.0


class AgentPeer:
    """A hand-driven daemon side: the agent over ``ssh``, spoken to message by message."""

    def __init__(self, server: SshServer, cache_dir: Path, stderr_path: Path) -> None:
        command = bootstrap.loader_command("python3", str(cache_dir))
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [*server.ssh_argv(), command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err
            )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin = self.proc.stdin
        self.out_fd = self.proc.stdout.fileno()
        self.buffer = b""
        self.conn = Connection("hostile-test", ())
        self.received: list[Any] = []
        self._ids = iter(range(1, 1 << 30))

    # -- raw I/O -------------------------------------------------------------------------

    def _read_some(self, timeout: float = IO_TIMEOUT) -> bytes:
        ready, _, _ = select.select([self.out_fd], [], [], timeout)
        if not ready:
            raise AssertionError(f"the agent said nothing for {timeout:.0f} s\n{self.stderr()}")
        return os.read(self.out_fd, 1 << 20)

    def readline(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self._read_some()
            if not chunk:
                line, self.buffer = self.buffer, b""
                return line
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def write(self, data: bytes) -> None:
        self.stdin.write(data)
        self.stdin.flush()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    # -- start-up ------------------------------------------------------------------------

    def bootstrap(self) -> None:
        line = self.readline()
        if line == bootstrap.NEED:
            self.write(bootstrap.agent_zipapp())
            line = self.readline()
        assert line == bootstrap.READY, (line, self.stderr())

    def handshake(self) -> m.Hello:
        self.write(self.conn.initiate())
        hello = self.next_message()
        assert isinstance(hello, m.Hello), hello
        return hello

    # -- messages ------------------------------------------------------------------------

    def next_message(self) -> Any:
        while not self.received:
            data, self.buffer = self.buffer, b""
            if not data:
                data = self._read_some()
                if not data:
                    raise AssertionError("the agent closed its stdout\n" + self.stderr())
            self.received.extend(self.conn.receive_data(data))
        return self.received.pop(0)

    def send(self, message: Any) -> None:
        self.write(self.conn.send(message))

    def req(self) -> int:
        return next(self._ids)

    def open(self, root: Path) -> m.Opened:
        req = self.req()
        self.send(m.Open(req, str(root), {}, False, False))
        reply = self.next_message()
        assert isinstance(reply, m.Opened), reply
        return reply

    def apply(self, ops: list[m.Op]) -> tuple[m.OpResult, ...]:
        req = self.req()
        self.send(m.Apply(req, tuple(ops)))
        reply = self.next_message()
        assert isinstance(reply, m.Applied) and reply.req == req, reply
        assert len(reply.results) == len(ops)
        return reply.results

    def entries(self, message: Any) -> tuple[list[m.Entry], list[str]]:
        self.send(message)
        entries: list[m.Entry] = []
        absent: list[str] = []
        while True:
            chunk = self.next_message()
            if isinstance(chunk, m.Failure):
                # A refused request: nothing described.
                assert chunk.code == "unsafe", chunk
                return [], []
            assert isinstance(chunk, m.ScanChunk), chunk
            entries.extend(chunk.entries)
            absent.extend(chunk.absent)
            if chunk.done:
                return entries, absent

    def fetch(self, path: str) -> list[m.FileData]:
        self.send(m.Fetch(self.req(), path))
        parts = []
        while True:
            part = self.next_message()
            assert isinstance(part, m.FileData), part
            parts.append(part)
            if part.error or part.entry is not None:
                return parts

    # -- ending --------------------------------------------------------------------------

    def wait_exit(self, timeout: float) -> Optional[int]:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def drain_stdout(self) -> bytes:
        """Everything the agent wrote after what was consumed, up to EOF."""
        data = self.buffer
        self.buffer = b""
        while True:
            ready, _, _ = select.select([self.out_fd], [], [], 2.0)
            if not ready:
                return data
            chunk = os.read(self.out_fd, 1 << 20)
            if not chunk:
                return data
            data += chunk

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(m.Bye())
                self.stdin.close()
            except (OSError, ValueError, RuntimeError):
                pass
            if self.wait_exit(5) is None:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


@pytest.fixture
def peer(sshd: SshServer, tmp_path: Path) -> Iterator[AgentPeer]:
    agent = AgentPeer(sshd, tmp_path / "agent-cache", tmp_path / "agent.err")
    try:
        agent.bootstrap()
        agent.handshake()
        yield agent
    finally:
        agent.close()


@pytest.fixture
def sandbox(tmp_path: Path) -> dict[str, Path]:
    """root/ (the sync root) next to outside/ (must stay untouched)."""
    box = tmp_path / "box"
    root, outside = box / "root", box / "outside"
    outside.mkdir(parents=True)
    (outside / "victim.txt").write_text("precious\n")
    root.mkdir()
    (root / "inside.txt").write_text("inside\n")
    (root / "inner").mkdir()
    (root / "inner" / "deep.txt").write_text("deep\n")
    os.symlink("../outside", root / "link")  # a symlinked directory pointing outside
    os.symlink(str(outside), root / "abslink")
    return {"box": box, "root": root, "outside": outside}


def _escaping_paths(outside: Path, absolute: str) -> list[str]:
    return [
        "../x",
        "../outside/victim.txt",
        "inner/../../x",
        "inner/../../outside/victim.txt",
        absolute,
        str(outside / "victim.txt"),
        "link/escape",
        "link/victim.txt",
        "abslink/escape",
        "abslink/victim.txt",
        "link/sub/deeper",
        "inner/./../inside.txt",
        "",
    ]


def test_escaping_writes_are_refused(peer: AgentPeer, sandbox: dict[str, Path], tmp_path: Path) -> None:
    root, outside, box = sandbox["root"], sandbox["outside"], sandbox["box"]
    absolute = f"/tmp/abs-{uuid.uuid4().hex}"
    opened = peer.open(root)
    assert opened.root == str(root)
    before_box = tree_snapshot(box)
    mtime = time.time_ns()

    ops: list[m.Op] = []
    for path in _escaping_paths(outside, absolute):
        ops += [
            m.PutFile(path, b"pwned\n", 0o755, mtime, None),
            m.PutFile(path, b"pwned\n", 0o755, mtime, m.Expect(m.ABSENT)),
            m.MakeLink(path, "/etc/passwd", None),
            m.MakeDir(path, 0o777, None),
            m.Remove(path, None),
            m.Remove(path, m.Expect(m.FILE, 9, 0, 0)),
            m.Rename("inside.txt", path, None),  # escaping destination
            m.Rename(path, "stolen.txt", None),  # escaping source
            m.Rename("inner", path, None),
            m.SetMeta(path, 0o777, mtime, None),
            m.CopyAside(path, "copied.txt", None),
            m.CopyAside("inside.txt", path, None),
        ]
    results = peer.apply(ops)
    bad = [(op, r) for op, r in zip(ops, results) if r.status != m.UNSAFE]
    assert not bad, "operations not refused as unsafe:\n" + "\n".join(f"  {op!r} -> {r!r}" for op, r in bad)

    # Streamed files (BlobStart/BlobData/PutBlob) with escaping paths.
    blob_ops: list[m.Op] = []
    for n, path in enumerate(_escaping_paths(outside, absolute), start=1000):
        peer.send(m.BlobStart(n, path, 6))
        peer.send(m.BlobData(n, b"pwned\n"))
        blob_ops.append(m.PutBlob(path, n, 0o644, mtime, None))
    results = peer.apply(blob_ops)
    bad = [(op, r) for op, r in zip(blob_ops, results) if r.status != m.UNSAFE]
    assert not bad, "blob commits not refused as unsafe:\n" + "\n".join(f"  {op!r} -> {r!r}" for op, r in bad)

    # Nothing changed anywhere: not outside, not at the absolute path, not even inside the root.
    assert tree_snapshot(box) == before_box
    assert not os.path.lexists(absolute)
    assert (outside / "victim.txt").read_text() == "precious\n"
    assert os.readlink(root / "link") == "../outside"
    # The agent is still healthy and serves a normal write inside the root.
    (ok,) = peer.apply([m.PutFile("inner/fine.txt", b"fine\n", 0o644, mtime, m.Expect(m.ABSENT))])
    assert ok.status == m.OK, ok
    assert (root / "inner" / "fine.txt").read_bytes() == b"fine\n"


def test_blob_committed_at_an_escaping_path_leaves_no_temp_file(peer: AgentPeer, sandbox: dict[str, Path]) -> None:
    """A blob streamed for a safe path, then committed at an escaping one: refused, and its
    temp file (in the root) is cleaned up."""
    root, box = sandbox["root"], sandbox["box"]
    peer.open(root)
    before = tree_snapshot(box)
    peer.send(m.BlobStart(7, "inner/ok.bin", 6))
    peer.send(m.BlobData(7, b"pwned\n"))
    (result,) = peer.apply([m.PutBlob("link/escape", 7, 0o644, 0, None)])
    assert result.status == m.UNSAFE, result
    (dropped,) = peer.apply([m.DropBlob("inner/ok.bin", 7)])
    assert dropped.status == m.OK
    after = tree_snapshot(box)
    assert after == before, f"left behind: {sorted(set(after) - set(before))}"


def test_escaping_reads_are_refused(peer: AgentPeer, sandbox: dict[str, Path]) -> None:
    """Scan, Hash and Fetch of escaping paths report nothing from outside the root."""
    root, outside = sandbox["root"], sandbox["outside"]
    peer.open(root)
    paths = ["../outside/victim.txt", "link/victim.txt", "abslink/victim.txt", "inner/../../outside/victim.txt"]
    for path in paths:
        parts = peer.fetch(path)
        assert parts[-1].error and not any(p.data for p in parts), (path, parts)
    leaked: list[Any] = []
    entries, _ = peer.entries(m.Scan(peer.req(), tuple(paths + ["../outside"]), True))
    leaked += entries
    for path in paths:  # one at a time too: symlinked paths are refused by the scanner itself
        entries, _ = peer.entries(m.Scan(peer.req(), (path,), True))
        leaked += entries
    entries, _ = peer.entries(m.Hash(peer.req(), tuple(paths)))
    leaked += entries
    assert not leaked, f"the agent described files outside its root: {leaked}"
    assert (outside / "victim.txt").read_text() == "precious\n"


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def _apply_before_open() -> bytes:
    conn = Connection("x")
    conn.initiate()
    return conn.send(m.Apply(1, (m.Remove("inside.txt", None),)))


# name -> (send our Hello first?, the bytes that follow)
GARBAGE: dict[str, tuple[bool, Callable[[], bytes]]] = {
    "noise-instead-of-hello": (False, lambda: b"GET / HTTP/1.1\r\n\r\n" + os.urandom(64)),
    "huge-frame-length": (True, lambda: b"\xff\xff\xff\xff" + os.urandom(256)),
    "zero-frame-length": (True, lambda: b"\x00\x00\x00\x00" + os.urandom(16)),
    "undecodable-msgpack": (True, lambda: _frame(b"\xc1" * 32)),
    "unknown-tag": (True, lambda: _frame(b"\x92\xcd\x03\xe7\x01")),  # [999, 1]
    "wrong-field-types": (True, lambda: _frame(b"\x93\x09\xa3abc\xc0")),  # Apply("abc", None)
    "second-hello": (True, lambda: Connection("x").initiate()),
    "apply-before-open": (True, _apply_before_open),
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_garbage_makes_the_agent_exit(sshd: SshServer, tmp_path: Path, case: str) -> None:
    send_hello, make_payload = GARBAGE[case]
    agent = AgentPeer(sshd, tmp_path / "agent-cache", tmp_path / "agent.err")
    try:
        agent.bootstrap()
        if send_hello:
            agent.handshake()
        agent.write(make_payload())
        # stdin stays open: the agent must give up on its own, not wait for more bytes.
        status = agent.wait_exit(10)
        assert status is not None, f"{case}: the agent still runs 10 s after garbage\n{agent.stderr()}"
        assert status != 0, f"{case}: the agent exited 0 after garbage\n{agent.stderr()}"
        # Its last word is a Fatal saying why.
        messages = agent.received + agent.conn.receive_data(agent.drain_stdout())
        assert messages and isinstance(messages[-1], m.Fatal), (case, messages)
        assert "Traceback" not in agent.stderr(), agent.stderr()
    finally:
        agent.close()
