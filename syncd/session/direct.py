"""A resync's tar stream on a way of its own, between syncd's child and the remote host's
GNU tar, through a process that reaches the host beside the agent (OpenSSH's ``ssh`` for
SSH endpoints, see Channel.direct_argv).

The daemon then moves none of the stream's bytes: on the session channel it would frame,
encrypt and send (or receive and decrypt) each of them on its event loop, which made that
one thread the limit of a resync. The agent still owns everything around the stream: on a
push it makes the staging directory (TarReady), lists what tar staged and places it
(TarEnd); on a pull it lists the tree for tar to archive, and the daemon's extracting
child, which trusts no member name, unpacks it.

The remote command prints a line on stderr before it becomes tar (stdout may carry the
archive). A process that ends without that line never ran tar (no route, authentication
refused, no ``sh``): the resync then goes over the session channel as before. Once tar
runs, a failure fails the resync and nothing is placed; a pushed stream counts as complete
only when tar exits 0 and the archiving child reported its end, a pulled one only when
the extracting child read the archive's end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal

from syncd.tarstream import ExtractError

READY_LINE = b"syncd-direct\n"
START_TIMEOUT = 30.0  # seconds for the process to reach the remote and print READY_LINE
_STDERR_KEEP = 4096
_NOISE_LINES = 50  # lines a remote login may print on stderr before READY_LINE


class DirectUnavailable(Exception):
    """The process ended before the remote command ran: nothing was unpacked."""


class DirectFailed(ExtractError):
    """The remote tar or the link to it failed mid-stream (``status``: the exit status)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status

    def reader_gone(self) -> bool:
        """Whether the process died writing to a pipe whose reader went away (the local
        extracting child, when archiving): the reader's own failure is the reason then."""
        return self.status in (128 + signal.SIGPIPE, -signal.SIGPIPE)


_READY = "printf 'syncd-direct\\n' >&2"  # on stderr: stdout may carry the archive


_EXTRACT = ["-x", "-f", "-", "-p", "--no-same-owner", "--warning=no-unknown-keyword", "-C"]


def tar_script(tar: str, staging: str) -> str:
    """The shell script unpacking stdin into ``staging`` with GNU ``tar`` (paths from the
    agent's TarReady): modes kept exactly, owners not."""
    return _READY + " && exec " + shlex.join([tar, *_EXTRACT, staging])


def tar_script_on_cue() -> str:
    """tar_script for a process started before the agent made the staging directory: the
    tar to run and the staging path come on stdin as two lines (see cue_lines), ahead of
    the archive. ``read`` takes a pipe byte by byte, so tar reads from the archive's first
    byte. Without both lines (stdin ends) it exits 1 and unpacks nothing."""
    return (f'{_READY} && IFS= read -r tar && IFS= read -r dir && [ -n "$tar" ] && [ -n "$dir" ] && '
            f'exec "$tar" {shlex.join(_EXTRACT)} "$dir"')


def cue_lines(tar: str, path: str) -> bytes | None:
    """What tar_script_on_cue reads ahead of the archive (the staging directory), or
    tar_create_script_on_cue ahead of the names (the root); None where a path cannot be
    one line (empty, or holding a newline)."""
    lines = [os.fsencode(tar), os.fsencode(path)]
    if any(not line or b"\n" in line for line in lines):
        return None
    return b"".join(line + b"\n" for line in lines)


def tar_create_script_on_cue() -> str:
    """The shell script archiving, with GNU ``tar`` on stdout, entries of a root whose
    names come on its stdin: the tar to run and the root as two lines first (see
    cue_lines), then the names, each ended by a NUL byte, taken verbatim, no recursion
    (the agent lists them as the daemon passes them on, so that tar starts on the first
    while the walk goes on). Without both lines (stdin ends) it exits 1 and archives
    nothing. pax format: nanosecond mtimes, long and non-UTF-8 names (not the atime and
    ctime GNU tar adds by default: nothing reads them, and every member's header would
    carry them). A file that cannot be read or vanished is left out with a warning (the
    daemon finds out which), and one that changed while read makes tar exit 1 (see
    CREATE_OK)."""
    options = shlex.join(["-c", "-f", "-", "--format=posix", "--pax-option=delete=atime,delete=ctime", "--null",
                          "--verbatim-files-from", "--no-recursion", "--ignore-failed-read"])
    return (f'{_READY} && IFS= read -r tar && IFS= read -r root && [ -n "$tar" ] && [ -n "$root" ] && '
            f'exec "$tar" {options} -C "$root" -T -')


EXTRACT_OK = (0,)
CREATE_OK = (0, 1)  # 1: GNU tar's "file changed as we read it"; the next cycle sees the change


class DirectStream:
    """The running process: ``start`` it, then ``wait`` for it."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self._stderr = b""
        self._ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._stderr_task = asyncio.ensure_future(self._read_stderr())

    @classmethod
    async def start(cls, argv: list[str], stdin_fd: int | None = None, stdout_fd: int | None = None,
                    stdin_pipe: bool = False) -> DirectStream:
        """Run ``argv`` on ``stdin_fd`` and ``stdout_fd`` (closed here: the process on the
        other end of such a pipe must see it broken, not block, should this one die), or
        with ``stdin_pipe`` on a pipe written through ``proc.stdin``; return once the
        remote command runs. Raises DirectUnavailable if it never did."""
        stdin = (asyncio.subprocess.PIPE if stdin_pipe else
                 asyncio.subprocess.DEVNULL if stdin_fd is None else stdin_fd)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=stdin,
                stdout=asyncio.subprocess.DEVNULL if stdout_fd is None else stdout_fd,
                stderr=asyncio.subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise DirectUnavailable(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
        finally:
            for fd in (stdin_fd, stdout_fd):
                if fd is not None:
                    os.close(fd)
        stream = cls(proc)
        try:
            ready = await asyncio.wait_for(asyncio.shield(stream._ready), START_TIMEOUT)
        except TimeoutError:
            ready = False
        except BaseException:  # cancelled: the process must not outlive the stream
            await asyncio.shield(stream.close())
            raise
        if not ready:
            await stream.close()
            raise DirectUnavailable(stream.detail() or f"exit status {proc.returncode}")
        return stream

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        try:
            for _ in range(_NOISE_LINES):
                line = await self.proc.stderr.readline()
                if line == READY_LINE:
                    self._ready.set_result(True)
                    self._stderr = b""  # what a login printed before is no longer of interest
                    break
                self._keep(line)
                if not line:
                    break
        finally:
            if not self._ready.done():
                self._ready.set_result(False)
        while chunk := await self.proc.stderr.read(4096):
            self._keep(chunk)

    def _keep(self, data: bytes) -> None:
        if len(self._stderr) < _STDERR_KEEP:
            self._stderr += data[: _STDERR_KEEP - len(self._stderr)]

    def detail(self) -> str:
        return self._stderr.decode("utf-8", "replace").strip().replace("\n", "; ")

    async def wait(self, ok: tuple[int, ...] = EXTRACT_OK) -> None:
        """Wait for the end of the stream. Raises DirectFailed unless the exit status is
        one of ``ok``."""
        status = await self.proc.wait()
        await asyncio.wait([self._stderr_task], timeout=2)
        if status not in ok:
            detail = self.detail()
            raise DirectFailed(f"the direct tar stream failed (status {status})" + (f": {detail}" if detail else ""),
                               status)

    async def close(self) -> None:
        """Stop the process if it still runs."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()
        await asyncio.wait([self._stderr_task], timeout=2)
