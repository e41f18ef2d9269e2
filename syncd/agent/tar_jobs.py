"""The agent's side of tar streams: receive one into a staging area and put it in place,
or send the root as one.

A received stream is unpacked into a staging area while the main thread keeps reading
stdin. Nothing in the root changes until the whole stream has arrived: a stream cut short
leaves the root as it was.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from syncd.agent.gnu_tar import DirectStaging, TarProcess, find_gnu_tar
from syncd.fsops import Root, UnsafePath, split_path
from syncd.protocol import messages as m
from syncd.scan import TEMP_PREFIX, Scanner, is_stale_temp
from syncd.tarstream import (
    LEAVE_REASONS,
    ChunkReader,
    ExtractError,
    TarExtractor,
    TarProducer,
    merge_in,
    mirror,
    scan_skips,
    staging_name,
    unstage,
)

QUEUE_CHUNKS = 8  # chunks of about 1 MiB between the reading and the extracting thread
RESULT_CHUNK = 2000


def runtime_dir() -> str:
    """The agent's runtime directory (for uploads beside the workspace), created 0700."""
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if not base or not os.path.isdir(base) or not os.access(base, os.W_OK):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "syncd", "run")
    os.makedirs(path, 0o700, exist_ok=True)
    return path


def _reap_stale(directory: str) -> None:
    """Staging directories of killed uploads (outside the root, no scan would find them)."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith(TEMP_PREFIX) and is_stale_temp(n)]
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _Unpacker:
    """syncd's own TarExtractor on a thread, while the main thread keeps reading stdin; the
    bounded queue between them is the back-pressure (a full queue stops the reads, which
    stops the sender). Same interface as gnu_tar.TarProcess, used where GNU tar is not."""

    def __init__(self, staging: str, is_ignored: Callable[[str, bool], bool]) -> None:
        self.queue: "queue.Queue[Optional[bytes]]" = queue.Queue(QUEUE_CHUNKS)
        self.error: Optional[str] = None
        self.extractor = TarExtractor(staging, is_ignored=is_ignored)
        self.thread = threading.Thread(target=self._extract, name="syncd-untar", daemon=True)
        self.thread.start()

    def _extract(self) -> None:
        reader = ChunkReader(self.queue.get)
        try:
            self.extractor.extract(reader)  # type: ignore[arg-type]
        except ExtractError as exc:
            self.error = str(exc)
        except Exception as exc:  # keep draining: the main thread must never block on put
            self.error = "extraction failed: %r" % (exc,)
        reader.drain()

    def feed(self, data: bytes) -> None:
        self.queue.put(data)

    def end(self) -> Tuple[Dict[str, m.Entry], List[m.Skip]]:
        """The stream is complete: what was staged, and skipped. Raises ExtractError."""
        self.abort()
        if self.error is not None:
            raise ExtractError(self.error)
        return self.extractor.entries, self.extractor.skipped

    def abort(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def close(self) -> None:
        self.extractor.close()


class Receive:
    """One stream arriving from the daemon (TarReceive, TarData..., TarEnd), unpacked into
    a staging area by GNU tar where the host has it (see gnu_tar), else by a _Unpacker."""

    def __init__(self, root: Root, scanner: Scanner, msg: m.TarReceive) -> None:
        self.scanner = scanner
        self.req = msg.req
        self.whole_root = msg.path == "" and not msg.runtime
        self.merge = msg.merge and self.whole_root
        if msg.runtime:
            base = runtime_dir()
            self.base_root: Root = Root(base)
            self.own_root = True
        else:
            base = root.path
            self.base_root = root
            self.own_root = False
        try:
            self._setup(msg, base)
        except BaseException:
            if self.own_root:
                self.base_root.close()
            raise

    def _setup(self, msg: m.TarReceive, base: str) -> None:
        self.target = msg.path
        if self.target:
            parts = split_path(self.target)
            self._make_parents(parts[:-1])
            parent = "/".join(parts[:-1])
        else:
            if msg.runtime:
                raise UnsafePath("an upload needs a directory name")
            parent = ""
        self.parent = parent
        self.staging_rel = (parent + "/" if parent else "") + staging_name("tar-%d" % msg.req)
        # Every parent of the staging directory must be a real directory of this root, not
        # a symlink (raises UnsafePath): the archive is written by path below it, and stale
        # staging directories are reaped by path beside it.
        self.base_root.parent(self.staging_rel)
        _reap_stale(os.path.join(base, parent))
        self.where = os.path.join(base, self.target) if self.target else base
        self.staging = os.path.join(base, self.staging_rel)
        self.tar = find_gnu_tar() or ""
        if self.tar and msg.direct:
            self.unpack: Any = DirectStaging(self.tar, self.staging, self._ignored)
        elif self.tar:
            self.unpack = TarProcess(self.tar, self.staging, self._ignored)
        else:
            self.unpack = _Unpacker(self.staging, self._ignored)

    def _ignored(self, rel: str, is_dir: bool) -> bool:
        # Into the root: the root's rules hold (the sender applied the same ones).
        return self.whole_root and bool(self.scanner.is_ignored(rel, is_dir))

    def _make_parents(self, parts: List[str]) -> None:
        for i in range(1, len(parts) + 1):
            rel = "/".join(parts[:i])
            dir_fd, name = self.base_root.parent(rel)
            try:
                os.mkdir(name, 0o777, dir_fd=dir_fd)
            except FileExistsError:
                pass

    def feed(self, data: bytes) -> None:
        self.unpack.feed(data)

    def known(self, entries: Tuple[m.Entry, ...]) -> None:
        """Entries the daemon archived (TarDigests; sent unhashed: the daemon records the
        digests once the tree is in place): a direct push checks them against the rules
        while tar works."""
        if isinstance(self.unpack, DirectStaging):
            for e in entries:
                self.unpack.expect(e)

    def abort(self) -> None:
        """The link went away mid-stream: discard everything staged."""
        self.unpack.abort()
        self.close()

    def close(self) -> None:
        self.unpack.close()
        self.base_root.release()
        if self.own_root:
            self.base_root.close()

    def finish(self, skipped: Tuple[m.Skip, ...], shared: int = -1,
               ) -> Tuple[List[m.Entry], List[m.Entry], List[m.Skip], int]:
        """The stream is complete: put it in place. Returns the entries placed, the
        directories kept (the daemon makes them on its side too), what was skipped and how
        many entries were deleted. Raises ExtractError if the stream was bad. ``shared``:
        see TarEnd; where ``listed_in_place`` is then true, the entries placed carry the
        daemon's inodes: tarstream.in_place reads theirs."""
        try:
            if isinstance(self.unpack, DirectStaging):
                staged, unpack_skips = self.unpack.end(shared)
            else:
                staged, unpack_skips = self.unpack.end()
            unstage(self.base_root, self.staging_rel, staged,
                    [s.path for s in skipped if s.reason not in LEAVE_REASONS])
            if self.merge:
                merged = merge_in(self.base_root, self.staging_rel, staged)
                return merged.entries, [], unpack_skips + merged.skipped, 0
            if self.whole_root:
                existing = self.scanner.scan_all(hash_files=False)
                leave = [s.path for s in skipped if s.reason in LEAVE_REASONS]
                result = mirror(self.base_root, self.staging_rel, staged, existing,
                                lambda rel, kind: False, leave)
                return result.entries, result.kept_dirs, unpack_skips + result.skipped, result.deleted
            self._replace()
            return [], [], unpack_skips, 0
        finally:
            self.close()

    @property
    def listed_in_place(self) -> bool:
        """Whether the entries ``finish`` placed still need their inodes read in place."""
        return isinstance(self.unpack, DirectStaging) and self.unpack.listed_in_place

    def _replace(self) -> None:
        """Put the staged directory in place of the target, whatever the target was."""
        root = self.base_root
        staging_fd, staging_name_ = root.parent(self.staging_rel)
        os.chmod(staging_name_, 0o777 & ~_umask(), dir_fd=staging_fd)
        dir_fd, name = root.parent(self.target)
        old = staging_name("old-%d" % self.req)
        try:
            os.rename(name, old, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except FileNotFoundError:
            old = ""
        os.rename(staging_name_, name, src_dir_fd=staging_fd, dst_dir_fd=dir_fd)
        root.release()
        if old:
            path = os.path.join(root.path, self.parent, old)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)


class Send:
    """The root streamed to the daemon (TarSend) by a thread of its own, so that the main
    thread keeps reading the daemon's credits (TarAck): at most ``window`` bytes of data
    are sent ahead of them, which bounds what the link and the daemon buffer."""

    def __init__(self, root: Root, scanner: Scanner, msg: m.TarSend, send: Callable[[Any], None],
                 on_done: Optional[Callable[[], None]] = None) -> None:
        self.root = root
        self.scanner = scanner
        self.on_done = on_done
        self.req = msg.req
        self.window = msg.window
        self.send = send
        self.sent = 0
        self.acked = 0
        self.stopped = False
        self.credit = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="syncd-tar", daemon=True)
        self.thread.start()

    def ack(self, consumed: int) -> None:
        with self.credit:
            self.acked = max(self.acked, consumed)
            self.credit.notify()

    def stop(self) -> None:
        with self.credit:
            self.stopped = True
            self.credit.notify()
        self.thread.join(5.0)  # a write to a daemon that is gone fails soon; never hang on it

    def done(self) -> bool:
        return not self.thread.is_alive()

    def _wait_credit(self) -> bool:
        with self.credit:
            while self.window and self.sent - self.acked >= self.window and not self.stopped:
                self.credit.wait()
            return not self.stopped

    def _run(self) -> None:
        try:
            send_root(self.root, self.scanner, self.req, self._send_data, self.send)
        except OSError:
            pass  # the daemon went away; the main thread sees EOF
        except Exception as exc:  # report, never leave the daemon waiting
            try:
                self.send(m.Failure(self.req, "failed", "sending the tree failed: %r" % (exc,)))
            except OSError:
                pass
        finally:
            self.root.release()
            if self.on_done is not None:
                self.on_done()

    def _send_data(self, chunk: bytes) -> bool:
        if not self._wait_credit():
            return False
        self.send(m.TarData(self.req, chunk))
        self.sent += len(chunk)
        return True


def send_root(root: Root, scanner: Scanner, req: int, send_data: Callable[[bytes], bool],
              send: Callable[[Any], None]) -> None:
    """Stream the root (minus ignored entries) as tar: TarStart, TarData..., TarResult.
    ``send_data`` returns False when the stream is to stop."""
    entries, skipped = _listed(scanner)
    _start(req, entries, send)
    producer = TarProducer(root.path, entries)
    try:
        for chunk in producer.chunks():
            if not send_data(chunk):
                return
    finally:
        producer.close()
    send_result(send, req, producer.sent, skipped + producer.skipped, 0, root.path)


def _listed(scanner: Scanner) -> Tuple[List[m.Entry], List[m.Skip]]:
    """The root's entries under its rules, and what the scan skipped."""
    entries = scanner.scan_all(hash_files=False)
    return entries, scan_skips(scanner.skipped)


def _start(req: int, entries: List[m.Entry], send: Callable[[Any], None]) -> None:
    """TarStart with the totals of ``entries``."""
    send(m.TarStart(req, len(entries), sum(e.size for e in entries if e.kind == m.FILE)))


class _Announced(list):  # type: ignore[type-arg]
    """A scan's output that sends the entries on in TarResult chunks as they are found,
    keeping only their count and size."""

    def __init__(self, send_chunk: Callable[[List[m.Entry]], None]) -> None:
        super().__init__()
        self.send_chunk = send_chunk
        self.files = 0
        self.size = 0

    def append(self, entry: m.Entry) -> None:
        super().append(entry)
        self.files += 1
        if entry.kind == m.FILE:
            self.size += entry.size
        if len(self) >= RESULT_CHUNK:
            self.flush()

    def flush(self) -> None:
        if self:
            self.send_chunk(list(self))
            self.clear()


def send_listed(root: Root, scanner: Scanner, req: int, tar: str, send: Callable[[Any], None]) -> None:
    """A direct TarSend: the daemon's own GNU tar archives the root, reading the names of
    the entries to archive from the daemon as this walk finds them (minus ignored
    entries). TarReady first, naming that tar: the daemon's command may start. Then the
    entries (without digests) in TarResult chunks as they are found, TarStart with the
    totals once the walk is done, and a last TarResult with what the walk skipped."""
    send(m.TarReady(req, "", tar))
    listed = _Announced(lambda chunk: send(m.TarResult(req, tuple(chunk), (), 0, root.path, False)))
    scanner.scan_all(hash_files=False, out=listed)
    listed.flush()
    send(m.TarStart(req, listed.files, listed.size))
    send_result(send, req, [], scan_skips(scanner.skipped), 0, root.path)


def send_result(send: Callable[[Any], None], req: int, entries: List[m.Entry], skipped: List[m.Skip],
                deleted: int, where: str) -> None:
    """TarResult in chunks, so a huge tree never makes one huge frame."""
    count = max(len(entries), len(skipped), 1)
    for start in range(0, count, RESULT_CHUNK):
        last = start + RESULT_CHUNK >= count
        send(m.TarResult(req, tuple(entries[start : start + RESULT_CHUNK]),
                         tuple(skipped[start : start + RESULT_CHUNK]), deleted, where, last))
