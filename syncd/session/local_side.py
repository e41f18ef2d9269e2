"""The local root as the session sees it: scanning with the base as digest cache,
applying operations through the same fsops as the agent, and reading file content."""

from __future__ import annotations

import os
import stat

from syncd.engine.index import BaseIndex
from syncd.fsops import Root, UnsafePath
from syncd.protocol import messages as m
from syncd.rules import Rules
from syncd.scan import DigestCache, Scanner, digest_bytes, file_digest, join


class BaseDigests(DigestCache):
    """Digest cache that also trusts the base index for files it recorded."""

    def __init__(self, base: BaseIndex) -> None:
        super().__init__()
        self.base = base

    def get(self, rel: str, size: int, mtime_ns: int, ino: int) -> bytes | None:
        agreed = self.base.get(rel)
        if (agreed is not None and agreed.kind == m.FILE and agreed.size == size
                and agreed.mtime_ns == mtime_ns and agreed.local_ino == ino):
            return agreed.digest
        return super().get(rel, size, mtime_ns, ino)


class LocalSide:
    def __init__(self, path: str, rules: Rules, base: BaseIndex) -> None:
        self.path = path
        self.rules = rules
        self.scanner = Scanner(path, rules.is_ignored, BaseDigests(base), self._ignore_file)
        self.root = Root(path)

    def _ignore_file(self, rel_dir: str, name: str, text: str) -> None:
        if name == ".gitignore":
            self.rules.add_gitignore(rel_dir, text)
        else:
            self.rules.set_info_exclude(text)

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
        """Whole content and the entry it belongs to, or a reason it cannot be read."""
        try:
            dir_fd, name = self.root.parent(rel)
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except (OSError, UnsafePath) as exc:
            return f"cannot read {rel}: {getattr(exc, 'strerror', None) or exc}"
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                return f"{rel} is no longer a regular file"
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            after = os.fstat(fd)
        except OSError as exc:
            return f"reading {rel}: {exc.strerror}"
        finally:
            os.close(fd)
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            return f"{rel} changed while it was read"
        data = b"".join(chunks)
        entry = m.Entry(rel, m.FILE, stat.S_IMODE(after.st_mode), after.st_size, after.st_mtime_ns,
                        after.st_ino, digest_bytes(data))
        return data, entry

    def digest_of(self, rel: str) -> bytes | None:
        try:
            return file_digest(join(self.path, rel))[0]
        except OSError:
            return None
