"""Sans-IO framing and validation: bytes in, messages out, and the reverse.

A frame is a 4-byte big-endian length followed by one msgpack array ``[tag, field...]``.
Every field is checked against the dataclass annotations, so a peer that sends garbage
gets a ``ProtocolError`` rather than a surprise deeper in. Runs on Python 3.8.
"""

from __future__ import annotations

import dataclasses
import struct
import typing
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import msgpack

from syncd import PROTOCOL_VERSION
from syncd.protocol import entryblock
from syncd.protocol import messages as m

MAX_FRAME = 64 * 1024 * 1024
_HEADER = struct.Struct(">I")
_BIN32 = struct.Struct(">BI")  # msgpack's header of a bin of 65,536 bytes or more
_BULK_TYPES = (m.TarData, m.BlobData)  # [tag, number, data]: data by the mebibyte
_NONE_TYPE = type(None)


class ProtocolError(Exception):
    """The peer violated the protocol; the connection cannot continue."""


Decoder = Callable[[Any], Any]
_TAG_TO_TYPE: Dict[int, type] = {tag: cls for cls, tag in m.TAGS.items()}
_FIELDS: Dict[type, Tuple[str, ...]] = {}
_DECODERS: Dict[type, List[Decoder]] = {}


def _fields(cls: type) -> Tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        named: Optional[Tuple[str, ...]] = getattr(cls, "_fields", None)  # a NamedTuple
        names = named if named is not None else tuple(f.name for f in dataclasses.fields(cls))
        _FIELDS[cls] = names
    return names


_ENTRY_TAG = m.TAGS[m.Entry]


def _to_wire(value: Any) -> Any:
    cls = type(value)
    if cls is m.Entry:
        return [_ENTRY_TAG, *value]
    tag = m.TAGS.get(cls)
    if tag is not None:
        return [tag] + [_to_wire(getattr(value, name)) for name in _fields(cls)]
    if cls is tuple or cls is list:
        if value and type(value[0]) is m.Entry:
            # Entries come by the ten thousand in scans and streams: one packed block
            # (see entryblock), which msgpack's pure-Python fallback handles 10x faster.
            return entryblock.pack(value)
        return [_to_wire(v) for v in value]
    if cls is dict:
        return {k: _to_wire(v) for k, v in value.items()}
    return value


def _scalar(expected: type) -> Decoder:
    def check(value: Any) -> Any:
        # bool is a subclass of int; the wire keeps them apart, and so do we.
        if type(value) is not expected:
            if expected is float and type(value) is int:
                return float(value)
            raise ProtocolError(
                "expected %s, got %s" % (expected.__name__, type(value).__name__)
            )
        return value

    return check


def _decoder_for(hint: Any) -> Decoder:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return lambda v: v
    if hint in (int, str, bytes, bool, float):
        return _scalar(hint)
    if hint is _NONE_TYPE:
        return _scalar(_NONE_TYPE)
    if origin is typing.Union:
        optional = _NONE_TYPE in args
        choices = [a for a in args if a is not _NONE_TYPE]
        if len(choices) == 1:
            inner = _decoder_for(choices[0])
            return lambda v: None if (optional and v is None) else inner(v)
        for choice in choices:
            if choice not in m.TAGS:
                raise TypeError("unions must be of tagged structs: %r" % (hint,))
        allowed = {m.TAGS[c] for c in choices}

        def union(value: Any) -> Any:
            if optional and value is None:
                return None
            return _decode_struct(value, allowed)

        return union
    if origin is tuple and args[0] is m.Entry:
        return _decode_entries
    if origin in (tuple, list):
        inner = _decoder_for(args[0])
        make = tuple if origin is tuple else list

        def sequence(value: Any) -> Any:
            if type(value) is not list:
                raise ProtocolError("expected array, got %s" % type(value).__name__)
            return make(inner(v) for v in value)

        return sequence
    if origin is dict:
        key, val = _decoder_for(args[0]), _decoder_for(args[1])

        def mapping(value: Any) -> Any:
            if type(value) is not dict:
                raise ProtocolError("expected map, got %s" % type(value).__name__)
            return {key(k): val(v) for k, v in value.items()}

        return mapping
    if hint is m.Entry:
        return _decode_entry
    if hint in m.TAGS:
        allowed_one = {m.TAGS[hint]}
        return lambda v: _decode_struct(v, allowed_one)
    raise TypeError("no wire decoder for %r" % (hint,))


def _decode_entries(value: Any) -> Tuple[m.Entry, ...]:
    """A packed block of entries (see _to_wire), or an empty array."""
    if type(value) is bytes:
        try:
            return entryblock.unpack(value)
        except entryblock.BlockError as exc:
            raise ProtocolError(str(exc)) from None
    if type(value) is not list or value:
        raise ProtocolError("expected a block of entries, got %s" % type(value).__name__)
    return ()


def _decode_entry(value: Any) -> m.Entry:
    """Entries come by the ten thousand in a scan: checked inline, not field by field."""
    if type(value) is not list or len(value) != 9 or value[0] != _ENTRY_TAG:
        raise ProtocolError("expected an Entry")
    _, path, kind, mode, size, mtime_ns, ino, digest, target = value
    if (type(path) is not str or type(kind) is not int or type(mode) is not int or type(size) is not int
            or type(mtime_ns) is not int or type(ino) is not int
            or (digest is not None and type(digest) is not bytes)
            or (target is not None and type(target) is not str)):
        raise ProtocolError("Entry: a field has the wrong type")
    return m.Entry(path, kind, mode, size, mtime_ns, ino, digest, target)


def _decoders(cls: type) -> List[Decoder]:
    found = _DECODERS.get(cls)
    if found is None:
        hints = typing.get_type_hints(cls, vars(m))
        found = [_decoder_for(hints[name]) for name in _fields(cls)]
        _DECODERS[cls] = found
    return found


def _decode_struct(value: Any, allowed: Optional[typing.Set[int]]) -> Any:
    if type(value) is not list or not value:
        raise ProtocolError("expected a tagged array")
    tag = value[0]
    cls = _TAG_TO_TYPE.get(tag) if type(tag) is int else None
    if cls is None or (allowed is not None and tag not in allowed):
        raise ProtocolError("unexpected tag %r" % (tag,))
    decoders = _decoders(cls)
    if len(value) - 1 != len(decoders):
        raise ProtocolError(
            "%s: expected %d fields, got %d" % (cls.__name__, len(decoders), len(value) - 1)
        )
    try:
        return cls(*[dec(v) for dec, v in zip(decoders, value[1:])])
    except ProtocolError as exc:
        raise ProtocolError("%s: %s" % (cls.__name__, exc)) from None


_MESSAGE_TAGS = {m.TAGS[c] for c in m.MESSAGE_TYPES}


def encode(message: Any) -> bytes:
    """Return one framed message."""
    if type(message) not in m.MESSAGE_TYPES:
        raise TypeError("not a message: %r" % (message,))
    body: bytes = msgpack.packb(_to_wire(message), use_bin_type=True, unicode_errors="surrogateescape")
    if len(body) > MAX_FRAME:
        raise ValueError("message of %d bytes exceeds the %d-byte limit" % (len(body), MAX_FRAME))
    return _HEADER.pack(len(body)) + body


def encode_parts(message: Any) -> Tuple[bytes, ...]:
    """``encode(message)`` as pieces to write one after the other. The data of a large
    TarData or BlobData is a piece of its own instead of being copied into the frame twice
    (by msgpack, then behind the length): a stream passes every byte through here."""
    cls = type(message)
    if cls not in _BULK_TYPES or len(message.data) < 1 << 16:  # below, msgpack picks a shorter header
        return (encode(message),)
    data = message.data
    head = msgpack.packb(_to_wire(message)[:-1], use_bin_type=True)  # [tag, number]: a fixarray of 2
    # The array holds one more element, the data, with the header msgpack gives it.
    head = bytes((head[0] + 1,)) + head[1:] + _BIN32.pack(0xC6, len(data))
    size = len(head) + len(data)
    if size > MAX_FRAME:
        raise ValueError("message of %d bytes exceeds the %d-byte limit" % (size, MAX_FRAME))
    return (_HEADER.pack(size) + head, data)


def decode_body(body: Union[bytes, memoryview]) -> Any:
    """Decode one frame body into a message, or raise ProtocolError."""
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            strict_map_key=True,
            unicode_errors="surrogateescape",
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError("undecodable frame: %s" % (exc,)) from None
    return _decode_struct(obj, _MESSAGE_TAGS)


def _preview(data: Union[bytes, bytearray]) -> str:
    text = bytes(data[:120]).decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "." for c in text)


class Connection:
    """One side of a syncd connection, without any I/O.

    ``send`` turns messages into bytes to write; ``receive_data`` turns bytes read into
    messages. The first message each way must be ``Hello`` with our protocol version.
    """

    def __init__(self, software: str = "syncd", capabilities: Tuple[str, ...] = ()) -> None:
        self.hello = m.Hello(PROTOCOL_VERSION, software, tuple(capabilities))
        self.peer: Optional[m.Hello] = None
        self.closed = False
        self._buf = b""  # received bytes; frames before _pos are decoded
        self._pos = 0
        self._parts: List[bytes] = []  # received since the last join
        self._pending = 0  # their total size
        self._need = 0  # body size of the frame whose header was read, 0 = none
        self._sent_hello = False

    def initiate(self) -> bytes:
        """Bytes of our Hello; call once before sending anything else."""
        self._sent_hello = True
        return encode(self.hello)

    def send(self, message: Any) -> bytes:
        if not self._sent_hello:
            raise RuntimeError("send Hello (initiate) first")
        return encode(message)

    def send_parts(self, message: Any) -> Tuple[bytes, ...]:
        """Like ``send``, in pieces to write in order (see ``encode_parts``)."""
        if not self._sent_hello:
            raise RuntimeError("send Hello (initiate) first")
        return encode_parts(message)

    def receive_data(self, data: bytes) -> List[Any]:
        """Feed bytes from the peer; return the complete messages they finish.

        Incoming pieces are only listed until a frame is complete, then joined once: a
        large frame arriving in many small reads is not copied again on every read."""
        if self.closed:
            raise ProtocolError("data after the connection was closed")
        if data:
            self._parts.append(data)
            self._pending += len(data)
        out: List[Any] = []
        while True:
            held = len(self._buf) - self._pos
            if not self._need:
                if held + self._pending < _HEADER.size:
                    break
                if held < _HEADER.size:
                    self._merge()
                (length,) = _HEADER.unpack_from(self._buf, self._pos)
                if length > MAX_FRAME or length == 0:
                    self.closed = True
                    raise ProtocolError(
                        "peer sent garbage (frame length %d): %r" % (length, _preview(self._buf[self._pos :]))
                    )
                self._need = length
                held = len(self._buf) - self._pos
            end = self._pos + _HEADER.size + self._need
            if held + self._pending < _HEADER.size + self._need:
                break
            if len(self._buf) < end:
                self._merge()
                end = _HEADER.size + self._need
            try:
                with memoryview(self._buf) as view:
                    message = decode_body(view[end - self._need : end])
                self._check(message)
            except ProtocolError:
                self.closed = True  # the stream cannot be trusted past a bad frame
                raise
            self._pos = end
            self._need = 0
            out.append(message)
        if self._pos and self._pos == len(self._buf):
            self._buf, self._pos = b"", 0
        return out

    @property
    def buffered(self) -> int:
        """Bytes received and not yet part of a decoded message."""
        return len(self._buf) - self._pos + self._pending

    def _merge(self) -> None:
        """Join the unread rest of the buffer with the pieces received since."""
        self._buf = b"".join([self._buf[self._pos :], *self._parts])
        self._pos = 0
        self._parts = []
        self._pending = 0

    def _check(self, message: Any) -> None:
        if self.peer is None:
            if not isinstance(message, m.Hello):
                self.closed = True
                raise ProtocolError("expected Hello first, got %s" % type(message).__name__)
            if message.version != PROTOCOL_VERSION:
                self.closed = True
                raise ProtocolError(
                    "protocol version mismatch: peer %s speaks %d, we speak %d"
                    % (message.software, message.version, PROTOCOL_VERSION)
                )
            self.peer = message
        elif isinstance(message, m.Hello):
            raise ProtocolError("Hello received twice")
