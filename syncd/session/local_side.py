"""The local root as the session sees it: scanning with the base as digest cache,
applying operations through the same fsops as the agent, and reading file content."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from syncd.engine.index import BaseIndex
from syncd.engine.model import Agreed
from syncd.fsops import Root, read_file
from syncd.protocol import messages as m
from syncd.rules import Rules
from syncd.scan import DIGEST_SCHEME, DigestCache, Scanner, file_digest, join
from syncd.store import Store

log = logging.getLogger("syncd.session")
_RELEASE_EVERY = 256  # files read between releases of the cached directory descriptors


def load_base(store: Store, local: str) -> BaseIndex:
    """The session's base. An index written by an older syncd holds file digests of
    another scheme: they are computed again first (once) for the files the local side
    still holds as recorded, and left unknown for the others, which a scan hashes anyway
    since their stat no longer matches."""
    if store.stale_digests:
        old = store.load()
        files = [row for row in [*old.values(), *old.kept_rows()] if row.kind == m.FILE]
        log.warning("%s: the index holds digests of an older syncd: hashing %d local files again as %s (once)",
                    store.path, len(files), DIGEST_SCHEME)
        store.redigest(local_digests(local, files))
    return store.load()


def local_digests(path: str, rows: Iterable[Agreed]) -> dict[str, bytes | None]:
    """The digest of each row's local file, None where it is not the file recorded (other
    size, mtime or inode), is gone, or cannot be read. Read like any synced file: no
    symlink is followed, and a file that changes while read gets None."""
    root = Root(path)
    out: dict[str, bytes | None] = {}
    try:
        for count, row in enumerate(rows, 1):
            read = None
            for _data, entry, _error in read_file(root, row.path):
                read = entry  # the last item: the entry, or None with the error
            same = read is not None and (read.size, read.mtime_ns, read.ino) == (row.size, row.mtime_ns, row.local_ino)
            out[row.path] = read.digest if same and read is not None else None
            if count % _RELEASE_EVERY == 0:
                root.release()
    finally:
        root.close()
    return out


class BaseDigests(DigestCache):
    """Digest cache that also trusts the base index for files it recorded."""

    def __init__(self, base: BaseIndex) -> None:
        super().__init__()
        self.base = base

    def get(self, rel: str, size: int, mtime_ns: int, ino: int) -> bytes | None:
        agreed = self.base.get(rel) or self.base.kept(rel)
        if (agreed is not None and agreed.kind == m.FILE and agreed.size == size
                and agreed.mtime_ns == mtime_ns and agreed.local_ino == ino):
            return agreed.digest
        return super().get(rel, size, mtime_ns, ino)


class LocalSide:
    def __init__(self, path: str, rules: Rules, base: BaseIndex) -> None:
        self.path = path
        self.rules = rules
        self.scanner = Scanner(path, rules.is_ignored, BaseDigests(base), rules.ignore_file_read)
        self.root = Root(path)

    def reload_ignore_file(self, rel: str) -> None:
        """A .gitignore or .git/info/exclude changed: re-read it."""
        try:
            with open(join(self.path, rel), "rb") as fh:
                text = fh.read(1 << 20).decode("utf-8", "surrogateescape")
        except OSError:
            text = None
        if rel == ".git/info/exclude":
            self.rules.set_info_exclude(text or "")
            return
        directory = rel[: -len(".gitignore")].rstrip("/")
        if text is None:
            self.rules.remove_gitignore(directory)
        else:
            self.rules.add_gitignore(directory, text)

    def close(self) -> None:
        self.root.close()

    def read_small(self, rel: str) -> tuple[bytes, m.Entry] | str:
        """Whole content and the entry (with digest) it belongs to, or a reason it cannot
        be read; the same checked read as a streamed file, held in memory."""
        chunks: list[bytes] = []
        for data, entry, error in read_file(self.root, rel):
            if error:
                return error
            if entry is not None:
                return b"".join(chunks), entry
            chunks.append(data)
        return f"{rel}: no data"

    def digest_of(self, rel: str) -> bytes | None:
        try:
            return file_digest(join(self.path, rel))[0]
        except OSError:
            return None
