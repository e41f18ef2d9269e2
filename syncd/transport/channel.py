"""A byte channel to a running agent, whatever carries it (SSH, pipe)."""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

log = logging.getLogger("syncd.agent")
STDERR_LINES_PER_MINUTE = 60  # lines of the agent's stderr logged per minute, at most
_MAX_STDERR_LINE = 4096


# A script -> a local command line running it on the agent's host, beside the agent.
DirectArgv = Callable[[str], "list[str] | None"]
# Told how to run a script beside the agent as soon as the endpoint is reached, before
# the agent starts there (see start_agent).
OnLink = Callable[[DirectArgv], None]


class TransportError(Exception):
    """The agent could not be reached or started; the message is for the user."""


class Channel(ABC):
    """Bidirectional byte stream to the agent, plus its exit status once it ends."""

    def __init__(self) -> None:
        self._pending = b""
        self.stderr_tail = b""
        self._label: str | None = None  # whose agent, once its stderr is logged (log_stderr_as)
        self._stderr_line = b""
        self._stderr_window = (0.0, 0)  # (start, lines logged in it)

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

    async def rerun(self, command: str) -> Channel:
        """Run ``command`` the way this channel's own command was run (on the same SSH
        connection, through the same shell), once this one's process has ended."""
        await self.close()
        raise TransportError("this channel cannot run another command")

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

    def log_stderr_as(self, label: str) -> None:
        """From now on log each line of the agent's stderr, naming ``label``: its own
        warnings (a watch that overflowed, a root that vanished) happen on the remote,
        and this is where they are seen. Before (while it starts), stderr only goes into
        the error of a failed start: a remote shell's noise is not the agent's."""
        self._label = label

    def _keep_stderr(self, chunk: bytes) -> None:
        self.stderr_tail = (self.stderr_tail + chunk)[-8192:]
        if self._label is None:
            return
        *lines, rest = (self._stderr_line + chunk).split(b"\n")
        if len(rest) > _MAX_STDERR_LINE:
            lines.append(rest)
            rest = b""
        self._stderr_line = rest
        for line in lines:
            self._log_stderr(line)

    def _log_stderr(self, line: bytes) -> None:
        text = line[:_MAX_STDERR_LINE].decode("utf-8", "replace").rstrip()
        if not text:
            return
        # Bounded: a remote that prints without end must not fill the journal.
        now = time.monotonic()
        start, count = self._stderr_window
        if now - start >= 60.0:
            start, count = now, 0
        count += 1
        self._stderr_window = (start, count)
        who = f"{self._label}: " if self._label else ""
        if count <= STDERR_LINES_PER_MINUTE:
            log.warning("%sagent: %s", who, text)
        elif count == STDERR_LINES_PER_MINUTE + 1:
            log.warning("%sagent: more than %d lines on stderr in a minute; the rest of this minute's are "
                        "not logged", who, STDERR_LINES_PER_MINUTE)

    def stderr_text(self) -> str:
        return self.stderr_tail.decode("utf-8", "replace").strip()

    def direct_argv(self, script: str) -> list[str] | None:
        """A local command that runs the shell ``script`` on the agent's host, beside the
        agent (a bulk stream can then skip this channel), or None where there is none."""
        return None


class ProcessChannel(Channel):
    """The agent as a local child process (``local:`` and ``exec:`` endpoints)."""

    def __init__(self, proc: asyncio.subprocess.Process, shell: list[str] | None = None) -> None:
        super().__init__()
        self.proc = proc
        self.shell = shell  # how to run a shell script where the agent runs
        assert proc.stdout and proc.stdin and proc.stderr
        self._stderr_task = asyncio.ensure_future(self._pump_stderr())

    async def _pump_stderr(self) -> None:
        assert self.proc.stderr
        while chunk := await self.proc.stderr.read(4096):
            self._keep_stderr(chunk)

    async def _read_raw(self) -> bytes:
        assert self.proc.stdout
        return await self.proc.stdout.read(1 << 20)

    def direct_argv(self, script: str) -> list[str] | None:
        return None if self.shell is None else [*self.shell, script]

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

    async def rerun(self, command: str) -> Channel:
        if self.shell is None:
            return await super().rerun(command)
        await self.close()
        return await spawn(self.shell, command)


async def spawn(shell: list[str], script: str) -> ProcessChannel:
    """Start ``shell`` (a command taking a shell script: ``/bin/sh -c``, ``docker exec -i
    box sh -c``) on ``script``, with pipes on all three standard streams."""
    argv = [*shell, script]
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
    return ProcessChannel(proc, shell)
