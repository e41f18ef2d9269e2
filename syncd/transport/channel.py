"""A byte channel to a running agent, whatever carries it (SSH, pipe)."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod


class TransportError(Exception):
    """The agent could not be reached or started; the message is for the user."""


class Channel(ABC):
    """Bidirectional byte stream to the agent, plus its exit status once it ends."""

    def __init__(self) -> None:
        self._pending = b""
        self.stderr_tail = b""

    @abstractmethod
    async def _read_raw(self) -> bytes:
        """Up to 1 MiB from the agent; b"" at end of stream."""

    @abstractmethod
    def write(self, data: bytes) -> None: ...

    @abstractmethod
    async def drain(self) -> None: ...

    @abstractmethod
    async def close(self) -> None:
        """Close stdin and release the carrier (connection, process)."""

    @abstractmethod
    async def exit_status(self, timeout: float = 2.0) -> int | None: ...

    async def read(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        return await self._read_raw()

    async def readline(self, limit: int = 4096) -> bytes:
        """One line (with its newline), or what came before end of stream."""
        buf = self._pending
        self._pending = b""
        while b"\n" not in buf and len(buf) < limit:
            chunk = await self._read_raw()
            if not chunk:
                return buf
            buf += chunk
        line, sep, rest = buf.partition(b"\n")
        self._pending = rest
        return line + sep

    def _keep_stderr(self, chunk: bytes) -> None:
        self.stderr_tail = (self.stderr_tail + chunk)[-8192:]

    def stderr_text(self) -> str:
        return self.stderr_tail.decode("utf-8", "replace").strip()


class ProcessChannel(Channel):
    """The agent as a local child process (``local:`` and ``exec:`` endpoints)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        super().__init__()
        self.proc = proc
        assert proc.stdout and proc.stdin and proc.stderr
        self._stderr_task = asyncio.ensure_future(self._pump_stderr())

    async def _pump_stderr(self) -> None:
        assert self.proc.stderr
        while chunk := await self.proc.stderr.read(4096):
            self._keep_stderr(chunk)

    async def _read_raw(self) -> bytes:
        assert self.proc.stdout
        return await self.proc.stdout.read(1 << 20)

    def write(self, data: bytes) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(data)

    async def drain(self) -> None:
        assert self.proc.stdin
        await self.proc.stdin.drain()

    async def close(self) -> None:
        assert self.proc.stdin
        if not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 3)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        await asyncio.wait([self._stderr_task], timeout=1)

    async def exit_status(self, timeout: float = 2.0) -> int | None:
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            return None
        await asyncio.wait([self._stderr_task], timeout=1)
        return self.proc.returncode


async def spawn(argv: list[str]) -> ProcessChannel:
    """Start ``argv`` with pipes on all three standard streams."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise TransportError(f"cannot run {argv[0]}: {exc.strerror}") from None
    return ProcessChannel(proc)
