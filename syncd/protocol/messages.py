"""Wire messages: one frozen dataclass per message, plus the structs they carry (Entry,
the one made by the ten thousand, is a named tuple: made in about a quarter of the time).

Shipped to the remote agent, so this module runs on Python 3.8 with the standard library
only. Annotations use ``typing`` generics because the codec evaluates them at run time.
Paths are ``str`` relative to the session root, '/'-separated; names that are not UTF-8
travel as surrogate-escaped strings (the codec packs them back to the original bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

# Entry kinds.
FILE = 0
DIR = 1
SYMLINK = 2
# An Expect with this kind means "the path must not exist".
ABSENT = -1


class Entry(NamedTuple):
    """One filesystem entry as seen on one side."""

    path: str
    kind: int
    mode: int  # permission bits only (0o7777 mask)
    size: int
    mtime_ns: int
    ino: int
    digest: Optional[bytes] = None  # content digest, files only; None = not computed
    target: Optional[str] = None  # symlink target


@dataclass(frozen=True)
class Expect:
    """What an operation assumes is on disk at its path right before it acts.

    The agent re-checks it immediately before the final rename or removal; when the disk
    disagrees, the operation is dropped with status ``changed`` and nothing is touched.
    """

    kind: int  # ABSENT, FILE, DIR or SYMLINK
    size: int = 0
    mtime_ns: int = 0
    ino: int = 0  # 0 = do not check


# ---- operations carried by Apply -------------------------------------------------------


@dataclass(frozen=True)
class PutFile:
    """Write a whole file whose content travels inline."""

    path: str
    data: bytes
    mode: int
    mtime_ns: int
    expect: Optional[Expect]


@dataclass(frozen=True)
class PutBlob:
    """Commit a file whose content was streamed earlier by BlobStart/BlobData."""

    path: str
    blob: int
    mode: int
    mtime_ns: int
    expect: Optional[Expect]


@dataclass(frozen=True)
class MakeDir:
    path: str
    mode: int
    expect: Optional[Expect]


@dataclass(frozen=True)
class MakeLink:
    path: str
    target: str
    expect: Optional[Expect]


@dataclass(frozen=True)
class Remove:
    """Remove a file, a symlink or an empty directory (never recursive)."""

    path: str
    expect: Optional[Expect]


@dataclass(frozen=True)
class Rename:
    """Move ``path`` to ``dest``; ``dest`` must be absent."""

    path: str
    dest: str
    expect: Optional[Expect]


@dataclass(frozen=True)
class SetMeta:
    """Change the permission bits and, for files, the mtime."""

    path: str
    mode: int
    mtime_ns: int
    expect: Optional[Expect]


@dataclass(frozen=True)
class CopyAside:
    """Copy ``path`` to ``dest`` (a conflict copy); ``dest`` must be absent."""

    path: str
    dest: str
    expect: Optional[Expect]


@dataclass(frozen=True)
class DropBlob:
    """Discard a streamed file (its source changed while it was read)."""

    path: str
    blob: int


Op = Union[PutFile, PutBlob, MakeDir, MakeLink, Remove, Rename, SetMeta, CopyAside, DropBlob]

# OpResult statuses.
OK = "ok"
CHANGED = "changed"  # the disk no longer matches the operation's Expect: nothing done
UNSAFE = "unsafe"  # the path escapes the root or crosses a symlink: nothing done
FAILED = "failed"  # an OS error (permission, disk full...): nothing done


@dataclass(frozen=True)
class OpResult:
    status: str
    message: str = ""
    entry: Optional[Entry] = None  # the entry as written, for the base index


# ---- messages ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """First message in each direction."""

    version: int
    software: str
    capabilities: Tuple[str, ...]


@dataclass(frozen=True)
class Open:
    """Bind the agent to a root; answered by Opened or Failure."""

    req: int
    root: str
    rules: Dict[str, List[str]]
    create: bool
    watch: bool


@dataclass(frozen=True)
class Opened:
    req: int
    root: str  # resolved absolute path
    python: str
    watcher: str  # watcher backend in use, "" when not watching
    empty: bool = False  # the root holds nothing synced (only ignored entries, if any)
    executable: str = ""  # the interpreter running the agent (sys.executable), "" if unknown


@dataclass(frozen=True)
class Scan:
    """Stat ``paths`` (all of the root when None); directories are walked if ``recursive``."""

    req: int
    paths: Optional[Tuple[str, ...]]
    recursive: bool


@dataclass(frozen=True)
class ScanChunk:
    """Part of a scan answer; the last chunk has ``done`` set. ``unlisted`` (last chunk):
    directories met on a walk that could not be listed, whose contents are unknown."""

    req: int
    entries: Tuple[Entry, ...]
    absent: Tuple[str, ...]
    done: bool
    unlisted: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Hash:
    """Compute content digests of the given files; answered by ScanChunk."""

    req: int
    paths: Tuple[str, ...]


@dataclass(frozen=True)
class BlobStart:
    """Begin streaming the content of a large file, to be committed by PutBlob."""

    blob: int
    path: str  # where it will land, so the temp file is made in the same directory
    size: int


@dataclass(frozen=True)
class BlobData:
    blob: int
    data: bytes


@dataclass(frozen=True)
class Apply:
    """A batch of operations; answered by one Applied with a result per operation."""

    req: int
    ops: Tuple[Op, ...]


@dataclass(frozen=True)
class Applied:
    req: int
    results: Tuple[OpResult, ...]


@dataclass(frozen=True)
class Fetch:
    """Read one file; answered by FileData chunks, the last with ``entry`` set."""

    req: int
    path: str


@dataclass(frozen=True)
class FileData:
    req: int
    data: bytes
    entry: Optional[Entry]  # on the last chunk: the file as read, with its digest
    error: str  # non-empty: the read failed (the file vanished or changed while read)


@dataclass(frozen=True)
class Changes:
    """Agent to daemon: these paths may have changed (hints; ``overflow`` = rescan all)."""

    paths: Tuple[str, ...]
    overflow: bool


@dataclass(frozen=True)
class Failure:
    """A request failed as a whole."""

    req: int
    code: str
    message: str


@dataclass(frozen=True)
class Fatal:
    """The sender is giving up on the connection; ``message`` says why."""

    message: str


@dataclass(frozen=True)
class Bye:
    """Orderly shutdown."""


@dataclass(frozen=True)
class Skip:
    """An entry a tar stream does not carry, or carries but must not be trusted."""

    path: str
    reason: str  # see syncd.tarstream: changed, vanished, unreadable, special, unsafe, kept
    detail: str


@dataclass(frozen=True)
class TarReceive:
    """Daemon to agent: a tar stream follows (TarData..., then TarEnd). With ``path`` ''
    it is mirrored into the root, ignored entries kept, or with ``merge`` only added where
    the root has nothing (see tarstream.merge_in); otherwise directory ``path`` is replaced
    whole. ``runtime``: ``path`` is under the agent's runtime directory. ``direct``: the
    agent answers TarReady, and the stream may come by another way than TarData."""

    req: int
    path: str
    runtime: bool
    merge: bool = False
    direct: bool = False


@dataclass(frozen=True)
class TarReady:
    """Agent to daemon, for a ``direct`` TarReceive: the staging directory made for the
    stream and the host's GNU tar, which the daemon may run there itself (through its own
    process on the same host) instead of sending TarData; ``tar`` '' = send TarData. For a
    ``direct`` TarSend: ``staging`` is '' and the entries to archive follow (see TarSend)."""

    req: int
    staging: str
    tar: str


@dataclass(frozen=True)
class TarSend:
    """Daemon to agent: stream the root as tar: TarStart, TarData..., TarResult. At most
    ``window`` bytes of TarData may be unacknowledged (TarAck); 0 = no limit. With
    ``direct``, where the host has GNU tar, the agent sends no TarData: TarReady naming
    that tar, for the daemon to archive the root with it through a process of its own;
    the entries to archive (TarResult..., no digests) as the root is walked, so that the
    daemon's tar archives them meanwhile; TarStart with the totals once the walk is done;
    a last TarResult with the walk's skips."""

    req: int
    window: int = 0
    direct: bool = False


@dataclass(frozen=True)
class TarAck:
    """Daemon to agent: ``consumed`` bytes of a TarSend's data taken in so far (credit)."""

    req: int
    consumed: int


@dataclass(frozen=True)
class TarStart:
    """What a stream will carry, for progress and ETA."""

    req: int
    files: int
    size: int


@dataclass(frozen=True)
class TarData:
    req: int
    data: bytes


@dataclass(frozen=True)
class TarEnd:
    """End of a stream the daemon sent; ``skipped``: what it lacks or must not be trusted.
    With ``cancel`` the stream failed: the agent discards it and answers nothing.
    ``shared``: how many entries the TarDigests named (-1: not counted); those are every
    member of the archive (see DirectStaging.end)."""

    req: int
    skipped: Tuple[Skip, ...]
    cancel: bool = False
    shared: int = -1


@dataclass(frozen=True)
class TarDigests:
    """Entries of a stream the daemon sent (their digests None: the daemon records them
    once the tree is in place): the agent places a direct stream's staging area from them
    (see gnu_tar.DirectStaging). Sent in chunks, before TarEnd."""

    req: int
    entries: Tuple[Entry, ...]


@dataclass(frozen=True)
class TarResult:
    """Outcome of a tar stream, in chunks (the last has ``done``): the entries archived
    (TarSend, files with digests) or placed (TarReceive), what was skipped, how many
    entries were deleted, and where it landed."""

    req: int
    entries: Tuple[Entry, ...]
    skipped: Tuple[Skip, ...]
    deleted: int
    where: str
    done: bool


@dataclass(frozen=True)
class TarPlaced:
    """A received stream is in place (TarEnd): what was skipped, how many entries were
    deleted, and the directories kept although the stream lacks them (they hold ignored
    or preserved entries). The TarResult chunks listing the entries placed follow; whoever
    waits for the stream need not wait for them."""

    req: int
    skipped: Tuple[Skip, ...]
    deleted: int
    kept: Tuple[Entry, ...]


@dataclass(frozen=True)
class ScanTree:
    """Scan the whole root like Scan(None), but leave out the children of each directory
    of ``dirs`` whose listing still has the fingerprint given (``syncd.scan.dir_print``):
    the daemon knows them. Answered by one TreeMatched, then ScanChunks."""

    req: int
    dirs: Tuple[str, ...]
    prints: bytes  # syncd.scan.PRINT_SIZE bytes per directory, in the order of ``dirs``


@dataclass(frozen=True)
class TreeMatched:
    """The directories of a ScanTree found unchanged: bit i (of byte i // 8, lowest bit
    first) stands for ``dirs[i]``."""

    req: int
    matched: bytes


Message = Union[
    Hello, Open, Opened, Scan, ScanChunk, Hash, BlobStart, BlobData, Apply, Applied,
    Changes, Failure, Fatal, Bye, Fetch, FileData, TarReceive, TarSend, TarStart, TarData, TarEnd,
    TarResult, ScanTree, TreeMatched, TarAck, TarDigests, TarReady, TarPlaced,
]

# Wire tags. Append only: changing a tag is an incompatible protocol change.
TAGS: Dict[type, int] = {
    Hello: 1,
    Open: 2,
    Opened: 3,
    Scan: 4,
    ScanChunk: 5,
    Hash: 6,
    BlobStart: 7,
    BlobData: 8,
    Apply: 9,
    Applied: 10,
    Changes: 11,
    Failure: 12,
    Fatal: 13,
    Bye: 14,
    Fetch: 15,
    FileData: 16,
    Skip: 17,
    TarReceive: 18,
    TarSend: 19,
    TarStart: 20,
    TarData: 21,
    TarEnd: 22,
    TarResult: 23,
    TarAck: 24,
    TarDigests: 25,
    TarReady: 26,
    TarPlaced: 27,
    # structs
    Entry: 32,
    Expect: 33,
    OpResult: 34,
    PutFile: 40,
    PutBlob: 41,
    MakeDir: 42,
    MakeLink: 43,
    Remove: 44,
    Rename: 45,
    SetMeta: 46,
    CopyAside: 47,
    DropBlob: 48,
    ScanTree: 60,
    TreeMatched: 61,
}
MESSAGE_TYPES = (
    Hello, Open, Opened, Scan, ScanChunk, Hash, BlobStart, BlobData, Apply, Applied,
    Changes, Failure, Fatal, Bye, Fetch, FileData, TarReceive, TarSend, TarStart, TarData, TarEnd,
    TarResult, ScanTree, TreeMatched, TarAck, TarDigests, TarReady, TarPlaced,
)
