"""The remote agent: speaks the protocol on stdin/stdout and acts on one root.

Runs on Python 3.8+ with only the standard library and msgpack (pure-Python fallback is
fine). Threaded rather than asyncio: the main thread reads and serves requests in order,
the watcher thread (when enabled) sends Changes, and a lock keeps frames whole on stdout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from typing import Any, Dict, List, Optional, Sequence, Set

from syncd import __version__
from syncd.agent.gnu_tar import find_gnu_tar
from syncd.fsops import PIPE_DEFAULT, Root, UnsafePath, read_file, size_pipe, split_path, write_all
from syncd.protocol import messages as m
from syncd.protocol.codec import Connection, ProtocolError
from syncd.scan import PRINT_SIZE, Scanner, digest_bytes, is_temp_name, root_is_empty

log = logging.getLogger("syncd.agent")
SCAN_CHUNK = 2000
CAPABILITIES = ("scan", "hash", "apply", "blob", "watch", "tar", "scan-tree", "tar-digests")
DIRECT = "tar-direct"  # announced only where the host has GNU tar (see gnu_tar)


class Agent:
    def __init__(self, in_fd: int, out_fd: int) -> None:
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.conn = Connection("syncd-agent " + __version__, CAPABILITIES + ((DIRECT,) if find_gnu_tar() else ()))
        self.lock = threading.Lock()
        self.root: Optional[Root] = None
        self.scanner: Optional[Scanner] = None
        self.watcher: Any = None
        self.rules: Any = None
        self.receiving: Dict[int, Any] = {}  # req -> tar_jobs.Receive in progress
        self.sending: Any = None  # tar_jobs.Send of the tree, if one was started

    def send(self, message: Any) -> None:
        parts = self.conn.send_parts(message)
        with self.lock:
            for data in parts:
                write_all(self.out_fd, data)

    def run(self) -> int:
        with self.lock:
            write_all(self.out_fd, self.conn.initiate())
        try:
            while True:
                data = os.read(self.in_fd, 1 << 20)
                if not data:
                    return 0
                for message in self.conn.receive_data(data):
                    if isinstance(message, m.Bye):
                        return 0
                    if isinstance(message, m.Hello):
                        continue  # checked by the connection
                    self.handle(message)
        except ProtocolError as exc:
            log.error("protocol error: %s", exc)
            try:
                self.send(m.Fatal("agent: %s" % exc))
            except OSError:
                pass
            return 2
        finally:
            for job in self.receiving.values():
                job.abort()  # the daemon went away mid-stream: the root stays as it was
            self.receiving.clear()
            if self.sending is not None:
                self.sending.stop()
            if self.watcher is not None:
                self.watcher.stop()
            if self.root is not None:
                self.root.close()

    # -- requests ----------------------------------------------------------------------------

    def handle(self, msg: Any) -> None:
        if isinstance(msg, m.Open):
            self.open(msg)
            return
        if self.root is None or self.scanner is None:
            raise ProtocolError("%s before Open" % type(msg).__name__)
        paths = getattr(msg, "paths", None)
        if isinstance(msg, (m.Scan, m.Hash)) and paths is not None:
            try:
                for path in paths:
                    split_path(path)
            except UnsafePath as exc:
                self.send(m.Failure(msg.req, "unsafe", str(exc)))
                return
        if isinstance(msg, m.Scan):
            if msg.paths is None:
                entries = self.scanner.scan_all(hash_files=False)
                absent: List[str] = []
            else:
                # Dirty paths are mostly changed files: hashing them now saves the daemon a
                # Hash round trip (our own writes are in the digest cache already).
                entries, absent = self.scanner.scan_paths(msg.paths, msg.recursive, hash_files=True)
            self.send_entries(msg.req, entries, absent, self.scanner.unlisted)
        elif isinstance(msg, m.ScanTree):
            self.scan_tree(msg)
        elif isinstance(msg, m.Hash):
            entries, absent = self.scanner.hash_paths(msg.paths)
            self.send_entries(msg.req, entries, absent)
        elif isinstance(msg, m.Fetch):
            self.fetch(msg)
        elif isinstance(msg, m.BlobStart):
            self.root.start_blob(msg.blob, msg.path)
        elif isinstance(msg, m.BlobData):
            self.root.blob_data(msg.blob, msg.data)
        elif isinstance(msg, m.Apply):
            self.send(m.Applied(msg.req, tuple(self.apply_one(op) for op in msg.ops)))
            self.root.release()
        elif isinstance(msg, (m.TarReceive, m.TarData, m.TarEnd, m.TarSend, m.TarAck, m.TarDigests)):
            self.tar(msg)
        else:
            raise ProtocolError("unexpected %s from the daemon" % type(msg).__name__)

    def tar(self, msg: Any) -> None:
        from syncd.agent import tar_jobs  # imported late: only needed for resyncs and uploads
        from syncd.tarstream import ExtractError, in_place

        assert self.root is not None and self.scanner is not None
        if isinstance(msg, m.TarSend):
            if self.sending is not None and not self.sending.done():
                raise ProtocolError("a second tar stream while one is being sent")
            tar = find_gnu_tar() if msg.direct else None
            if tar:
                try:
                    tar_jobs.send_listed(self.root, self.scanner, msg.req, tar, self.send)
                except OSError as exc:
                    self.send(m.Failure(msg.req, "failed", "cannot list the tree: %s" % (exc.strerror or exc)))
                return
            size_pipe(self.out_fd)  # back to the default once sent (see size_pipe)
            self.sending = tar_jobs.Send(self.root, self.scanner, msg, self.send,
                                         on_done=lambda: size_pipe(self.out_fd, PIPE_DEFAULT))
            return
        if isinstance(msg, m.TarAck):
            if self.sending is not None and self.sending.req == msg.req:
                self.sending.ack(msg.consumed)
            return
        if isinstance(msg, m.TarReceive):
            if msg.req in self.receiving:
                raise ProtocolError("tar stream %d started twice" % msg.req)
            try:
                self.receiving[msg.req] = tar_jobs.Receive(self.root, self.scanner, msg)
            except (OSError, UnsafePath) as exc:
                self.send(m.Failure(msg.req, "failed", "cannot receive into %s: %s"
                                    % (msg.path or "the root", getattr(exc, "strerror", None) or exc)))
                return
            if msg.direct:
                job = self.receiving[msg.req]
                self.send(m.TarReady(msg.req, job.staging, job.tar))
            size_pipe(self.in_fd)
            return
        job = self.receiving.get(msg.req)
        if job is None:
            return  # the stream was refused: its data is dropped
        if isinstance(msg, m.TarData):
            job.feed(msg.data)
            return
        if isinstance(msg, m.TarDigests):
            job.known(msg.entries)
            return
        del self.receiving[msg.req]
        if not self.receiving:
            size_pipe(self.in_fd, PIPE_DEFAULT)
        if msg.cancel:
            job.abort()  # the daemon's stream failed: the root stays as it was
            return
        # Into the whole root, the daemon rescans all of it after this and drops the reports
        # that came before the result: the placed directories are watched without reports
        # of their content, and the other reports of our own placements are let out before
        # the result (settle), or they would arrive after it and make the next cycle look
        # at every path again.
        watcher = self.watcher if job.whole_root else None
        try:
            with watcher.placing() if watcher is not None else contextlib.nullcontext():
                entries, kept, skipped, deleted = job.finish(msg.skipped, msg.shared)
                if watcher is not None:
                    watcher.settle()
        except (OSError, UnsafePath, ExtractError) as exc:
            self.send(m.Failure(msg.req, "failed", str(getattr(exc, "strerror", None) or exc)))
            return
        # In place: the daemon can answer whoever waits while the listing is made and travels.
        self.send(m.TarPlaced(msg.req, tuple(skipped), deleted, tuple(kept)))
        if job.listed_in_place:
            entries = in_place(job.where, entries)
        tar_jobs.send_result(self.send, msg.req, entries, [], deleted, job.where)

    def apply_one(self, op: m.Op) -> m.OpResult:
        assert self.root is not None and self.scanner is not None
        result = self.root.apply(op)
        cache = self.scanner.cache
        cache.drop(op.path)
        if isinstance(op, m.PutFile) and result.entry is not None and result.status == m.OK:
            # Remember what we wrote, so a later scan of this path needs no re-read.
            entry = result.entry
            cache.put(m.Entry(entry.path, entry.kind, entry.mode, entry.size, entry.mtime_ns,
                              entry.ino, digest_bytes(op.data)))
        return result

    def fetch(self, msg: m.Fetch) -> None:
        assert self.root is not None
        try:
            for data, entry, error in read_file(self.root, msg.path):
                self.send(m.FileData(msg.req, data, entry, error))
        finally:
            self.root.release()  # cached directory descriptors must not outlive the request

    def scan_tree(self, msg: m.ScanTree) -> None:
        assert self.scanner is not None
        dirs = msg.dirs
        if len(msg.prints) != PRINT_SIZE * len(dirs):
            self.send(m.Failure(msg.req, "invalid", "ScanTree: %d bytes of fingerprints for %d directories"
                                % (len(msg.prints), len(dirs))))
            return
        prints = msg.prints
        expect = {d: prints[i * PRINT_SIZE : (i + 1) * PRINT_SIZE] for i, d in enumerate(dirs)}
        entries, matched = self.scanner.scan_tree(expect, hash_files=False)
        bits = bytearray((len(dirs) + 7) // 8)
        for i, d in enumerate(dirs):
            if d in matched:
                bits[i >> 3] |= 1 << (i & 7)
        self.send(m.TreeMatched(msg.req, bytes(bits)))
        self.send_entries(msg.req, entries, [])

    def send_entries(self, req: int, entries: List[m.Entry], absent: List[str],
                     unlisted: Sequence[str] = ()) -> None:
        for start in range(0, max(len(entries), 1), SCAN_CHUNK):
            chunk = tuple(entries[start : start + SCAN_CHUNK])
            last = start + SCAN_CHUNK >= len(entries)
            self.send(m.ScanChunk(req, chunk, tuple(absent) if last else (), last, tuple(unlisted) if last else ()))

    def open(self, msg: m.Open) -> None:
        from syncd.rules import Rules  # imported late: only needed once a root is bound

        root = os.path.abspath(os.path.expanduser(msg.root))
        try:
            if msg.create:
                os.makedirs(root, exist_ok=True)
            if not os.path.isdir(root):
                self.send(m.Failure(msg.req, "no-root", "%s is not a directory" % root))
                return
            probe = os.path.join(root, ".syncd-tmp-probe-%d" % os.getpid())
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            self.send(m.Failure(msg.req, "not-writable", "cannot write in %s: %s" % (root, exc.strerror)))
            return
        if self.root is not None:
            self.root.close()
        self.root = Root(root)
        self.rules = Rules.from_wire(msg.rules)
        self.scanner = Scanner(root, self.rules.is_ignored, on_gitignore=self.rules.ignore_file_read)
        backend = ""
        if msg.watch:
            backend = self.start_watching(root)
        self.send(m.Opened(msg.req, root, sys.version.split()[0], backend, root_is_empty(root, self.rules.is_ignored),
                           sys.executable or ""))

    def start_watching(self, root: str) -> str:
        from syncd.agent.watch import start_watcher

        def on_batch(paths: Set[str], overflow: bool) -> None:
            try:
                self.send(m.Changes(tuple(sorted(paths)), overflow))
            except OSError:
                pass  # the daemon went away; the main loop sees EOF

        # inotify first: unlike watchfiles it reports queue overflow (answered by a rescan)
        # and copes with names that are not UTF-8.
        rules = self.rules

        def ignored(rel: str, is_dir: bool) -> bool:
            # Our own temp files come and go with every write: never report them.
            return is_temp_name(rel) or bool(rules.is_ignored(rel, is_dir))

        self.watcher = start_watcher(root, on_batch, is_ignored=ignored, prefer="inotify", step_ms=10)
        return str(self.watcher.backend)


def main() -> int:
    """Serve the protocol on stdin/stdout until the daemon says Bye or goes away."""
    logging.basicConfig(
        stream=sys.stderr, level=logging.WARNING, format="syncd-agent: %(levelname)s %(message)s"
    )
    in_fd, out_fd = os.dup(0), os.dup(1)
    # Anything printed by accident must not corrupt the protocol stream.
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return Agent(in_fd, out_fd).run()


if __name__ == "__main__":
    sys.exit(main())
