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

from typing import Callable, Dict, Optional

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


class TarFormatError(Exception):
    """Not a tar stream, or a damaged one."""


def padding(size: int) -> int:
    return -size % BLOCK


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    size = len(body) + 1
    while len(str(size)) + len(body) != size:  # the length counts its own digits
        size = len(str(size)) + len(body)
    return str(size).encode() + body


def pax_mtime(mtime_ns: int) -> str:
    if mtime_ns < 0:
        return str(mtime_ns // 10**9)
    return "%d.%09d" % divmod(mtime_ns, 10**9)


def parse_mtime(text: str) -> int:
    """A pax mtime ("1700000000.123456789", "-5") in nanoseconds."""
    sec, _, frac = text.partition(".")
    whole = int(sec)
    part = int((frac + "000000000")[:9]) if frac else 0
    return whole * 10**9 + (-part if sec.startswith("-") else part)


def _ustar(name: bytes, mode: int, size: int, mtime: int, kind: bytes, link: bytes) -> bytes:
    header = bytearray(BLOCK)
    header[0 : len(name)] = name
    header[100:108] = b"%07o\0" % (mode & 0o7777)
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"%011o\0" % mtime
    header[148:156] = b"        "
    header[156:157] = kind
    header[157 : 157 + len(link)] = link
    header[257:265] = b"ustar\x0000"
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


def header(path: str, kind: bytes, mode: int, mtime_ns: int, size: int = 0, linkname: str = "") -> bytes:
    """Pax extended header + ustar header for one member (data and padding follow)."""
    name = _encode(path) + (b"/" if kind == DIRECTORY else b"")
    link = _encode(linkname)
    records = [_pax_record(b"mtime", pax_mtime(mtime_ns).encode())]
    binary = False
    if len(name) > 100 or len(link) > 100:
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
    body = b"".join(records)
    seconds = mtime_ns // 10**9
    return (_ustar(b"PaxHeader/" + name[:90], 0o644, len(body), max(seconds, 0), _PAX, b"")
            + body + bytes(padding(len(body)))
            + _ustar(name, mode, size if size <= _MAX_OCTAL_SIZE else 0, max(min(seconds, 8**11 - 1), 0),
                     kind, link))


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
        return self.kind not in (HARDLINK, SYMLINK, DIRECTORY)


def _number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError("bad number field %r" % field) from None


def _string(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def _parse_pax(data: bytes) -> Dict[bytes, bytes]:
    out: Dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError("bad pax record") from None
        if length <= 0 or pos + length > len(data):
            raise TarFormatError("bad pax record length")
        record = data[space + 1 : pos + length - 1]
        key, sep, value = record.partition(b"=")
        if not sep:
            raise TarFormatError("bad pax record")
        out[key] = value
        pos += length
    return out


class TarReader:
    """Members of a tar stream, read through ``read(n)`` (which may return fewer bytes)."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self._left = 0  # data bytes of the current member not yet read
        self._pad = 0

    def _exact(self, size: int) -> bytes:
        data = self._read(size)
        if len(data) == size:
            return data
        parts = [data]
        got = len(data)
        while got < size:
            more = self._read(size - got)
            if not more:
                raise TarFormatError("the tar stream ends in the middle of a member")
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def read_data(self, size: int) -> bytes:
        """Up to ``size`` bytes of the current member's data; b"" at its end."""
        if self._left <= 0:
            return b""
        data = self._read(min(size, self._left))
        if not data:
            raise TarFormatError("the tar stream ends in the middle of a member")
        self._left -= len(data)
        return data

    def _skip_rest(self) -> None:
        while self._left > 0:
            self.read_data(1 << 20)
        if self._pad:
            self._exact(self._pad)
            self._pad = 0

    def next(self) -> Optional[Member]:
        """The next member, or None at the end of the archive."""
        self._skip_rest()
        pax: Dict[bytes, bytes] = {}
        long_name: Optional[bytes] = None
        long_link: Optional[bytes] = None
        while True:
            block = self._read(BLOCK)
            if not block:
                return None  # end of stream without the end marker: tolerated, like tar
            if len(block) < BLOCK:
                block += self._exact(BLOCK - len(block))
            if block.count(0) == BLOCK:
                return None
            stored = _number(block[148:156])
            computed = sum(block[:148]) + 256 + sum(block[156:])
            if stored != computed:
                raise TarFormatError("bad header checksum: not a tar stream, or a damaged one")
            kind = block[156:157]
            size = _number(block[124:136])
            if kind in (_PAX, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK):
                if not 0 <= size <= _MAX_META:
                    raise TarFormatError("extended header of %d bytes" % size)
                data = self._exact(size)
                self._exact(padding(size))
                if kind == _PAX:
                    pax.update(_parse_pax(data))
                elif kind == _GNU_LONGNAME:
                    long_name = _string(data)
                elif kind == _GNU_LONGLINK:
                    long_link = _string(data)
                continue  # global pax headers carry nothing we use
            name = _string(block[0:100])
            if block[257:262] == b"ustar":
                prefix = _string(block[345:500])
                if prefix:
                    name = prefix + b"/" + name
            if long_name is not None:
                name = long_name
            if b"path" in pax:
                name = pax[b"path"]
            link = long_link if long_link is not None else _string(block[157:257])
            if b"linkpath" in pax:
                link = pax[b"linkpath"]
            if b"size" in pax:
                size = int(pax[b"size"])
            if size < 0:
                raise TarFormatError("negative size")
            mtime_ns = _number(block[136:148]) * 10**9
            if b"mtime" in pax:
                try:
                    mtime_ns = parse_mtime(pax[b"mtime"].decode("ascii"))
                except (ValueError, UnicodeDecodeError):
                    pass
            member = Member(_decode(name), kind, _number(block[100:108]) & 0o7777, size, mtime_ns, _decode(link))
            self._left = size if member.has_data() else 0
            self._pad = padding(size) if member.has_data() else 0
            return member
