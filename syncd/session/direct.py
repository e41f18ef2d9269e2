"""A push's tar stream on a way of its own: from the archiving child straight into the
remote host's GNU tar, through a process that reaches the host beside the agent (OpenSSH's
``ssh`` for SSH endpoints, see Channel.direct_argv).

The daemon then moves none of the stream's bytes: on the session channel it would frame,
encrypt and send each of them on its event loop, which made that one thread the limit of
a push. The agent still owns the staging directory (TarReady) and everything after the
stream: it lists what tar staged and places it as it places any stream (TarEnd).

The remote command prints a line before it becomes tar. A process that ends without that
line never ran tar (no route, authentication refused, no ``sh``): the push then goes over
the session channel as before. Once tar runs, a failure fails the push and the agent
discards what was staged; a stream counts as complete only when tar exits 0 and the
archiving child reported its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex

from syncd.tarstream import ExtractError

READY_LINE = b"syncd-direct\n"
START_TIMEOUT = 30.0  # seconds for the process to reach the remote and print READY_LINE
_STDERR_KEEP = 4096


class DirectUnavailable(Exception):
    """The process ended before the remote command ran: nothing was unpacked."""


class DirectFailed(ExtractError):
    """The remote tar or the link to it failed mid-stream."""


def tar_script(tar: str, staging: str) -> str:
    """The shell script unpacking stdin into ``staging`` with GNU ``tar`` (paths from the
    agent's TarReady): modes kept exactly, owners not."""
    return "printf 'syncd-direct\\n' && exec " + shlex.join(
        [tar, "-x", "-f", "-", "-p", "--no-same-owner", "--warning=no-unknown-keyword", "-C", staging])


class DirectStream:
    """The running process; ``start`` it on the read end of the archive's pipe, then
    ``wait`` for it."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self._stderr = b""
        self._stderr_task = asyncio.ensure_future(self._keep_stderr())

    @classmethod
    async def start(cls, argv: list[str], stdin_fd: int) -> DirectStream:
        """Run ``argv`` reading ``stdin_fd`` (closed here: the archiving child must see a
        broken pipe, not block, should the process die); return once the remote command
        runs. Raises DirectUnavailable if it never did."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=stdin_fd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True)
        except OSError as exc:
            raise DirectUnavailable(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
        finally:
            os.close(stdin_fd)
        stream = cls(proc)
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
        except TimeoutError:
            line = b""
        except BaseException:  # cancelled: the process must not outlive the push
            await asyncio.shield(stream.close())
            raise
        if line != READY_LINE:
            await stream.close()
            raise DirectUnavailable(stream.detail() or f"exit status {proc.returncode}")
        return stream

    async def _keep_stderr(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(4096):
            if len(self._stderr) < _STDERR_KEEP:
                self._stderr += chunk[: _STDERR_KEEP - len(self._stderr)]

    def detail(self) -> str:
        return self._stderr.decode("utf-8", "replace").strip().replace("\n", "; ")

    def done(self) -> bool:
        return self.proc.returncode is not None

    async def wait(self) -> None:
        """Wait for the end of the stream. Raises DirectFailed unless tar exited 0."""
        status = await self.proc.wait()
        await asyncio.wait([self._stderr_task], timeout=2)
        if status != 0:
            detail = self.detail()
            raise DirectFailed(f"the direct tar stream failed (status {status})" + (f": {detail}" if detail else ""))

    async def close(self) -> None:
        """Stop the process if it still runs."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()
        await asyncio.wait([self._stderr_task], timeout=2)
