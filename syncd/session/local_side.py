"""The local root as the session sees it: scanning with the base as digest cache,
applying operations through the same fsops as the agent, and reading file content."""

from __future__ import annotations

from syncd.engine.index import BaseIndex
from syncd.fsops import Root, read_file
from syncd.protocol import messages as m
from syncd.rules import Rules
from syncd.scan import DigestCache, Scanner, file_digest, join


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
