"""Plain data the engine works on: agreed base entries, sides, policies, plans."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, NamedTuple

from syncd.protocol.messages import DIR, FILE, SYMLINK, Entry

Side = Literal["local", "remote"]
SIDES: tuple[Side, Side] = ("local", "remote")
PERM_MASK = 0o7777


def other(side: Side) -> Side:
    return "remote" if side == "local" else "local"


class Agreed(NamedTuple):
    """One row of the base index: the state both sides held when they last agreed.

    A named tuple rather than a frozen dataclass: a restart builds one per tracked path
    (tens of thousands) before anything else can start, and a tuple is made in less than
    half the time.

    ``local_ino``/``remote_ino`` let a rescan recognise an untouched file without reading
    it; the digest then carries over.

    ``local_only`` marks a preserve-absent path the remote deleted while the local side
    kept its copy: the row is what the local side holds, the remote agreed to hold
    nothing. Without it a later full scan would see a local creation and send the file
    back; with it only a local change made after the deletion travels again.
    """

    path: str
    kind: int
    mode: int
    size: int
    mtime_ns: int
    digest: bytes | None
    target: str | None
    local_ino: int
    remote_ino: int
    local_only: bool = False

    def ino(self, side: Side) -> int:
        return self.local_ino if side == "local" else self.remote_ino

    def as_entry(self, side: Side) -> Entry:
        """The entry this side is assumed to hold when it was not observed."""
        return Entry(self.path, self.kind, self.mode, self.size, self.mtime_ns, self.ino(side),
                     self.digest, self.target)


def agreed_from(source: Entry, local_ino: int, remote_ino: int) -> Agreed:
    return Agreed(source.path, source.kind, source.mode & PERM_MASK, source.size, source.mtime_ns,
                  source.digest, source.target, local_ino, remote_ino)


def kept_local(local: Entry) -> Agreed:
    """The marker of a local entry kept when the remote deleted it (preserve-absent)."""
    return Agreed(local.path, local.kind, local.mode & PERM_MASK, local.size, local.mtime_ns,
                  local.digest, local.target, local.ino, 0, local_only=True)


@dataclass(frozen=True)
class Intent:
    """An operation on ``side`` awaiting confirmation: ``after`` is the base row it leads to
    (None = the path is deleted); ``dest`` is set for a rename of ``path``."""

    side: str
    path: str
    after: Agreed | None
    dest: str | None = None


# How a side's entry compares with the base.
UNCHANGED = "unchanged"
META = "meta"  # same content, other mode or mtime
CONTENT = "content"  # created, or other kind, content or target
DELETED = "deleted"


def content_equal(a: Entry, b: Entry) -> bool:
    """Same kind and content (digest for files, target for links); modes not compared."""
    if a.kind != b.kind:
        return False
    if a.kind == FILE:
        return a.digest is not None and a.digest == b.digest and a.size == b.size
    if a.kind == SYMLINK:
        return a.target == b.target
    return True


def meta_equal(a: Entry, b: Entry) -> bool:
    if a.kind == SYMLINK:
        return True
    if (a.mode & PERM_MASK) != (b.mode & PERM_MASK):
        return False
    return a.kind != FILE or a.mtime_ns == b.mtime_ns


def stat_matches(entry: Entry, base: Agreed, side: Side) -> bool:
    """True when the entry's stat says the file is the one recorded in the base."""
    return (entry.kind == base.kind and entry.size == base.size
            and entry.mtime_ns == base.mtime_ns and entry.ino == base.ino(side))


def classify(entry: Entry | None, base: Agreed | None, side: Side) -> str:
    """Compare one side's entry with the base. Files must carry a digest unless their
    stat matches the base (see ``needs_digest``)."""
    if entry is None:
        return UNCHANGED if base is None else DELETED
    if base is None or entry.kind != base.kind:
        return CONTENT
    if entry.kind == FILE:
        if entry.digest is None:
            if not stat_matches(entry, base, side):
                raise ValueError("no digest for changed file %r" % entry.path)
        elif entry.digest != base.digest or entry.size != base.size:
            return CONTENT
    elif entry.kind == SYMLINK:
        return UNCHANGED if entry.target == base.target else CONTENT
    if (entry.mode & PERM_MASK) != base.mode:
        return META
    if entry.kind == FILE and entry.mtime_ns != base.mtime_ns:
        return META
    return UNCHANGED


def with_base_digest(entry: Entry, base: Agreed | None, side: Side) -> Entry:
    """Fill in a missing file digest from the base when the stat proves it unchanged."""
    if entry.kind == FILE and entry.digest is None and base is not None and stat_matches(entry, base, side):
        return Entry(entry.path, entry.kind, entry.mode, entry.size, entry.mtime_ns, entry.ino,
                     base.digest, entry.target)
    return entry


@dataclass(frozen=True)
class Policy:
    """How to settle what both sides changed."""

    mode: str = "two-way"  # "two-way" | "push" | "pull"
    winner: str = "remote"  # "remote" | "local" | "newer"
    # Local paths never deleted because they are absent on the remote.
    is_preserved: Callable[[str, bool], bool] = field(default=lambda path, is_dir: False)
    stamp: str = "19700101T000000Z"  # UTC time for conflict-copy names


# ---- plans ------------------------------------------------------------------------------

# Action kinds.
COPY = "copy"  # make `side` hold `source` (file content, directory, symlink)
META_ONLY = "meta"  # set mode / mtime on `side` from `source`
DELETE = "delete"  # remove the path on `side`
ASIDE = "aside"  # keep the losing version: copy (file, link) or move (dir) it to `dest`
MOVE = "move"  # rename `path` to `dest` on `side` (detected renames)


@dataclass(frozen=True)
class Action:
    side: Side  # where the action runs
    kind: str
    path: str
    source: Entry | None = None  # what to write (COPY, META_ONLY), from the other side
    current: Entry | None = None  # what `side` holds now (becomes the operation's Expect)
    dest: str = ""  # ASIDE, MOVE


@dataclass(frozen=True)
class Conflict:
    path: str
    winner: Side
    loser_copy: str  # path of the conflict copy on the losing side ("" if none was kept)
    local: Entry | None
    remote: Entry | None
    stamp: str


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    # Base updates that need no transfer: both sides already agree (None = forget path).
    records: dict[str, Agreed | None] = field(default_factory=dict)
    conflicts: list[Conflict] = field(default_factory=list)
    # Paths left undecided until a side confirms an absence (see reconcile's unconfirmed).
    deferred: list[str] = field(default_factory=list)

    def deletions(self, side: Side) -> int:
        return sum(1 for a in self.actions if a.side == side and a.kind == DELETE)

    def is_empty(self) -> bool:
        return not self.actions and not self.records and not self.conflicts


__all__ = ["DIR", "FILE", "SYMLINK", "Entry"]
