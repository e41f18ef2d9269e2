"""Atomic, symlink-safe operations on a sync root.

Used by the agent on the remote root and by the daemon on the local root, so it runs on
Python 3.8 with the standard library. Every path is resolved component by component with
``O_NOFOLLOW`` directory descriptors, so nothing is ever written through a symlink or
outside the root, even if the tree changes under us. Each write goes to a temp file in the
target's directory and is renamed into place after the caller's expectation is re-checked.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Dict, Iterator, List, Optional, Tuple

from syncd.protocol import messages as m
from syncd.scan import TEMP_PREFIX, content_hasher, entry_from_stat

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_O_PATH = getattr(os, "O_PATH", 0)
_NAME_MAX = 255


class UnsafePath(Exception):
    """The path is malformed, escapes the root, or crosses a symlink."""


class Mismatch(Exception):
    """The disk does not match the operation's Expect."""


PIPE_SIZE = 1 << 20  # while a tar stream runs
PIPE_DEFAULT = 1 << 16  # Linux's default, and the size outside streams


def size_pipe(fd: int, size: int = PIPE_SIZE) -> None:
    """Let a pipe carrying a stream hold ``size`` bytes: with the default 64 KiB, a stream
    costs a read, and a hand-over between threads or processes, for every 64 KiB. Large
    pipes count against a per-user limit (pipe-user-pages-soft) past which that user's new
    pipes shrink, so long-lived pipes are made large only while a stream runs."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except (ImportError, OSError):
        pass  # not a pipe, not Linux, above the limit, or (shrinking) still too full: it works anyway


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` (a pipe or a full disk may take it in parts)."""
    written = os.write(fd, data)
    if written < len(data):  # rare: only then is a view made
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(fd, view):]


def split_path(rel: str) -> List[str]:
    """Validate a relative path and return its components."""
    if not isinstance(rel, str) or rel == "":
        raise UnsafePath("empty path")
    if rel.startswith("/"):
        raise UnsafePath("absolute path %r" % rel)
    if "\0" in rel:
        raise UnsafePath("NUL in path %r" % rel)
    parts = rel.split("/")
    # Every path of a stream or a scan comes through here (twice per member): the checks
    # scan the list in C, and the loop runs only when something is wrong or long.
    if "" in parts or "." in parts or ".." in parts:
        bad = next(part for part in parts if part in ("", ".", ".."))
        raise UnsafePath("path %r has a %r component" % (rel, bad))
    # A character encodes to at most 4 bytes: only long names need encoding to check.
    if len(rel) > _NAME_MAX // 4 and max(map(len, parts)) > _NAME_MAX // 4:
        for part in parts:
            if len(part) > _NAME_MAX // 4 and len(os.fsencode(part)) > _NAME_MAX:
                raise UnsafePath("name too long in %r" % rel)
    return parts


def _temp_name(name: str, tag: str) -> str:
    raw = os.fsencode(TEMP_PREFIX + tag + "-")
    room = _NAME_MAX - len(raw)
    return os.fsdecode(raw + os.fsencode(name)[:room])


def _kind_of(st: os.stat_result) -> int:
    fmt = stat.S_IFMT(st.st_mode)
    if fmt == stat.S_IFREG:
        return m.FILE
    if fmt == stat.S_IFDIR:
        return m.DIR
    if fmt == stat.S_IFLNK:
        return m.SYMLINK
    return -2  # something syncd never writes over


class Blob:
    """A large file's content arriving in chunks, staged next to its destination."""

    def __init__(self, dir_fd: int, temp: str, fd: int) -> None:
        self.dir_fd = dir_fd
        self.temp = temp
        self.fd = fd
        self.error: Optional[Tuple[str, str]] = None


class Root:
    """Operations confined to one directory tree."""

    def __init__(self, path: str, fsync: bool = False) -> None:
        self.path = path
        self.fsync = fsync
        self.fd = os.open(path, _DIR_FLAGS)
        self._dirs: Dict[str, int] = {}
        self._blobs: Dict[int, Blob] = {}
        self._seq = 0

    def close(self) -> None:
        self.release()
        for blob_id in list(self._blobs):
            self.drop_blob(blob_id)
        os.close(self.fd)

    def release(self) -> None:
        """Close cached directory descriptors (after a batch, or when dirs moved)."""
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    # -- path resolution -----------------------------------------------------------------

    def parent(self, rel: str) -> Tuple[int, str]:
        """Return (directory fd, final name) for ``rel``, refusing any symlinked component."""
        return self.parent_of(rel, split_path(rel))

    def parent_of(self, rel: str, parts: List[str]) -> Tuple[int, str]:
        """``parent`` for a path already checked: ``parts`` is what ``split_path`` returned."""
        if len(parts) == 1:
            return self.fd, rel
        cached = self._dirs.get(rel[: -len(parts[-1]) - 1])
        if cached is not None:  # the usual case: a sibling was just resolved
            return cached, parts[-1]
        fd = self.fd
        key = ""
        for part in parts[:-1]:
            key = part if not key else key + "/" + part
            cached = self._dirs.get(key)
            if cached is not None:
                fd = cached
                continue
            try:
                fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePath(
                        "%r crosses a symlink or a non-directory at %r" % (rel, key)
                    ) from None
                raise
            self._dirs[key] = fd
        return fd, parts[-1]

    def lstat(self, rel: str) -> Optional[os.stat_result]:
        dir_fd, name = self.parent(rel)
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def entry(self, rel: str) -> Optional[m.Entry]:
        dir_fd, name = self.parent(rel)
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        target = os.readlink(name, dir_fd=dir_fd) if stat.S_ISLNK(st.st_mode) else None
        return entry_from_stat(rel, st, target)

    def _check(self, dir_fd: int, name: str, expect: Optional[m.Expect]) -> None:
        if expect is None:
            return
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            if expect.kind != m.ABSENT:
                raise Mismatch("expected an existing entry, found nothing") from None
            return
        kind = _kind_of(st)
        if expect.kind == m.ABSENT:
            raise Mismatch("expected nothing, found an entry")
        if kind != expect.kind:
            raise Mismatch("expected kind %d, found %d" % (expect.kind, kind))
        if kind == m.FILE and (st.st_size, st.st_mtime_ns) != (expect.size, expect.mtime_ns):
            raise Mismatch("file changed since it was scanned")
        if expect.ino and st.st_ino != expect.ino:
            raise Mismatch("file replaced since it was scanned")

    # -- writes ----------------------------------------------------------------------------

    def _next_tag(self) -> str:
        self._seq += 1
        return "%d-%d" % (os.getpid(), self._seq)

    def _finish_file(self, fd: int, mode: int, mtime_ns: int) -> None:
        os.fchmod(fd, mode & 0o7777)
        os.utime(fd, ns=(mtime_ns, mtime_ns))
        if self.fsync:
            os.fsync(fd)

    def _install(self, dir_fd: int, temp: str, name: str, expect: Optional[m.Expect]) -> None:
        try:
            self._check(dir_fd, name, expect)
            # rename(2) refuses to replace a directory with a file (EISDIR): no data loss.
            os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            self._unlink_quiet(dir_fd, temp)
            raise

    @staticmethod
    def _unlink_quiet(dir_fd: int, name: str) -> None:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass

    def put_file(
        self, rel: str, data: bytes, mode: int, mtime_ns: int, expect: Optional[m.Expect]
    ) -> Optional[m.Entry]:
        """Write a file atomically; return its entry (the inode survives the rename)."""
        dir_fd, name = self.parent(rel)
        temp = _temp_name(name, self._next_tag())
        fd = os.open(temp, _NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd)
        try:
            write_all(fd, data)
            self._finish_file(fd, mode, mtime_ns)
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            self._unlink_quiet(dir_fd, temp)
            raise
        os.close(fd)
        self._install(dir_fd, temp, name, expect)
        return entry_from_stat(rel, st)

    def start_blob(self, blob_id: int, rel: str) -> None:
        """Open a temp file beside ``rel`` for a streamed file; errors surface at commit."""
        self.drop_blob(blob_id)
        try:
            dir_fd, name = self.parent(rel)
            # The blob keeps its own descriptor: the batch cache may be released meanwhile.
            dir_fd = os.dup(dir_fd)
            temp = _temp_name(name, self._next_tag())
            try:
                fd = os.open(temp, _NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd)
            except BaseException:
                os.close(dir_fd)
                raise
            self._blobs[blob_id] = Blob(dir_fd, temp, fd)
        except UnsafePath as exc:
            failed = Blob(-1, "", -1)
            failed.error = (m.UNSAFE, str(exc))
            self._blobs[blob_id] = failed
        except OSError as exc:
            failed = Blob(-1, "", -1)
            failed.error = (m.FAILED, exc.strerror or str(exc))
            self._blobs[blob_id] = failed

    def blob_data(self, blob_id: int, data: bytes) -> None:
        blob = self._blobs.get(blob_id)
        if blob is None or blob.error is not None:
            return
        try:
            write_all(blob.fd, data)
        except OSError as exc:
            blob.error = (m.FAILED, exc.strerror or str(exc))
            self._close_blob_files(blob)

    def _close_blob_files(self, blob: Blob) -> None:
        if blob.fd >= 0:
            os.close(blob.fd)
            blob.fd = -1
        if blob.dir_fd >= 0:
            self._unlink_quiet(blob.dir_fd, blob.temp)
            os.close(blob.dir_fd)
            blob.dir_fd = -1

    def drop_blob(self, blob_id: int) -> None:
        blob = self._blobs.pop(blob_id, None)
        if blob is not None:
            self._close_blob_files(blob)

    def commit_blob(
        self, blob_id: int, rel: str, mode: int, mtime_ns: int, expect: Optional[m.Expect]
    ) -> Optional[Tuple[str, str]]:
        """Install a streamed file; returns (status, message) when it cannot."""
        blob = self._blobs.pop(blob_id, None)
        if blob is None:
            return (m.FAILED, "unknown blob %d" % blob_id)
        if blob.error is not None:
            self._close_blob_files(blob)
            return blob.error
        try:
            # Inside the try: if the path became unsafe meanwhile, the temp file still goes.
            dir_fd, name = self.parent(rel)
            self._finish_file(blob.fd, mode, mtime_ns)
            os.close(blob.fd)
            blob.fd = -1
            if not os.path.samestat(os.fstat(dir_fd), os.fstat(blob.dir_fd)):
                raise Mismatch("directory moved while the file was streamed")
            self._install(dir_fd, blob.temp, name, expect)
            blob.temp = ""
        finally:
            if blob.temp:
                self._close_blob_files(blob)
            else:
                os.close(blob.dir_fd)
        return None

    def make_dir(self, rel: str, mode: int, expect: Optional[m.Expect]) -> None:
        dir_fd, name = self.parent(rel)
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                raise Mismatch("a non-directory is in the way") from None
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            os.fchmod(fd, mode & 0o7777)
        finally:
            os.close(fd)

    def make_link(self, rel: str, target: str, expect: Optional[m.Expect]) -> None:
        dir_fd, name = self.parent(rel)
        temp = _temp_name(name, self._next_tag())
        os.symlink(target, temp, dir_fd=dir_fd)
        self._install(dir_fd, temp, name, expect)

    def remove(self, rel: str, expect: Optional[m.Expect]) -> None:
        dir_fd, name = self.parent(rel)
        self._check(dir_fd, name, expect)
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            cached = self._dirs.pop(rel, None)
            if cached is not None:
                os.close(cached)
            os.rmdir(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)

    def rename(self, rel: str, dest: str, expect: Optional[m.Expect]) -> None:
        src_fd, src_name = self.parent(rel)
        self._check(src_fd, src_name, expect)
        dst_fd, dst_name = self.parent(dest)
        self._check(dst_fd, dst_name, m.Expect(m.ABSENT))
        os.rename(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        # Cached descriptors stay valid, but their keys may now name other paths.
        self.release()

    def set_meta(self, rel: str, mode: int, mtime_ns: int, expect: Optional[m.Expect]) -> None:
        dir_fd, name = self.parent(rel)
        self._check(dir_fd, name, expect)
        if _O_PATH:
            fd = os.open(name, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                st = os.fstat(fd)
                if stat.S_ISLNK(st.st_mode):
                    return  # symlink modes mean nothing on Linux
                os.chmod("/proc/self/fd/%d" % fd, mode & 0o7777)
            finally:
                os.close(fd)
        if mtime_ns:
            os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=dir_fd, follow_symlinks=False)

    def copy_aside(self, rel: str, dest: str, expect: Optional[m.Expect]) -> None:
        """Copy a file or symlink to ``dest``, which must not exist (conflict copies)."""
        src_fd, src_name = self.parent(rel)
        self._check(src_fd, src_name, expect)
        st = os.stat(src_name, dir_fd=src_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            self.make_link(dest, os.readlink(src_name, dir_fd=src_fd), m.Expect(m.ABSENT))
            return
        if not stat.S_ISREG(st.st_mode):
            raise Mismatch("only files and symlinks get conflict copies")
        fd = os.open(src_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd)
        try:
            chunks = []
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(fd)
        self.put_file(dest, b"".join(chunks), stat.S_IMODE(st.st_mode), st.st_mtime_ns, m.Expect(m.ABSENT))

    # -- dispatch ---------------------------------------------------------------------------

    def apply(self, op: m.Op) -> m.OpResult:
        """Run one operation; never raises for OS errors, unsafe paths or mismatches."""
        try:
            if isinstance(op, m.PutFile):
                return m.OpResult(m.OK, "", self.put_file(op.path, op.data, op.mode, op.mtime_ns, op.expect))
            elif isinstance(op, m.PutBlob):
                err = self.commit_blob(op.blob, op.path, op.mode, op.mtime_ns, op.expect)
                if err is not None:
                    return m.OpResult(err[0], err[1])
            elif isinstance(op, m.MakeDir):
                self.make_dir(op.path, op.mode, op.expect)
            elif isinstance(op, m.MakeLink):
                self.make_link(op.path, op.target, op.expect)
            elif isinstance(op, m.Remove):
                self.remove(op.path, op.expect)
                return m.OpResult(m.OK)
            elif isinstance(op, m.Rename):
                self.rename(op.path, op.dest, op.expect)
                return m.OpResult(m.OK, "", self.entry(op.dest))
            elif isinstance(op, m.SetMeta):
                self.set_meta(op.path, op.mode, op.mtime_ns, op.expect)
            elif isinstance(op, m.DropBlob):
                self.drop_blob(op.blob)
                return m.OpResult(m.OK)
            elif isinstance(op, m.CopyAside):
                self.copy_aside(op.path, op.dest, op.expect)
                return m.OpResult(m.OK, "", self.entry(op.dest))
            else:
                return m.OpResult(m.FAILED, "unknown operation %s" % type(op).__name__)
            return m.OpResult(m.OK, "", self.entry(op.path))
        except UnsafePath as exc:
            return m.OpResult(m.UNSAFE, str(exc))
        except Mismatch as exc:
            return m.OpResult(m.CHANGED, str(exc))
        except FileNotFoundError as exc:
            return m.OpResult(m.CHANGED, exc.strerror or str(exc))
        except OSError as exc:
            return m.OpResult(m.FAILED, "%s: %s" % (op.path, exc.strerror or exc))


CHUNK = 1 << 20


def read_file(root: Root, rel: str) -> Iterator[Tuple[bytes, Optional[m.Entry], str]]:
    """Yield (data, None, "") chunks of a file, then ("", entry-with-digest, "") — or a
    final (b"", None, error) when it cannot be read or changed while being read."""
    try:
        dir_fd, name = root.parent(rel)
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except (OSError, UnsafePath) as exc:
        yield b"", None, "cannot read %s: %s" % (rel, getattr(exc, "strerror", None) or exc)
        return
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            yield b"", None, "%s is not a regular file" % rel
            return
        h = content_hasher()
        while True:
            data = os.read(fd, CHUNK)
            if not data:
                break
            h.update(data)
            yield data, None, ""
        after = os.fstat(fd)
    except OSError as exc:
        yield b"", None, "reading %s: %s" % (rel, exc.strerror)
        return
    finally:
        os.close(fd)
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        yield b"", None, "%s changed while it was read" % rel
        return
    entry = entry_from_stat(rel, after)
    assert entry is not None
    yield b"", m.Entry(rel, m.FILE, entry.mode, entry.size, entry.mtime_ns, entry.ino, h.digest()), ""
