"""The tar format, reduced to what a sync carries, both ways.

Writing: a POSIX ustar header per member, preceded by a pax extended header holding the
mtime at nanosecond precision and, where ustar cannot hold them, the path, the link
target (long, or not UTF-8: ``hdrcharset=BINARY``) and the size. Reading: ustar, pax
(per-member and global) and GNU long names and base-256 numbers, so that archives made by
GNU tar, bsdtar or Python's tarfile extract too. Headers are checksummed.

Kept small and allocation-light on purpose: the stdlib ``tarfile`` spends more time
parsing a member than the kernel spends creating its file. Runs on Python 3.8.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Union

try:
    import zlib
except ImportError:  # a Python built without zlib: the plain sum below
    zlib = None  # type: ignore[assignment]

BLOCK = 512
END = bytes(2 * BLOCK)

REGULAR = b"0"
HARDLINK = b"1"
SYMLINK = b"2"
DIRECTORY = b"5"
_REGULAR_TYPES = (b"0", b"\0", b"7")
_PAX = b"x"
_PAX_GLOBAL = b"g"
_GNU_LONGNAME = b"L"
_GNU_LONGLINK = b"K"

_MAX_OCTAL_SIZE = 8**11 - 1  # 12-byte octal field
_MAX_META = 16 << 20  # a pax or GNU long-name block larger than this is not a real one
_NO_DATA = (b"1", b"2", b"5")  # hard links, symlinks and directories carry no data
_META_KINDS = (_PAX, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK)  # headers about the member that follows
_ZERO_BLOCK = bytes(BLOCK)
_READ_SIZE = 1 << 20


class TarFormatError(Exception):
    """Not a tar stream, or a damaged one."""


def padding(size: int) -> int:
    return -size % BLOCK


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    size = len(body) + 1
    while len(str(size)) + len(body) != size:  # the length counts its own digits
        size = len(str(size)) + len(body)
    return str(size).encode() + body


def _stamp(mtime_ns: int) -> bytes:
    seconds, frac = divmod(mtime_ns, 10**9)
    return b"%d.%09d" % (seconds, frac) if seconds >= 0 else b"%d" % seconds


def pax_mtime(mtime_ns: int) -> str:
    """A pax mtime: nanoseconds kept, or whole seconds before 1970."""
    return _stamp(mtime_ns).decode("ascii")


def parse_mtime(text: Union[str, bytes]) -> int:
    """A pax mtime ("1700000000.123456789", "-5") in nanoseconds; ValueError if it is not one."""
    raw = text.encode("ascii") if isinstance(text, str) else text
    sec, _, frac = raw.partition(b".")
    whole = int(sec)
    if not frac:
        return whole * 10**9
    part = int(frac[:9].ljust(9, b"0"))
    return whole * 10**9 + (-part if sec.startswith(b"-") else part)


_IDS = b"0000000\0" b"0000000\0"  # uid and gid: ownership is not carried
_MAGIC = b"ustar\x0000"
_TAIL = bytes(BLOCK - 265)
_FIXED_SUM = sum(_IDS) + sum(_MAGIC) + 8 * 32  # the checksum field counts as spaces
_PAX_NAME = b"././@PaxHeader"  # the name readers ignore, as GNU tar and tarfile write it
_pax_blocks: Dict[int, bytes] = {}


def _ustar(name: bytes, mode: int, size: int, mtime: int, kind: bytes, link: bytes) -> bytes:
    """One ustar header block. Built by concatenation, with the checksum summed over the
    variable fields only: this runs once or twice per member of a multi-GB stream."""
    perm = b"%07o\0" % (mode & 0o7777)
    numbers = b"%011o\0%011o\0" % (size, mtime)
    check = _FIXED_SUM + sum(name) + sum(perm) + sum(numbers) + kind[0] + sum(link)
    return b"".join((name, bytes(100 - len(name)), perm, _IDS, numbers, b"%06o\0 " % check, kind, link,
                     bytes(100 - len(link)), _MAGIC, _TAIL))


def _pax_block(length: int) -> bytes:
    """The ustar block announcing a pax body of ``length`` bytes (the same for every member
    whose records have that length, so kept)."""
    block = _pax_blocks.get(length)
    if block is None:
        block = _pax_blocks[length] = _ustar(_PAX_NAME, 0o644, length, 0, _PAX, b"")
    return block


def header(path: str, kind: bytes, mode: int, mtime_ns: int, size: int = 0, linkname: str = "") -> bytes:
    """Pax extended header + ustar header for one member (data and padding follow)."""
    name = _encode(path) + (b"/" if kind == DIRECTORY else b"")
    link = _encode(linkname) if linkname else b""
    stamp = _stamp(mtime_ns)
    seconds = mtime_ns // 10**9
    if len(name) <= 100 and len(link) <= 100 and size <= _MAX_OCTAL_SIZE:
        body = _pax_record(b"mtime", stamp)  # the common case: nothing else is needed
    else:
        records = [_pax_record(b"mtime", stamp)]
        binary = False
        try:
            name.decode("utf-8")
            link.decode("utf-8")
        except UnicodeDecodeError:
            binary = True
        if len(name) > 100:
            records.append(_pax_record(b"path", name))
            name = name[:100]
        if len(link) > 100:
            records.append(_pax_record(b"linkpath", link))
            link = link[:100]
        if binary:
            records.insert(0, _pax_record(b"hdrcharset", b"BINARY"))
        if size > _MAX_OCTAL_SIZE:
            records.append(_pax_record(b"size", str(size).encode()))
            size = 0
        body = b"".join(records)
    return b"".join((_pax_block(len(body)), body, bytes(padding(len(body))),
                     _ustar(name, mode, size, max(min(seconds, 8**11 - 1), 0), kind, link)))


# ---- reading ------------------------------------------------------------------------------


class Member:
    """One archive member; its data (``size`` bytes) follows in the stream."""

    __slots__ = ("name", "kind", "mode", "size", "mtime_ns", "linkname")

    def __init__(self, name: str, kind: bytes, mode: int, size: int, mtime_ns: int, linkname: str) -> None:
        self.name = name
        self.kind = kind
        self.mode = mode
        self.size = size
        self.mtime_ns = mtime_ns
        self.linkname = linkname

    def is_file(self) -> bool:
        return self.kind in _REGULAR_TYPES

    def is_dir(self) -> bool:
        return self.kind == DIRECTORY

    def has_data(self) -> bool:
        """Whether ``size`` bytes of content follow (links and directories carry none)."""
        return self.kind not in _NO_DATA


def _number(field: bytes) -> int:
    try:  # what ustar writers put there: octal digits ended by a NUL or a space
        return int(field.rstrip(b"\0 "), 8)
    except ValueError:
        pass
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError("bad number field %r" % field) from None


def _byte_sum(block: bytes) -> int:
    """The sum of a header block's bytes, as its checksum counts them. Adler-32 started
    at 0 keeps the sum of the bytes modulo 65521 in its low half, and a 256-byte half sums
    to at most 65,280, so two C calls give it exactly; ``sum`` over 512 bytes took four
    times as long, twice per member (the pax header and the member's own)."""
    if zlib is None:
        return sum(block)
    return (zlib.adler32(block[:256], 0) & 0xFFFF) + (zlib.adler32(block[256:], 0) & 0xFFFF)


def _string(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def _parse_pax(data: bytes, size: int, out: Optional[Dict[bytes, bytes]] = None) -> Dict[bytes, bytes]:
    """The records in the first ``size`` bytes of a pax header's data, added to ``out``."""
    if out is None:
        out = {}
    pos = 0
    while pos < size:
        space = data.find(b" ", pos, size)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError("bad pax record") from None
        if length <= 0 or pos + length > size:
            raise TarFormatError("bad pax record length")
        key, sep, value = data[space + 1 : pos + length - 1].partition(b"=")
        if not sep:
            raise TarFormatError("bad pax record")
        out[key] = value
        pos += length
    return out


class TarReader:
    """Members of a tar stream, read through ``read(n)`` (which may return fewer bytes).

    The reader keeps the piece it last read and slices headers and small members out of
    it, so that a stream of many small files costs few calls to ``read``.
    """

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self._buf = b""
        self._pos = 0
        self._left = 0  # data bytes of the current member not yet read
        self._pad = 0

    def _more(self) -> bool:
        data = self._read(_READ_SIZE)
        if not data:
            return False
        self._buf, self._pos = data, 0
        return True

    def _exact(self, size: int) -> bytes:
        """``size`` bytes, or fewer only at the end of the stream."""
        pos, end = self._pos, self._pos + size
        if end <= len(self._buf):
            self._pos = end
            return self._buf[pos:end]
        parts = [self._buf[pos:]]
        got = len(parts[0])
        self._buf, self._pos = b"", 0
        while got < size and self._more():
            piece = self._buf[: size - got]
            self._pos = len(piece)
            parts.append(piece)
            got += len(piece)
        return b"".join(parts)

    def _need(self, size: int) -> bytes:
        data = self._exact(size)
        if len(data) < size:
            raise TarFormatError("the tar stream ends in the middle of a member")
        return data

    def read_data(self, size: int) -> bytes:
        """Up to ``size`` bytes of the current member's data; b"" at its end."""
        if self._left <= 0:
            return b""
        if self._pos >= len(self._buf) and not self._more():
            raise TarFormatError("the tar stream ends in the middle of a member")
        pos = self._pos
        end = min(pos + min(size, self._left), len(self._buf))
        self._pos = end
        self._left -= end - pos
        return self._buf[pos:end]

    def _skip_rest(self) -> None:
        while self._left > 0:
            self.read_data(1 << 20)
        if self._pad:
            self._need(self._pad)
            self._pad = 0

    def next(self) -> Optional[Member]:
        """The next member, or None at the end of the archive."""
        if self._left > 0 or self._pad:
            self._skip_rest()
        pax: Optional[Dict[bytes, bytes]] = None
        long_name: Optional[bytes] = None
        long_link: Optional[bytes] = None
        while True:
            # A member costs two headers or three (pax): they nearly always lie whole in
            # the piece last read, and are sliced here without a call.
            pos = self._pos
            if pos + BLOCK <= len(self._buf):
                block = self._buf[pos : pos + BLOCK]
                self._pos = pos + BLOCK
            else:
                block = self._exact(BLOCK)
                if not block:
                    return None  # end of stream without the end marker: tolerated, like tar
                if len(block) < BLOCK:
                    raise TarFormatError("the tar stream ends in the middle of a member")
            if block == _ZERO_BLOCK:
                return None
            if _number(block[148:156]) != _byte_sum(block) - sum(block[148:156]) + 256:
                raise TarFormatError("bad header checksum: not a tar stream, or a damaged one")
            kind = block[156:157]
            size = _number(block[124:136])
            if kind in _META_KINDS:
                if not 0 <= size <= _MAX_META:
                    raise TarFormatError("extended header of %d bytes" % size)
                data = self._need(size + padding(size))
                if kind == _PAX:
                    pax = _parse_pax(data, size, pax)
                elif kind == _GNU_LONGNAME:
                    long_name = _string(data[:size])
                elif kind == _GNU_LONGLINK:
                    long_link = _string(data[:size])
                continue  # global pax headers carry nothing we use
            if long_name is not None:
                name = long_name
            else:
                name = _string(block[0:100])
                if block[345] and block[257:262] == b"ustar":  # a ustar prefix
                    name = _string(block[345:500]) + b"/" + name
            link = long_link if long_link is not None else _string(block[157:257])
            mtime_ns: Optional[int] = None
            if pax is not None:
                name = pax.get(b"path", name)
                link = pax.get(b"linkpath", link)
                if b"size" in pax:
                    size = int(pax[b"size"])
                if b"mtime" in pax:
                    try:
                        mtime_ns = parse_mtime(pax[b"mtime"])
                    except ValueError:
                        pass
            if size < 0:
                raise TarFormatError("negative size")
            if mtime_ns is None:
                mtime_ns = _number(block[136:148]) * 10**9
            member = Member(name.decode("utf-8", "surrogateescape"), kind, _number(block[100:108]) & 0o7777, size,
                            mtime_ns, link.decode("utf-8", "surrogateescape"))
            if kind in _NO_DATA:
                self._left = self._pad = 0
            else:
                self._left = size
                self._pad = padding(size)
            return member
