"""The daemon's side of a resync's tar stream, in a process of its own.

In the daemon the event loop encrypts or decrypts the SSH stream. Reading and archiving
the tree (push), or extracting it (pull), in the same process made the two contend for one
interpreter lock: every file's system calls handed it over, and each hand-over cost both
sides CPU time. A child process does that work instead; the daemon only forwards the
stream and keeps every decision (what is refused, what is placed, the base).

Both children read on stdin a 4-byte big-endian length and the root's rules as JSON
(``Rules.to_wire``); the producer then lists the tree and waits for its go: a length and
the bytes to write ahead of the archive (see ProduceWorker.go). They report as msgpack
arrays:

- ``["n", files, bytes]``: what will be archived (produce only, before the stream);
- ``["p", files, bytes]``: progress since the last report;
- ``["e", path, kind, mode, size, mtime_ns, ino, digest, target]``: an entry archived
  (produce) or staged (extract; a path may come again, and its last report holds),
  reported as they go, before the progress report that counts them; neither child hashes
  files (digest None): the session records their digests once the tree is in place;
- ``["s", path, reason, detail]``: an entry skipped;
- ``["d", bytes]`` at the end, or ``["x", message]`` on failure (``["g", message]`` when
  the failure is that the stream's reader went away: the reader's own end says why).

``produce ROOT REPORT_FD``: lists the tree under the rules, writes the tar stream on
stdout and reports on REPORT_FD. ``extract STAGING ROOT``: reads the tar stream after the
rules on stdin, extracts it into STAGING and reports on stdout.

    python3 -m syncd.session.tar_worker produce ROOT REPORT_FD
    python3 -m syncd.session.tar_worker extract STAGING ROOT
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import struct
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import msgpack

import syncd
from syncd.fsops import PIPE_SIZE, size_pipe, write_all
from syncd.protocol import messages as m
from syncd.rules import Rules, load_root_rules
from syncd.scan import Scanner
from syncd.tarstream import ExtractError, TarExtractor, TarProducer, WriteFailed, scan_skips

_LENGTH = struct.Struct(">I")
_REPORT_EVERY = 500  # files between progress reports
_MAX_REPORT = 64 << 20  # no single report is near this; a larger one is garbage
STOP_TIMEOUT = 5.0  # seconds to wait for a stopped child's stdin to close


# ---- the children ------------------------------------------------------------------------


def _read_exact(fd: int, size: int, what: str) -> bytes:
    parts, got = [], 0
    while got < size:
        data = os.read(fd, size - got)
        if not data:
            raise ExtractError(f"the stream ended before the {what}")
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def _read_framed(fd: int, what: str) -> bytes:
    (size,) = _LENGTH.unpack(_read_exact(fd, _LENGTH.size, what))
    return _read_exact(fd, size, what)


def _read_rules(fd: int, root: str) -> Rules:
    return load_root_rules(root, **json.loads(_read_framed(fd, "rules")))


def _framed(body: bytes) -> bytes:
    return _LENGTH.pack(len(body)) + body


def _rules_header(rules: dict[str, list[str]]) -> bytes:
    """What a child reads first: the rules' length, then the rules as JSON."""
    return _framed(json.dumps(rules).encode())


class _Reports:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.packer = msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape")
        self.files = 0
        self.bytes = 0
        self.fresh: Callable[[], list[m.Entry]] = list  # what to report with the next progress

    def send(self, *item: Any) -> None:
        write_all(self.fd, self.packer.pack(list(item)))

    def progress(self, files: int, size: int) -> None:
        self.files += files
        self.bytes += size
        if self.files >= _REPORT_EVERY:
            self.flush()

    def flush(self) -> None:
        # Entries go with the progress that counts them: the daemon then has them when the
        # stream ends, not a whole tree's worth later.
        new = self.fresh()
        if new:
            self.entries(new)
        if self.files or self.bytes:
            self.send("p", self.files, self.bytes)
            self.files = self.bytes = 0

    def entries(self, entries: Iterable[m.Entry]) -> None:
        write_all(self.fd, b"".join(
            self.packer.pack(["e", e.path, e.kind, e.mode, e.size, e.mtime_ns, e.ino, e.digest, e.target])
            for e in entries))

    def skips(self, skipped: Iterable[m.Skip]) -> None:
        for s in skipped:
            self.send("s", s.path, s.reason, s.detail)


class _Appended:
    """Report source: the entries appended to a list since the last call (the producer's
    ``sent``, whose entries are final once there)."""

    def __init__(self, items: list[m.Entry]) -> None:
        self.items = items
        self.seen = 0

    def __call__(self) -> list[m.Entry]:
        new = self.items[self.seen:]
        self.seen += len(new)
        return new


class _Staged(dict[str, m.Entry]):
    """A TarExtractor's staged entries, noting each path set (report source: the entries
    set since the last call; a path set again, as a directory is once its metadata is
    final, is reported again, and the last report of a path is what it holds)."""

    def __init__(self) -> None:
        super().__init__()
        self._set: list[str] = []

    def __setitem__(self, rel: str, entry: m.Entry) -> None:
        super().__setitem__(rel, entry)
        self._set.append(rel)

    def __call__(self) -> list[m.Entry]:
        paths, self._set = self._set, []
        return [self[rel] for rel in paths]


class _Input:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self, size: int) -> bytes:
        return os.read(self.fd, size)


def extract_child(staging: str, root: str, in_fd: int = 0, out_fd: int = 1) -> int:
    """Extract the tar stream on ``in_fd`` into ``staging``; report on ``out_fd``."""
    size_pipe(in_fd)
    reports = _Reports(out_fd)
    try:
        rules = _read_rules(in_fd, root)
        extractor = TarExtractor(staging, is_ignored=rules.is_ignored, progress=reports.progress)
        extractor.entries = reports.fresh = _Staged()
        extractor.extract(_Input(in_fd))  # type: ignore[arg-type]
    except WriteFailed as exc:
        reports.send("w", str(exc))
        return 1
    except (ExtractError, OSError, ValueError) as exc:
        reports.send("x", str(getattr(exc, "strerror", None) or exc))
        return 1
    reports.flush()  # the last entries, and the directories' final metadata
    reports.skips(extractor.skipped)
    reports.send("d", extractor.bytes)
    return 0


def produce_child(root: str, report_fd: int, in_fd: int = 0, out_fd: int = 1) -> int:
    """Archive ``root`` under its rules on ``out_fd``; report on ``report_fd``."""
    size_pipe(out_fd)
    reports = _Reports(report_fd)
    try:
        # The ignore files are read as the walk meets them (each before its directory's
        # entries), as the session's own scans do: one walk of the tree, not two.
        rules = Rules.from_wire(json.loads(_read_framed(in_fd, "rules")))
        os.scandir(root).close()  # a root gone or unreadable is an error, not an empty tree
        scanner = Scanner(root, rules.is_ignored, on_gitignore=rules.ignore_file_read)
        entries = scanner.scan_all(hash_files=False)
        reports.skips(scan_skips(scanner.skipped))
        reports.send("n", len(entries), sum(e.size for e in entries if e.kind == m.FILE))
        lead = _read_framed(in_fd, "go")
        # Unhashed: the session records the digests once the tree is in place (its
        # _fill_digests), off the path of the stream.
        producer = TarProducer(root, entries, progress=reports.progress, hash_files=False)
        reports.fresh = _Appended(producer.sent)
        try:
            write_all(out_fd, lead)
            for chunk in producer.chunks():
                write_all(out_fd, chunk)
        finally:
            producer.close()
        os.close(out_fd)  # the stream is whole: the daemon may finish it while we report
    except BrokenPipeError:
        reports.send("g", "the stream's reader went away")
        return 1
    except (ExtractError, OSError, ValueError) as exc:
        reports.send("x", str(getattr(exc, "strerror", None) or exc))
        return 1
    reports.flush()  # the last entries
    reports.skips(producer.skipped)
    reports.send("d", producer.bytes)
    return 0


# ---- the daemon's side -------------------------------------------------------------------


class _Worker:
    """A child process and its reports."""

    def __init__(self, proc: asyncio.subprocess.Process, reports: asyncio.StreamReader,
                 progress: Callable[[int, int], None]) -> None:
        self.proc = proc
        self.progress = progress
        self.entries: dict[str, m.Entry] = {}
        self.skipped: list[m.Skip] = []
        self.bytes = 0
        self.totals: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self.error: str | None = None
        self.reader_gone = False  # the child failed because the stream's reader went away
        self.write_failed = False  # the child failed writing what it extracted
        self._done = False
        self._reader = asyncio.ensure_future(self._read_reports(reports))

    @staticmethod
    async def _spawn(*args: str, pass_fds: tuple[int, ...] = (), stdout: int = asyncio.subprocess.PIPE,
                     stdin: int = asyncio.subprocess.PIPE) -> asyncio.subprocess.Process:
        # The child imports the very syncd this daemon runs, however it was found.
        home = os.path.dirname(os.path.dirname(os.path.abspath(syncd.__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [home, os.environ.get("PYTHONPATH")])))
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "syncd.session.tar_worker", *args, env=env, pass_fds=pass_fds,
            stdin=stdin, stdout=stdout, stderr=asyncio.subprocess.PIPE, limit=PIPE_SIZE)

    def _send_rules(self, rules: dict[str, list[str]]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(_rules_header(rules))

    async def _read_reports(self, reports: asyncio.StreamReader) -> None:
        unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape", max_buffer_size=_MAX_REPORT)
        while data := await reports.read(1 << 16):
            unpacker.feed(data)
            for item in unpacker:
                self._report(item)

    def _report(self, item: list[Any]) -> None:
        tag = item[0]
        if tag == "p":
            self.progress(item[1], item[2])
        elif tag == "e":
            path, kind, mode, size, mtime_ns, ino, digest, target = item[1:]
            self._entry(m.Entry(path, kind, mode, size, mtime_ns, ino, digest, target))
        elif tag == "s":
            self.skipped.append(m.Skip(item[1], item[2], item[3]))
        elif tag == "n":
            self.totals.set_result((item[1], item[2]))
        elif tag == "d":
            self.bytes = item[1]
            self._done = True
        elif tag in ("x", "g", "w"):
            self.error = item[1]
            self.reader_gone = tag == "g"
            self.write_failed = tag == "w"

    def _entry(self, entry: m.Entry) -> None:
        self.entries[entry.path] = entry

    async def _outcome(self) -> None:
        """Wait for the child's last report; raise ExtractError if it failed."""
        await self._reader
        await self.proc.wait()
        if self.error is not None:
            raise ExtractError(self.error)
        if not self._done:
            detail = b""
            if self.proc.stderr is not None:
                detail = await self.proc.stderr.read()
            raise ExtractError(f"the tar process failed (status {self.proc.returncode})"
                               + (f": {detail.decode(errors='replace').strip()}" if detail.strip() else ""))

    async def _stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        # wait() returns only once every pipe has reached its end, and a pipe whose reader
        # is paused (its buffer full: nobody reads any more) never does: read them out.
        if self.proc.stdin is not None:
            self.proc.stdin.close()
            # A child that stopped reading (it failed) leaves its stdin broken: the error is
            # taken here, or Python before 3.11.4 (Debian 12 has 3.11.2) logs it as "never
            # retrieved" when the pipe is collected.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.proc.stdin.wait_closed(), STOP_TIMEOUT)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError, ValueError):
                    await pipe.read()
        await self.proc.wait()


class ExtractWorker(_Worker):
    """A child extracting into ``staging``: ``feed`` it the stream, ``finish``, then read
    ``entries``, ``skipped`` and ``bytes`` as from a TarExtractor."""

    def __init__(self, staging: str, proc: asyncio.subprocess.Process, progress: Callable[[int, int], None]) -> None:
        assert proc.stdout is not None
        super().__init__(proc, proc.stdout, progress)
        self.staging = staging

    @classmethod
    async def start(cls, staging: str, root: str, rules: dict[str, list[str]],
                    progress: Callable[[int, int], None]) -> ExtractWorker:
        proc = await cls._spawn("extract", staging, root)
        assert proc.stdin is not None
        pipe = proc.stdin.get_extra_info("pipe")
        if pipe is not None:
            size_pipe(pipe.fileno())
        worker = cls(staging, proc, progress)
        worker._send_rules(rules)
        return worker

    @classmethod
    async def start_on_pipe(cls, staging: str, root: str, rules: dict[str, list[str]],
                            progress: Callable[[int, int], None],
                            pipe: tuple[int, int] | None = None) -> tuple[ExtractWorker, int]:
        """A child that extracts from a pipe (``pipe``, read and write
        end, if another process writes into it already: it must not write before the
        rules are in); returns it and the pipe's write end (the rules already in it), for
        another process to write the stream into. ``finish`` once that process is done."""
        read_fd, write_fd = pipe if pipe is not None else os.pipe()
        worker: ExtractWorker | None = None
        try:
            size_pipe(write_fd)
            try:
                proc = await cls._spawn("extract", staging, root, stdin=read_fd)
            finally:
                os.close(read_fd)
            worker = cls(staging, proc, progress)
            # The child reads these at once: a blocking write ends as soon as it does.
            write_all(write_fd, _rules_header(rules))
        except BaseException:
            os.close(write_fd)
            if worker is not None:
                await worker.close()
            raise
        return worker, write_fd

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
        if self.proc.stdin is not None:
            with contextlib.suppress(ConnectionError):
                self.proc.stdin.close()
        await self._outcome()

    async def failed_writing(self) -> bool:
        """Once its stream has ended: whether the child failed writing (its own failure,
        which also stops it reading), as opposed to reading a stream cut short."""
        with contextlib.suppress(ExtractError):
            await self._outcome()
        return self.write_failed

    async def close(self) -> None:
        """Stop the child if it still runs, and remove the staging directory."""
        await self._stop()
        await asyncio.to_thread(shutil.rmtree, self.staging, True)


class ProduceWorker(_Worker):
    """A child archiving a tree: await ``totals``, iterate ``chunks`` (or hand the stream
    to another process: ``take_stream``, then ``go``), then ``finish`` for the entries archived
    (``entries``, files with digests) and ``skipped``. Entries archived so far can be
    taken meanwhile (``take_sent``)."""

    def __init__(self, proc: asyncio.subprocess.Process, reports: asyncio.StreamReader,
                 progress: Callable[[int, int], None], stream_fd: int = -1) -> None:
        super().__init__(proc, reports, progress)
        self._sent: list[m.Entry] = []
        self._stream_fd = stream_fd  # the archive's pipe, until read here or taken away
        self._stream: asyncio.StreamReader | None = None
        self._stream_pipe: Any = None

    def _entry(self, entry: m.Entry) -> None:
        super()._entry(entry)
        self._sent.append(entry)

    def take_sent(self, at_least: int = 1) -> list[m.Entry]:
        """The entries archived since the last call (files with their digests), once
        there are ``at_least`` of them (else nothing)."""
        if len(self._sent) < at_least:
            return []
        sent, self._sent = self._sent, []
        return sent

    @classmethod
    async def start(cls, root: str, rules: dict[str, list[str]], progress: Callable[[int, int], None]) -> ProduceWorker:
        read_fd, write_fd = os.pipe()
        stream_fd, child_stdout = os.pipe()
        try:
            proc = await cls._spawn("produce", root, str(write_fd), pass_fds=(write_fd,), stdout=child_stdout)
        except BaseException:
            os.close(read_fd)
            os.close(stream_fd)
            raise
        finally:
            os.close(write_fd)
            os.close(child_stdout)
        try:
            reports, _ = await _reader_on(read_fd)
        except BaseException:
            os.close(stream_fd)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        worker = cls(proc, reports, progress, stream_fd)
        worker._send_rules(rules)
        return worker

    def go(self, lead: bytes = b"") -> None:
        """Let the child stream the archive, ``lead`` first (once it listed the tree, it
        waits for this: a process started early may expect something else first, see
        direct.tar_script_on_cue). Only the first call counts."""
        stdin = self.proc.stdin
        if stdin is None or stdin.is_closing():
            return
        stdin.write(_framed(lead))
        stdin.close()  # the go is the last thing it reads

    async def announced(self) -> tuple[int, int]:
        """(files, bytes) the stream will hold, once listed. Raises ExtractError if the
        child failed first."""
        waiting: list[asyncio.Future[Any]] = [self.totals, self._reader]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not self.totals.done():
            await self._outcome()
            raise ExtractError("the tar process ended before it listed the tree")
        return self.totals.result()

    def take_stream(self) -> int:
        """The read end of the archive's pipe, for another process to read (the caller
        owns it now; ``chunks`` is then not to be used)."""
        fd, self._stream_fd = self._stream_fd, -1
        if fd < 0:
            raise ValueError("the archive's stream was taken already")
        return fd

    async def chunks(self) -> AsyncIterator[bytes]:
        """The tar stream as it comes (the child is told to go: see ``go``)."""
        self.go()
        if self._stream is None:
            fd = self.take_stream()
            self._stream, self._stream_pipe = await _reader_on(fd)
        stream = self._stream
        while True:
            try:  # whole chunks: the pipe delivers 64 KiB at a time, each a frame otherwise
                yield await stream.readexactly(PIPE_SIZE)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    yield exc.partial
                return

    async def finish(self) -> None:
        """The stream was read to its end: wait for the child's report. Raises ExtractError."""
        await self._outcome()

    async def close(self) -> None:
        """Stop the child if it still runs."""
        await self._stop()
        if self._stream_fd >= 0:
            os.close(self._stream_fd)
            self._stream_fd = -1
        if self._stream_pipe is not None:
            self._stream_pipe.close()
            self._stream_pipe = None


async def _reader_on(fd: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    """An asyncio reader on the pipe ``fd`` (owned by the returned transport)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=PIPE_SIZE)
    pipe = os.fdopen(fd, "rb", 0)
    try:
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    except BaseException:
        pipe.close()
        raise
    return reader, transport


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[1] == "extract":
        return extract_child(argv[2], argv[3])
    if len(argv) == 4 and argv[1] == "produce":
        return produce_child(argv[2], int(argv[3]))
    sys.stderr.write(__doc__ or "")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
