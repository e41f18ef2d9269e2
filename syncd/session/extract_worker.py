"""Extraction of a pulled tar stream in a process of its own.

In the daemon the event loop decrypts the SSH stream. Extracting in the same process made
the two contend for one interpreter lock: every file's system calls handed it over, and
each hand-over cost both sides. A child process extracts into the staging directory
instead and reports what it staged; placing it (``mirror``) stays with the daemon.

Child's stdin: a 4-byte big-endian length and the root's rules as JSON (``Rules.to_wire``),
then the raw tar stream to its end. Child's stdout, msgpack arrays:
``["p", files, bytes]`` progress since the last report, ``["e", path, kind, mode, size,
mtime_ns, ino, target]`` per staged entry, ``["s", path, reason, detail]`` per skipped
member, then ``["d", bytes]`` (done) or ``["x", message]`` (failed).

    python3 -m syncd.session.extract_worker STAGING ROOT
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import struct
import sys
from collections.abc import Callable, Iterable
from typing import Any

import msgpack

import syncd
from syncd.protocol import messages as m
from syncd.rules import load_root_rules
from syncd.tarstream import ExtractError, TarExtractor

_LENGTH = struct.Struct(">I")
PIPE_SIZE = 1 << 20
_REPORT_EVERY = 500  # files between progress reports
_MAX_REPORT = 64 << 20  # no single report is near this; a larger one is garbage


def grow_pipe(fd: int) -> None:
    """Let a pipe hold a whole chunk of the stream (the default is 64 KiB)."""
    import fcntl

    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)


# ---- the child ---------------------------------------------------------------------------


def _read_exact(fd: int, size: int) -> bytes:
    parts, got = [], 0
    while got < size:
        data = os.read(fd, size - got)
        if not data:
            raise ExtractError("the stream ended before the rules")
        parts.append(data)
        got += len(data)
    return b"".join(parts)


class _Reports:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.packer = msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape")
        self.files = 0
        self.bytes = 0

    def send(self, *item: Any) -> None:
        view = memoryview(self.packer.pack(list(item)))
        while view:
            view = view[os.write(self.fd, view):]

    def progress(self, files: int, size: int) -> None:
        self.files += files
        self.bytes += size
        if self.files >= _REPORT_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.files or self.bytes:
            self.send("p", self.files, self.bytes)
            self.files = self.bytes = 0


def child(staging: str, root: str, in_fd: int = 0, out_fd: int = 1) -> int:
    """Extract the tar stream on ``in_fd`` into ``staging``; report on ``out_fd``."""
    grow_pipe(in_fd)
    reports = _Reports(out_fd)
    try:
        (size,) = _LENGTH.unpack(_read_exact(in_fd, _LENGTH.size))
        rules = load_root_rules(root, **json.loads(_read_exact(in_fd, size)))
        extractor = TarExtractor(staging, is_ignored=rules.is_ignored, progress=reports.progress)
        extractor.extract(_Input(in_fd))  # type: ignore[arg-type]
    except (ExtractError, OSError, ValueError) as exc:
        reports.send("x", str(getattr(exc, "strerror", None) or exc))
        return 1
    reports.flush()
    for e in extractor.entries.values():
        reports.send("e", e.path, e.kind, e.mode, e.size, e.mtime_ns, e.ino, e.target)
    for s in extractor.skipped:
        reports.send("s", s.path, s.reason, s.detail)
    reports.send("d", extractor.bytes)
    return 0


class _Input:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self, size: int) -> bytes:
        return os.read(self.fd, size)


# ---- the daemon's side -------------------------------------------------------------------


class ExtractWorker:
    """A child process extracting into ``staging``: ``feed`` it the stream, ``finish``,
    then read ``entries``, ``skipped`` and ``bytes`` as from a TarExtractor."""

    def __init__(self, staging: str, proc: asyncio.subprocess.Process, progress: Callable[[int, int], None]) -> None:
        self.staging = staging
        self.proc = proc
        self.progress = progress
        self.entries: dict[str, m.Entry] = {}
        self.skipped: list[m.Skip] = []
        self.bytes = 0
        self.error: str | None = None
        self._done = False
        self._reader = asyncio.ensure_future(self._read_reports())

    @classmethod
    async def start(cls, staging: str, root: str, rules: dict[str, list[str]],
                    progress: Callable[[int, int], None]) -> ExtractWorker:
        # The child imports the very syncd this daemon runs, however it was found.
        package_home = os.path.dirname(os.path.dirname(os.path.abspath(syncd.__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_home, os.environ.get("PYTHONPATH")])))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "syncd.session.extract_worker", staging, root, env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdin is not None
        pipe = proc.stdin.get_extra_info("pipe")
        if pipe is not None:
            grow_pipe(pipe.fileno())
        header = json.dumps(rules).encode()
        proc.stdin.write(_LENGTH.pack(len(header)) + header)
        return cls(staging, proc, progress)

    async def _read_reports(self) -> None:
        assert self.proc.stdout is not None
        unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape", max_buffer_size=_MAX_REPORT)
        while data := await self.proc.stdout.read(1 << 16):
            unpacker.feed(data)
            for item in unpacker:
                self._report(item)

    def _report(self, item: list[Any]) -> None:
        tag = item[0]
        if tag == "p":
            self.progress(item[1], item[2])
        elif tag == "e":
            path, kind, mode, size, mtime_ns, ino, target = item[1:]
            self.entries[path] = m.Entry(path, kind, mode, size, mtime_ns, ino, None, target)
        elif tag == "s":
            self.skipped.append(m.Skip(item[1], item[2], item[3]))
        elif tag == "d":
            self.bytes = item[1]
            self._done = True
        elif tag == "x":
            self.error = item[1]

    async def feed(self, data: bytes) -> None:
        """Pass on a piece of the stream (waits while the child is behind)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            await self.proc.stdin.drain()
        except ConnectionError:  # the child stopped reading: it failed, and says why
            await self._outcome()
            raise ExtractError("the extraction process stopped reading") from None

    async def finish(self) -> None:
        """The stream is complete: wait for the child's report. Raises ExtractError."""
        assert self.proc.stdin is not None
        with contextlib.suppress(ConnectionError):
            self.proc.stdin.close()
        await self._outcome()

    async def _outcome(self) -> None:
        await self._reader
        await self.proc.wait()
        if self.error is not None:
            raise ExtractError(self.error)
        if not self._done:
            detail = b""
            if self.proc.stderr is not None:
                detail = await self.proc.stderr.read()
            raise ExtractError(f"the extraction process failed (status {self.proc.returncode})"
                               + (f": {detail.decode(errors='replace').strip()}" if detail.strip() else ""))

    def drop(self, paths: Iterable[str]) -> None:
        """Forget staged entries the source said not to trust (they go with the staging)."""
        for rel in paths:
            self.entries.pop(rel, None)

    async def close(self) -> None:
        """Stop the child if it still runs, and remove the staging directory."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await asyncio.to_thread(shutil.rmtree, self.staging, True)


if __name__ == "__main__":
    sys.exit(child(sys.argv[1], sys.argv[2]))
