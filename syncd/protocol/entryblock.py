"""A tuple of entries packed as one block of bytes: how the codec sends every sequence of
entries (scans, tar listings, TarDigests), which come by the ten thousand.

An agent on a host without msgpack installed runs msgpack's pure-Python fallback, which
packs 50,000 entries field by field in about 0.5 s and unpacks them in 0.8 s: on a push,
CPU taken from the remote's tar while it unpacked; on a scan, time before the answer. A
block takes about 50 ms to pack and 110 ms to unpack in plain Python: one
``struct.iter_unpack`` over the fixed fields and one ``split`` over the names.

Layout: count, the lengths of the names and targets sections (``<III``); per entry
``<BHqqQBB`` (kind, mode, size, mtime_ns, ino, digest length, flags: 1 has a target, 2 has
a digest, which may be empty); the paths
joined by NUL; the symlink targets joined by NUL; the digests back to back. NUL occurs in
neither a path nor a target. Runs on Python 3.8 (shipped to the agent).
"""

from __future__ import annotations

import struct
from typing import List, Optional, Sequence, Tuple

from syncd.protocol.messages import DIR, FILE, SYMLINK, Entry

_HEAD = struct.Struct("<III")
_FIXED = struct.Struct("<BHqqQBB")
_KINDS = (FILE, DIR, SYMLINK)
_TARGET, _DIGEST = 1, 2
MAX_ENTRIES = 1 << 17  # per block: far above what one message carries


class BlockError(ValueError):
    """The bytes are not a block of entries."""


def _text(items: List[str]) -> bytes:
    return "\0".join(items).encode("utf-8", "surrogateescape")


def pack(entries: Sequence[Entry]) -> bytes:
    """``entries`` as one block."""
    fixed = bytearray()
    add = _FIXED.pack
    paths: List[str] = []
    targets: List[str] = []
    digests: List[bytes] = []
    for e in entries:
        digest, target = e.digest, e.target
        flags = (_TARGET if target is not None else 0) | (_DIGEST if digest is not None else 0)
        fixed += add(e.kind, e.mode, e.size, e.mtime_ns, e.ino, len(digest) if digest else 0, flags)
        paths.append(e.path)
        if digest:
            digests.append(digest)
        if target is not None:
            targets.append(target)
    path_bytes, target_bytes = _text(paths), _text(targets)
    return b"".join((_HEAD.pack(len(entries), len(path_bytes), len(target_bytes)), bytes(fixed), path_bytes,
                     target_bytes, b"".join(digests)))


def unpack(block: bytes) -> Tuple[Entry, ...]:
    """The entries of ``block``. Raises BlockError if it is not one."""
    try:
        count, paths_len, targets_len = _HEAD.unpack_from(block, 0)
    except struct.error:
        raise BlockError("an entry block shorter than its header") from None
    if count > MAX_ENTRIES:
        raise BlockError("an entry block of %d entries" % count)
    fixed_end = _HEAD.size + count * _FIXED.size
    paths_end = fixed_end + paths_len
    targets_end = paths_end + targets_len
    if targets_end > len(block):
        raise BlockError("an entry block shorter than its sections")
    if count == 0:
        if len(block) != targets_end or paths_len or targets_len:
            raise BlockError("an empty entry block with content")
        return ()
    try:
        paths = block[fixed_end:paths_end].decode("utf-8", "surrogateescape").split("\0")
        targets = block[paths_end:targets_end].decode("utf-8", "surrogateescape").split("\0") if targets_len else []
    except UnicodeDecodeError:
        raise BlockError("an entry block's names are not text") from None
    if len(paths) != count:
        raise BlockError("an entry block with %d paths for %d entries" % (len(paths), count))
    out: List[Entry] = []
    pos = targets_end
    next_target = 0
    for path, (kind, mode, size, mtime_ns, ino, digest_len, flags) in zip(
            paths, _FIXED.iter_unpack(block[_HEAD.size:fixed_end])):
        if kind not in _KINDS or mode > 0o7777 or size < 0 or not path or flags > 3 or (
                digest_len and not flags & _DIGEST):
            raise BlockError("an entry block holds an invalid entry")
        digest: Optional[bytes] = None
        if flags & _DIGEST:
            digest = block[pos:pos + digest_len]
            pos += digest_len
        target: Optional[str] = None
        if flags & _TARGET:
            if next_target >= len(targets):
                raise BlockError("an entry block with too few targets")
            target = targets[next_target]
            next_target += 1
        out.append(Entry(path, kind, mode, size, mtime_ns, ino, digest, target))
    if pos != len(block) or next_target != len(targets):
        raise BlockError("an entry block whose sections do not add up")
    return tuple(out)
