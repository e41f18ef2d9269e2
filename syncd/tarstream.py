"""Tar streams for full resyncs and uploads.

Three steps, shared by the daemon and the agent (so this module runs on Python 3.8 with the
standard library only):

- ``TarProducer`` turns a list of scanned entries into tar bytes, chunk by chunk, reading
  each file once (and hashing it on the way, where the digests are wanted at once);
- ``TarExtractor`` reads a tar stream into a fresh staging directory, resolving every path
  with ``O_NOFOLLOW`` directory descriptors, so no member lands outside the staging
  directory whatever the archive says;
- ``mirror`` then makes the synced part of a root equal to the staging tree, entry by entry
  (atomic renames), deleting what the source lacks except what the caller keeps.

Nothing is held in memory beyond one chunk per step, and nothing is written twice: a staged
file reaches its place by rename.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from typing import BinaryIO, Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from syncd import tarformat as tf
from syncd.fsops import Root, UnsafePath, split_path, write_all
from syncd.protocol import messages as m
from syncd.scan import TEMP_PREFIX, content_hasher, entry_from_stat, is_under

CHUNK = 1 << 20
_ZEROS = bytes(CHUNK)
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_CACHED_DIRS = 256

# Reasons an entry is not carried (Skip.reason).
CHANGED = "changed"  # modified while it was archived: its bytes are not trusted
VANISHED = "vanished"  # removed between the scan and the read
UNREADABLE = "unreadable"  # the source could not read it: the destination keeps its own
SPECIAL = "special"  # FIFO, socket or device file: not synced
UNSAFE = "unsafe"  # a member name or link that escapes the destination
KEPT = "kept"  # a destination directory holding ignored or preserved entries stays
DANGLING = "dangling"  # a symlink to nothing (when following symlinks)
EXISTS = "exists"  # the destination holds something there already (merge_in): left to the live sync

# Skips after which the destination keeps whatever it has at that path.
LEAVE_REASONS = (UNREADABLE,)

Progress = Callable[[int, int], None]  # (files, bytes) just done


class ExtractError(Exception):
    """The archive is malformed or could not be written; the staging area is discarded."""


class WriteFailed(ExtractError):
    """The extraction failed writing (a full disk, say), not reading its stream."""


def scan_skips(skipped: Iterable[Tuple[str, str]]) -> List[m.Skip]:
    """A scanner's skipped entries, (path, why), as Skips: special or unreadable."""
    return [m.Skip(path, SPECIAL if why.startswith("special") else UNREADABLE, "%s: %s" % (path or ".", why))
            for path, why in skipped]


def staging_name(tag: str) -> str:
    """A name for a staging directory; the temp prefix keeps it out of scans and watchers,
    and the pid lets a later scan reap it if this process is killed."""
    return "%s%d-%s" % (TEMP_PREFIX, os.getpid(), tag)


def path_key(rel: str) -> str:
    """Sort key putting each directory right before its contents: the order of the paths
    compared component by component. NUL cannot occur in a name and sorts below every
    character that can, so comparing with each '/' turned into NUL gives that order,
    and a tree of 50,000 paths sorts in a quarter of the time the tuple of components
    took (the agent sorts it several times while it puts a stream in place)."""
    return rel.replace("/", "\0")


class ChunkReader:
    """A read-only file over a source of chunks (``get()`` returns bytes, or None at the
    end), for a tar reader fed by another thread. A read that takes a whole chunk gets
    the chunk itself, not a copy."""

    def __init__(self, get: Callable[[], Optional[bytes]]) -> None:
        self._get = get
        self._chunk = b""
        self._pos = 0
        self._eof = False

    def read(self, size: int = -1) -> bytes:
        while self._pos >= len(self._chunk) and not self._eof:  # an empty chunk is not the end
            data = self._get()
            if data is None:
                self._eof = True
            else:
                self._chunk, self._pos = data, 0
        pos = self._pos
        end = len(self._chunk) if size < 0 else min(pos + size, len(self._chunk))
        self._pos = end
        if pos == 0 and end == len(self._chunk):
            return self._chunk
        return self._chunk[pos:end]

    def drain(self) -> None:
        """Consume the source to its end (after the archive's end, or after an error)."""
        self._chunk, self._pos = b"", 0
        while not self._eof:
            if self._get() is None:
                self._eof = True


# ---- producing ---------------------------------------------------------------------------


class TarProducer:
    """Archive ``entries`` (paths relative to ``base``) as a tar stream.

    Files are opened without following symlinks (unless ``follow_symlinks``), read once,
    hashed (unless not ``hash_files``), and checked after reading: one that changed or
    shrank meanwhile still fills its slot (the format needs the announced size) but is
    listed as ``changed``. After the stream, ``sent`` holds the entries as archived (files
    with digests, or None) and ``skipped`` what is missing or untrusted, with reasons.
    """

    def __init__(self, base: str, entries: Iterable[m.Entry], follow_symlinks: bool = False,
                 progress: Optional[Progress] = None, hash_files: bool = True) -> None:
        self.base = base
        self.entries = sorted(entries, key=lambda e: path_key(e.path))
        self.follow = follow_symlinks
        self.progress = progress
        self.sent: List[m.Entry] = []
        self.skipped: List[m.Skip] = []
        self.bytes = 0
        self._root = Root(base)
        self._links: Dict[Tuple[int, int], Tuple[str, int, int, Optional[bytes]]] = {}
        self._hash = hash_files

    def close(self) -> None:
        self._root.close()

    def chunks(self) -> Iterator[bytes]:
        """The archive in pieces of about CHUNK bytes, ending with the two zero blocks."""
        pending: List[bytes] = []
        size = 0
        try:
            for entry in self.entries:
                for piece in self._member(entry):
                    pending.append(piece)
                    size += len(piece)
                    if size >= CHUNK:
                        self.bytes += size
                        yield b"".join(pending)
                        pending, size = [], 0
                if len(self._root._dirs) > _MAX_CACHED_DIRS:
                    self._root.release()
            pending.append(tf.END)
            self.bytes += size + len(tf.END)
            yield b"".join(pending)
        finally:
            self._root.release()

    @staticmethod
    def _header(rel: str, kind: bytes, mode: int, mtime_ns: int, size: int = 0, linkname: str = "") -> bytes:
        return tf.header(rel, kind, mode, mtime_ns, size, linkname)

    def _skip(self, rel: str, reason: str, detail: str) -> None:
        self.skipped.append(m.Skip(rel, reason, detail))

    def _member(self, entry: m.Entry) -> Iterator[bytes]:
        rel = entry.path
        if entry.kind == m.DIR:
            self.sent.append(entry)
            yield self._header(rel, tf.DIRECTORY, entry.mode, entry.mtime_ns)
            self._count(0)
        elif entry.kind == m.SYMLINK:
            try:
                dir_fd, name = self._root.parent(rel)
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                target = os.readlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                self._skip(rel, VANISHED, "%s vanished before it was archived" % rel)
                return
            except (OSError, UnsafePath) as exc:
                self._skip(rel, UNREADABLE, "cannot read %s: %s" % (rel, getattr(exc, "strerror", None) or exc))
                return
            if not stat.S_ISLNK(st.st_mode):
                self._skip(rel, CHANGED, "%s is no longer a symlink" % rel)
                return
            self.sent.append(m.Entry(rel, m.SYMLINK, 0o777, 0, st.st_mtime_ns, st.st_ino, None, target))
            yield self._header(rel, tf.SYMLINK, 0o777, st.st_mtime_ns, linkname=target)
            self._count(0)
        else:
            yield from self._file(rel)

    def _open(self, rel: str) -> int:
        if self.follow:
            return os.open(os.path.join(self.base, rel), os.O_RDONLY | os.O_CLOEXEC)
        dir_fd, name = self._root.parent(rel)
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)

    def _file(self, rel: str) -> Iterator[bytes]:
        try:
            fd = self._open(rel)
        except FileNotFoundError:
            self._skip(rel, VANISHED, "%s vanished before it was archived" % rel)
            return
        except (OSError, UnsafePath) as exc:
            if getattr(exc, "errno", None) == errno.ELOOP:
                self._skip(rel, CHANGED, "%s became a symlink" % rel)
            else:
                self._skip(rel, UNREADABLE, "cannot read %s: %s" % (rel, getattr(exc, "strerror", None) or exc))
            return
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                self._skip(rel, CHANGED, "%s is no longer a regular file" % rel)
                return
            key = (before.st_dev, before.st_ino)
            first = self._links.get(key) if before.st_nlink > 1 else None
            if first is not None and first[1:3] == (before.st_size, before.st_mtime_ns):
                # A hard link to a file already in the archive: carried as a link.
                self.sent.append(m.Entry(rel, m.FILE, stat.S_IMODE(before.st_mode), before.st_size,
                                         before.st_mtime_ns, before.st_ino, first[3]))
                yield self._header(rel, tf.HARDLINK, before.st_mode, before.st_mtime_ns, linkname=first[0])
                self._count(0)
                return
            size = before.st_size
            yield self._header(rel, tf.REGULAR, before.st_mode, before.st_mtime_ns, size)
            digest = content_hasher() if self._hash else None
            left = size
            short = False
            while left > 0:
                try:
                    data = os.read(fd, min(CHUNK, left))
                except OSError:
                    data = b""
                if not data:
                    short = True  # the file shrank: fill the announced size with zeros
                    while left > 0:
                        pad = min(left, CHUNK)
                        yield _ZEROS[:pad]
                        left -= pad
                    break
                if digest is not None:
                    digest.update(data)
                left -= len(data)
                yield data
            if tf.padding(size):
                yield bytes(tf.padding(size))
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if short or (after.st_size, after.st_mtime_ns) != (size, before.st_mtime_ns):
            self._skip(rel, CHANGED, "%s changed while it was archived" % rel)
            return
        value = None if digest is None else digest.digest()
        if before.st_nlink > 1:
            self._links[key] = (rel, size, before.st_mtime_ns, value)
        self.sent.append(m.Entry(rel, m.FILE, stat.S_IMODE(after.st_mode), size, after.st_mtime_ns,
                                 after.st_ino, value))
        self._count(size)

    def _count(self, size: int) -> None:
        if self.progress is not None:
            self.progress(1, size)


def walk_following(base: str, is_excluded: Callable[[str, bool], bool]) -> Tuple[List[m.Entry], List[m.Skip]]:
    """List a tree as if every symlink were what it points to (for uploads with
    ``--follow-symlinks``); a symlink loop or a dangling link is skipped."""
    entries: List[m.Entry] = []
    skipped: List[m.Skip] = []

    def walk(rel_dir: str, seen: Set[Tuple[int, int]]) -> None:
        path = os.path.join(base, rel_dir) if rel_dir else base
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            skipped.append(m.Skip(rel_dir, UNREADABLE, "cannot list %s: %s" % (rel_dir or ".", exc.strerror)))
            return
        for name in names:
            rel = rel_dir + "/" + name if rel_dir else name
            full = os.path.join(path, name)
            try:
                st = os.stat(full)
            except OSError:
                skipped.append(m.Skip(rel, DANGLING, "%s points to nothing" % rel))
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if is_excluded(rel, is_dir) or name.startswith(TEMP_PREFIX):
                continue
            if is_dir:
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    skipped.append(m.Skip(rel, UNSAFE, "%s loops back to one of its parents" % rel))
                    continue
                entries.append(m.Entry(rel, m.DIR, stat.S_IMODE(st.st_mode), 0, st.st_mtime_ns, st.st_ino))
                walk(rel, seen | {key})
            elif stat.S_ISREG(st.st_mode):
                entries.append(m.Entry(rel, m.FILE, stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns,
                                       st.st_ino))
            else:
                skipped.append(m.Skip(rel, SPECIAL, "%s is not a regular file, directory or symlink" % rel))

    top = os.stat(base)
    walk("", {(top.st_dev, top.st_ino)})
    return entries, skipped


# ---- extracting --------------------------------------------------------------------------


def _clean_name(name: str) -> str:
    """'./a/b/' -> 'a/b'; '' for the archive's own root entry."""
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    return "" if name == "." else name


class TarExtractor:
    """Extract a tar stream into ``staging`` (created here, empty, mode 0700).

    Every member is created through directory descriptors opened with ``O_NOFOLLOW`` below
    the staging directory: names with ``..``, absolute names, and members reached through
    a symlink are skipped as ``unsafe``. The archive's own root entry ('.' or './') is
    ignored, so extraction never changes the mode or times of a directory it does not own.
    Special files are skipped. Directory modes and times are applied last. Staged files
    carry no digest: the session records them once the tree is in place.
    """

    def __init__(self, staging: str, is_ignored: Optional[Callable[[str, bool], bool]] = None,
                 progress: Optional[Progress] = None) -> None:
        os.mkdir(staging, 0o700)
        self.staging = staging
        self.root = Root(staging)
        self.is_ignored = is_ignored
        self.progress = progress
        self.entries: Dict[str, m.Entry] = {}  # what was staged, as written
        self.skipped: List[m.Skip] = []
        self._dirs: Dict[str, Tuple[int, int]] = {}  # path -> (mode, mtime_ns)
        self.bytes = 0

    def extract(self, stream: BinaryIO) -> None:
        """Read the whole stream; raise ExtractError on a malformed archive or a write error."""
        reader = tf.TarReader(stream.read)
        try:
            while True:
                member = reader.next()
                if member is None:
                    break
                self._member(reader, member)
                if len(self.root._dirs) > _MAX_CACHED_DIRS:
                    self.root.release()
            self._finish_dirs()
        except tf.TarFormatError as exc:
            raise ExtractError("malformed tar stream: %s" % exc) from None
        except OSError as exc:
            raise WriteFailed("cannot write in %s: %s" % (self.staging, exc.strerror or exc)) from None
        finally:
            self.root.release()

    def close(self) -> None:
        """Remove the staging directory and whatever is left in it."""
        self.root.close()
        shutil.rmtree(self.staging, ignore_errors=True)

    def _skip(self, rel: str, reason: str, detail: str) -> None:
        self.skipped.append(m.Skip(rel, reason, detail))

    def _parent_fd(self, rel: str, parts: List[str]) -> Tuple[int, str]:
        """Directory fd and name for ``rel`` (``parts``: its checked components), making
        missing parent directories (archives need not list them)."""
        if len(parts) == 1:
            return self.root.fd, rel
        parent = rel[: -len(parts[-1]) - 1]
        known = self.entries.get(parent)
        if known is None or known.kind != m.DIR:  # not the usual sibling case
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                kind = self.entries.get(parent)
                if kind is None:
                    dir_fd, name = self.root.parent(parent)
                    try:
                        os.mkdir(name, 0o700, dir_fd=dir_fd)
                    except FileExistsError:
                        pass
                    self._dirs.setdefault(parent, (0o755, 0))
                    self.entries[parent] = m.Entry(parent, m.DIR, 0o755, 0, 0, 0)
                elif kind.kind != m.DIR:
                    raise UnsafePath("%s is not a directory in the archive" % parent)
        return self.root.parent_of(rel, parts)

    def _member(self, reader: tf.TarReader, member: tf.Member) -> None:
        rel = _clean_name(member.name)
        if rel == "":
            return  # the archive's own root: never touch the directory we extract into
        try:
            parts = split_path(rel)
        except UnsafePath as exc:
            self._skip(member.name, UNSAFE, str(exc))
            return
        is_dir = member.is_dir()
        if self.is_ignored is not None and self.is_ignored(rel, is_dir):
            return
        kind = member.kind
        if not (is_dir or member.is_file() or kind == tf.SYMLINK or kind == tf.HARDLINK):
            self._skip(rel, SPECIAL, "%s is a FIFO, socket or device file: not synced" % rel)
            return
        try:
            dir_fd, name = self._parent_fd(rel, parts)
            if is_dir:
                try:
                    os.mkdir(name, 0o700, dir_fd=dir_fd)
                except FileExistsError:  # made for an earlier member, or a non-directory to replace
                    if self._clear(dir_fd, name, True):
                        os.mkdir(name, 0o700, dir_fd=dir_fd)
                self._dirs[rel] = (member.mode, member.mtime_ns)
                self.entries[rel] = m.Entry(rel, m.DIR, member.mode, 0, 0, 0)
                self._count(0)
            elif kind == tf.SYMLINK:
                self._clear(dir_fd, name, False)
                os.symlink(member.linkname, name, dir_fd=dir_fd)
                os.utime(name, ns=(member.mtime_ns, member.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                self.entries[rel] = m.Entry(rel, m.SYMLINK, 0o777, 0, st.st_mtime_ns, st.st_ino, None,
                                            member.linkname)
                self._count(0)
            elif kind == tf.HARDLINK:
                self._clear(dir_fd, name, False)
                self._hard_link(rel, member.linkname, dir_fd, name)
            else:
                self._file(reader, member, rel, dir_fd, name)
        except UnsafePath as exc:
            self._skip(rel, UNSAFE, str(exc))

    def _clear(self, dir_fd: int, name: str, for_dir: bool) -> bool:
        """A later member replaces an earlier one of the same name (tar semantics); True if
        something was removed (a directory stays, for a directory member to merge into)."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if not for_dir:
                raise UnsafePath("%s is a directory earlier in the archive" % name)
            return False
        os.unlink(name, dir_fd=dir_fd)
        return True

    def _hard_link(self, rel: str, linkname: str, dir_fd: int, name: str) -> None:
        source = _clean_name(linkname)
        first = self.entries.get(source)
        if first is None or first.kind != m.FILE:
            self._skip(rel, UNSAFE, "%s links to %r, not a file earlier in the archive" % (rel, linkname))
            return
        src_fd, src_name = self.root.parent(source)
        os.link(src_name, name, src_dir_fd=src_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        self.entries[rel] = m.Entry(rel, m.FILE, first.mode, first.size, first.mtime_ns, first.ino, first.digest)
        self._count(0)

    def _file(self, reader: tf.TarReader, member: tf.Member, rel: str, dir_fd: int, name: str) -> None:
        # Created with its final mode (the umask permitting), so that most files need no
        # fchmod; only a later member of the same name needs the old one cleared first.
        mode = member.mode
        try:
            fd = os.open(name, _NEW_FILE, mode & 0o777, dir_fd=dir_fd)
        except FileExistsError:
            self._clear(dir_fd, name, False)
            fd = os.open(name, _NEW_FILE, mode & 0o777, dir_fd=dir_fd)
        try:
            while True:
                data = reader.read_data(CHUNK)
                if not data:
                    break
                write_all(fd, data)
            st = os.fstat(fd)
            if stat.S_IMODE(st.st_mode) != mode:
                os.fchmod(fd, mode)
            os.utime(fd, ns=(member.mtime_ns, member.mtime_ns))
        finally:
            os.close(fd)
        self.entries[rel] = m.Entry(rel, m.FILE, mode, st.st_size, member.mtime_ns, st.st_ino, None)
        self._count(st.st_size)

    def _count(self, size: int) -> None:
        self.bytes += size
        if self.progress is not None:
            self.progress(1, size)

    def _finish_dirs(self) -> None:
        """Directory modes and times last: writing inside a directory changes its mtime,
        and a read-only directory could not be filled."""
        for rel in sorted(self._dirs, key=path_key, reverse=True):
            mode, mtime = self._dirs[rel]
            st = _set_dir_meta(self.root, rel, mode, mtime)
            if st is not None:
                self.entries[rel] = m.Entry(rel, m.DIR, stat.S_IMODE(st.st_mode), 0, st.st_mtime_ns, st.st_ino)


def scan_staged(staging: str, is_ignored: Optional[Callable[[str, bool], bool]] = None,
                expected: Optional[Dict[str, Optional[m.Entry]]] = None) -> Tuple[Dict[str, m.Entry], List[m.Skip]]:
    """What another program (the system's tar) extracted into ``staging``, as a
    TarExtractor would have staged it: entries by path, and the skips. Ignored entries
    and special files are removed from the staging area, as the extractor would not have
    made them; their directory keeps the times it was given.

    ``expected``: the members of the archive as their sender listed them (None for one
    already found ignored). An entry found there with the same kind is taken from it with
    the inode read from the directory, with no stat and no rule lookup: tar gave it that
    mode and mtime. Anything else is stat'ed and checked here."""
    entries: Dict[str, m.Entry] = {}
    skipped: List[m.Skip] = []
    listed = (expected or {}).get
    new_entry = m.Entry

    def walk(prefix: str, path: str) -> None:
        with os.scandir(path) as listing:
            items = list(listing)
        touched: Optional[os.stat_result] = None
        for item in items:
            rel = prefix + item.name
            sent = listed(rel, _UNLISTED)
            if sent is not None and sent is not _UNLISTED:  # the common case, kept short
                kind = sent.kind
                if _is_kind(item, kind):
                    entries[rel] = new_entry(rel, kind, sent.mode, sent.size, sent.mtime_ns, item.inode(), None,
                                             sent.target)
                    if kind == m.DIR:
                        walk(rel + "/", item.path)
                    continue
            is_dir = item.is_dir(follow_symlinks=False)
            entry: Optional[m.Entry] = None
            if sent is not None:
                st = item.stat(follow_symlinks=False)
                entry = entry_from_stat(rel, st, os.readlink(item.path) if stat.S_ISLNK(st.st_mode) else None)
                if entry is None:
                    skipped.append(m.Skip(rel, SPECIAL, "%s is a FIFO, socket or device file: not synced" % rel))
            if entry is None or (is_ignored is not None and is_ignored(rel, is_dir)):
                if touched is None:
                    touched = os.stat(path, follow_symlinks=False)
                if is_dir:
                    shutil.rmtree(item.path)
                else:
                    os.unlink(item.path)
                continue
            entries[rel] = entry
            if is_dir:
                walk(rel + "/", item.path)
        if touched is not None:
            os.utime(path, ns=(touched.st_atime_ns, touched.st_mtime_ns), follow_symlinks=False)

    walk("", staging)
    return entries, skipped


_UNLISTED = m.Entry("", 0, 0, 0, 0, 0)  # marks a path the sender did not list


def _is_kind(item: "os.DirEntry[str]", kind: int) -> bool:
    """Whether a directory listing's ``item`` is of ``kind`` (from the listing: no stat)."""
    if kind == m.FILE:
        return item.is_file(follow_symlinks=False)
    if kind == m.DIR:
        return item.is_dir(follow_symlinks=False)
    return item.is_symlink()


def in_place(root: str, entries: List[m.Entry]) -> List[m.Entry]:
    """``entries`` (placed under ``root``) with the inodes they have there, read from their
    directories' listings (no stat each); an entry no longer there as that kind is left
    out (changed since it was placed: the next scan finds it)."""
    by_dir: Dict[str, List[int]] = {}
    for i, entry in enumerate(entries):
        by_dir.setdefault(entry.path.rpartition("/")[0], []).append(i)
    found: List[Optional[m.Entry]] = [None] * len(entries)
    for parent, indexes in by_dir.items():
        try:
            with os.scandir(os.path.join(root, parent) if parent else root) as listing:
                items = {item.name: item for item in listing}
        except OSError:
            continue
        for i in indexes:
            entry = entries[i]
            item = items.get(entry.path.rpartition("/")[2])
            if item is not None and _is_kind(item, entry.kind):
                found[i] = entry._replace(ino=item.inode())
    return [entry for entry in found if entry is not None]


def _set_dir_meta(root: Root, rel: str, mode: int, mtime_ns: int) -> Optional[os.stat_result]:
    dir_fd, name = root.parent(rel)
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        os.fchmod(fd, mode)
        if mtime_ns:
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        return os.fstat(fd)
    finally:
        os.close(fd)


# ---- mirroring ---------------------------------------------------------------------------


class MirrorResult:
    def __init__(self) -> None:
        self.entries: List[m.Entry] = []  # what the root now holds from the staging tree
        self.skipped: List[m.Skip] = []
        self.deleted = 0
        self.kept_dirs: List[m.Entry] = []  # absent from the source, kept: they hold kept entries
        self.kept: List[m.Entry] = []  # absent from the source, kept because ``keep`` said so


def _same(st: os.stat_result, entry: m.Entry) -> bool:
    if stat.S_ISDIR(st.st_mode):
        return entry.kind == m.DIR and (not entry.ino or st.st_ino == entry.ino)
    return (st.st_ino == entry.ino and (entry.kind != m.FILE or
            (st.st_size, st.st_mtime_ns) == (entry.size, entry.mtime_ns)))


def mirror(root: Root, staging_rel: str, staged: Dict[str, m.Entry], existing: Iterable[m.Entry],
           keep: Callable[[str, int], bool], leave: Iterable[str] = ()) -> MirrorResult:
    """Make the synced part of ``root`` equal to the tree staged at ``staging_rel``.

    ``existing``: the root's synced entries as scanned before (ignored ones never appear,
    so they stay). An existing entry absent from the staging tree is removed unless
    ``keep(path, kind)`` says otherwise or it is at or under a ``leave`` path, and unless it
    changed since it was scanned; a directory is removed only once empty, so directories
    holding kept entries stay. Each staged entry reaches its place by one rename; a new
    directory moves in whole.
    """
    result = MirrorResult()
    leave_set = set(leave)
    existing_list = list(existing)
    by_path = {e.path: e for e in existing_list}
    placed: Set[str] = set()  # staged paths now in place
    inside_moved: Set[str] = set()  # directories moved in whole, and everything under them
    carried: Set[str] = set()  # directories that moved in with their parent: as staged
    staged_dirs: List[str] = []

    def moved_with_parent(rel: str) -> bool:
        slash = rel.rfind("/")
        return slash > 0 and rel[:slash] in inside_moved

    order = sorted(staged, key=path_key)  # sorted once: staged_dirs and what is placed keep it
    for rel in order:
        entry = staged[rel]
        if moved_with_parent(rel):
            inside_moved.add(rel)
            placed.add(rel)
            if entry.kind == m.DIR:
                carried.add(rel)
            continue
        try:
            if entry.kind != m.DIR:
                try:  # over a file or a symlink, or where nothing is: one rename, no stat first
                    _move_in(root, staging_rel, rel, False)
                except IsADirectoryError:
                    if not _empty_dir_for(root, rel, by_path, keep, result):
                        result.skipped.append(m.Skip(rel, KEPT, "%s stays a directory: it holds ignored or "
                                                                "preserved entries" % rel))
                        continue
                    _move_in(root, staging_rel, rel, False)
                placed.add(rel)
                continue
            dir_fd, name = root.parent(rel)
            try:
                st: Optional[os.stat_result] = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            staged_dirs.append(rel)
            if st is not None and stat.S_ISDIR(st.st_mode):
                placed.add(rel)
                continue
            if st is not None:
                os.unlink(name, dir_fd=dir_fd)
            _move_in(root, staging_rel, rel, True)
            inside_moved.add(rel)
            placed.add(rel)
        except (OSError, UnsafePath) as exc:
            result.skipped.append(m.Skip(rel, UNSAFE if isinstance(exc, UnsafePath) else VANISHED,
                                         "cannot place %s: %s" % (rel, getattr(exc, "strerror", None) or exc)))

    for entry in sorted(existing_list, key=lambda e: path_key(e.path), reverse=True):
        rel = entry.path
        if rel in staged or is_under(rel, leave_set):
            continue
        if keep(rel, entry.kind):
            result.kept.append(entry)
            continue
        if _remove_if_same(root, rel, entry, result):
            result.deleted += 1

    for rel in reversed(staged_dirs):
        if rel in placed:
            mode, mtime = staged[rel].mode, staged[rel].mtime_ns
            try:
                _set_dir_meta(root, rel, mode, mtime)
            except (OSError, UnsafePath):
                pass
    root.release()
    _report_placed(root, staged, [rel for rel in order if rel in placed], result, carried)
    return result


def unstage(root: Root, staging_rel: str, staged: Dict[str, m.Entry], paths: Iterable[str]) -> None:
    """Forget the staged entries the source said not to trust (a file that changed while
    it was archived, say) and remove them from the staging area: a directory that moves
    in whole would carry them in otherwise, unrecorded, and the next cycle would take
    them for the other side's own files. Their directories get back the metadata they
    were staged with. Only files and symlinks are ever untrusted; a directory stays.
    Raises ExtractError if one cannot be removed (nothing may be placed then)."""
    parents: Set[str] = set()
    for rel in paths:
        entry = staged.get(rel)
        if entry is not None and entry.kind == m.DIR:
            continue
        try:
            dir_fd, name = root.parent(staging_rel + "/" + rel)
            # Not listed as staged (the list came from the sender, see DirectStaging):
            # whatever tar wrote there goes all the same, unless it is a directory.
            if entry is None and stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                continue
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        except (OSError, UnsafePath) as exc:
            raise ExtractError("cannot remove the untrusted %s from the staging area: %s"
                               % (rel, getattr(exc, "strerror", None) or exc)) from None
        staged.pop(rel, None)
        parents.add(rel.rpartition("/")[0])
    for rel in parents:
        parent = staged.get(rel) if rel else None
        if parent is not None and parent.kind == m.DIR and parent.ino:
            _set_dir_meta(root, staging_rel + "/" + rel, parent.mode, parent.mtime_ns)
    root.release()


def _report_placed(root: Root, staged: Dict[str, m.Entry], placed: Iterable[str], result: MirrorResult,
                   carried: Set[str]) -> None:
    """The entries now in place: a file or symlink as staged (it moved with its inode),
    a directory as found (an existing one is the root's own), except one ``carried`` in
    by its parent's move: nothing touched it since its metadata was set in the staging
    area, so it is as staged (a tree of thousands of directories needs no stat each)."""
    for rel in placed:
        entry = staged[rel]
        if entry.kind == m.DIR and not (rel in carried and entry.ino):
            try:
                now = root.entry(rel)
            except (OSError, UnsafePath):
                now = None
            if now is None or now.kind != m.DIR:
                continue
            entry = now
        result.entries.append(entry)
    root.release()


def merge_in(root: Root, staging_rel: str, staged: Dict[str, m.Entry]) -> MirrorResult:
    """Put the tree staged at ``staging_rel`` into ``root`` without replacing or deleting
    anything: an entry goes only where the root has nothing (a new directory moves in
    whole, a file or symlink is hard-linked in, which fails rather than replace), and
    lands in a directory the root already has. Where the root holds something, that
    stays and the path is skipped (EXISTS) for the live sync to reconcile: this is the
    first sync into a side that was empty, and which may not have stayed empty."""
    result = MirrorResult()
    placed: List[str] = []
    moved: Set[str] = set()  # directories moved in whole, and everything under them
    carried: Set[str] = set()  # directories that moved in with their parent: as staged
    blocked: Set[str] = set()  # staged directories that could not be placed

    for rel in sorted(staged, key=path_key):
        entry = staged[rel]
        slash = rel.rfind("/")
        parent = rel[:slash] if slash > 0 else ""
        if parent in moved:
            moved.add(rel)
            placed.append(rel)
            if entry.kind == m.DIR:
                carried.add(rel)
            continue
        if parent in blocked:
            blocked.add(rel)  # reported once, at the directory
            continue
        try:
            dir_fd, name = root.parent(rel)
            src_fd, src_name = root.parent(staging_rel + "/" + rel)
            if entry.kind != m.DIR:
                os.link(src_name, name, src_dir_fd=src_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
                placed.append(rel)
                continue
            try:
                st: Optional[os.stat_result] = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is None:
                os.rename(src_name, name, src_dir_fd=src_fd, dst_dir_fd=dir_fd)
                root.release()  # cached descriptors may name directories by their old paths
                moved.add(rel)
                placed.append(rel)
            elif stat.S_ISDIR(st.st_mode):
                placed.append(rel)
            else:
                blocked.add(rel)
                result.skipped.append(m.Skip(rel, EXISTS, "%s exists on the destination: kept" % rel))
        except FileExistsError:
            if entry.kind == m.DIR:
                blocked.add(rel)
            result.skipped.append(m.Skip(rel, EXISTS, "%s exists on the destination: kept" % rel))
        except (OSError, UnsafePath) as exc:
            if entry.kind == m.DIR:
                blocked.add(rel)
            result.skipped.append(m.Skip(rel, UNSAFE if isinstance(exc, UnsafePath) else VANISHED,
                                         "cannot place %s: %s" % (rel, getattr(exc, "strerror", None) or exc)))
    root.release()
    _report_placed(root, staged, placed, result, carried)
    return result


def _move_in(root: Root, staging_rel: str, rel: str, is_dir: bool) -> None:
    src_fd, src_name = root.parent(staging_rel + "/" + rel)
    dst_fd, dst_name = root.parent(rel)
    os.rename(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
    if is_dir:
        # Cached descriptors may now name directories by their old paths. Moving a file
        # changes none: keeping them spares every later file of the tree a walk down its
        # path again (that was most of placing 50,000 files over an existing tree).
        root.release()


def _remove_if_same(root: Root, rel: str, entry: m.Entry, result: MirrorResult) -> bool:
    """Remove an existing entry unless it changed since it was scanned (someone is still
    writing there: keep their work)."""
    try:
        dir_fd, name = root.parent(rel)
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except (OSError, UnsafePath):
        return False
    if not _same(st, entry):
        result.skipped.append(m.Skip(rel, CHANGED, "%s changed during the resync: kept" % rel))
        return False
    try:
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(name, dir_fd=dir_fd)
            root.release()
        else:
            os.unlink(name, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            result.kept_dirs.append(entry)  # it holds ignored or preserved entries
        elif exc.errno != errno.ENOENT:
            result.skipped.append(m.Skip(rel, UNREADABLE, "cannot remove %s: %s" % (rel, exc.strerror)))
        return False
    return True


def _empty_dir_for(root: Root, rel: str, by_path: Dict[str, m.Entry], keep: Callable[[str, int], bool],
                   result: MirrorResult) -> bool:
    """Remove a directory's synced contents and the directory, to put a file in its
    place; False if something kept remains."""
    prefix = rel + "/"
    inside = [e for p, e in by_path.items() if p.startswith(prefix)]
    for entry in sorted(inside, key=lambda e: path_key(e.path), reverse=True):
        if not keep(entry.path, entry.kind) and _remove_if_same(root, entry.path, entry, result):
            result.deleted += 1
    dir_fd, name = root.parent(rel)
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except OSError:
        return False
    root.release()
    result.deleted += 1
    return True
