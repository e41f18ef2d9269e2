"""Entry blocks (protocol.entryblock): what goes in comes out, and bytes that are not a
block are refused with BlockError, never half-read."""

from __future__ import annotations

import struct

import pytest

from syncd.protocol import entryblock
from syncd.protocol import messages as m
from syncd.protocol.entryblock import BlockError

DIGEST = bytes(range(32))
ENTRIES = [
    m.Entry("a.txt", m.FILE, 0o644, 12, 1_700_000_000_123_456_789, 42),
    m.Entry("with digest.bin", m.FILE, 0o755, 1 << 40, 1, (1 << 64) - 1, DIGEST),
    m.Entry("dir", m.DIR, 0o2775, 0, 0, 7),
    m.Entry("dir/link", m.SYMLINK, 0o777, 0, 5, 8, None, "../a.txt"),
    m.Entry("dir/caf\udce9", m.FILE, 0o600, 3, -1_000_000_000, 9),  # a Latin-1 name, not UTF-8
    m.Entry("dir/é/长", m.DIR, 0o700, 0, 2, 10),
    m.Entry("dir/link2", m.SYMLINK, 0o777, 0, 5, 11, None, "target\udcff"),
    m.Entry("empty digest", m.FILE, 0o644, 0, 5, 12, b""),
]


@pytest.mark.parametrize("entries", [[], ENTRIES[:1], ENTRIES, ENTRIES * 1000],
                         ids=["empty", "one", "every-kind", "seven-thousand"])
def test_entries_come_back_as_they_went(entries: list[m.Entry]) -> None:
    assert entryblock.unpack(entryblock.pack(entries)) == tuple(entries)


def _block(count: int, paths: bytes, targets: bytes = b"", fixed: bytes = b"", tail: bytes = b"") -> bytes:
    return struct.pack("<III", count, len(paths), len(targets)) + fixed + paths + targets + tail


GOOD = entryblock.pack(ENTRIES)
ONE_FILE = struct.pack("<BHqqQBB", m.FILE, 0o644, 1, 1, 1, 0, 0)
DIGEST_FLAG = 2

BAD = [
    ("shorter than its header", b"\x01\x00"),
    ("too many entries", _block(entryblock.MAX_ENTRIES + 1, b"")),
    ("cut short", GOOD[:-5]),
    ("trailing bytes", GOOD + b"x"),
    ("fewer paths than entries", _block(2, b"one", fixed=ONE_FILE * 2)),
    ("an unknown kind", _block(1, b"x", fixed=struct.pack("<BHqqQBB", 9, 0o644, 1, 1, 1, 0, 0))),
    ("a mode beyond 0o7777", _block(1, b"x", fixed=struct.pack("<BHqqQBB", m.FILE, 0o10000, 1, 1, 1, 0, 0))),
    ("a negative size", _block(1, b"x", fixed=struct.pack("<BHqqQBB", m.FILE, 0o644, -1, 1, 1, 0, 0))),
    ("an empty path", _block(1, b"", fixed=ONE_FILE)),
    ("a target missing", _block(1, b"x", fixed=struct.pack("<BHqqQBB", m.SYMLINK, 0o777, 0, 1, 1, 0, 1))),
    ("a target too many", _block(1, b"x", b"t", fixed=ONE_FILE)),
    ("a digest past the end", _block(1, b"x", fixed=struct.pack("<BHqqQBB", m.FILE, 0o644, 1, 1, 1, 32,
                                                                 DIGEST_FLAG), tail=b"short")),
    ("a digest length without a digest", _block(1, b"x", fixed=struct.pack("<BHqqQBB", m.FILE, 0o644, 1, 1, 1, 32, 0),
                                                tail=DIGEST)),
    ("unknown flags", _block(1, b"x", fixed=struct.pack("<BHqqQBB", m.FILE, 0o644, 1, 1, 1, 0, 4))),
    ("an empty block with content", _block(0, b"x")),
]


@pytest.mark.parametrize("block", [b for _, b in BAD], ids=[name for name, _ in BAD])
def test_bytes_that_are_not_a_block_are_refused(block: bytes) -> None:
    with pytest.raises(BlockError):
        entryblock.unpack(block)
