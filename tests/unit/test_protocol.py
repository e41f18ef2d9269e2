"""Sans-IO tests of syncd.protocol: pipe one Connection's bytes into another (h11 style)."""

from __future__ import annotations

import os
import struct
from typing import Any

import msgpack
import pytest

from syncd import PROTOCOL_VERSION
from syncd.protocol import codec
from syncd.protocol import messages as m
from syncd.protocol.codec import MAX_FRAME, Connection, ProtocolError, decode_body, encode

CAFE = os.fsdecode(b"caf\xe9.txt")  # not UTF-8: travels surrogate-escaped
DIGEST = bytes(range(20))
EXPECT = m.Expect(m.FILE, 12, 1_700_000_000_123_456_789, 424242)

FILE_ENTRY = m.Entry("src/" + CAFE, m.FILE, 0o755, 12, 1_700_000_000_123_456_789, 2**40 + 7, DIGEST, None)
DIR_ENTRY = m.Entry("src", m.DIR, 0o700, 0, 1_600_000_000_000_000_000, 99, None, None)
LINK_ENTRY = m.Entry("link", m.SYMLINK, 0o777, 0, -1, 2**64 - 1, None, "../" + CAFE)

ALL_OPS: tuple[Any, ...] = (
    m.PutFile(CAFE, b"\x00\xffbinary", 0o644, 1_700_000_000_000_000_001, m.Expect(m.ABSENT)),
    m.PutBlob("big/" + CAFE, 7, 0o600, 5, EXPECT),
    m.MakeDir("a/b", 0o755, None),
    m.MakeLink("a/link", "../" + CAFE, m.Expect(m.SYMLINK)),
    m.Remove("old.txt", EXPECT),
    m.Rename(CAFE, "moved/" + CAFE, m.Expect(m.FILE, 1, 2, 0)),
    m.SetMeta("run.sh", 0o755, 1_700_000_000_000_000_000, None),
    m.CopyAside("a/b.txt", "a/b.syncd-conflict-local-20240101T000000Z.txt", EXPECT),
    m.DropBlob("big/" + CAFE, 7),
)

SAMPLES: dict[type, Any] = {
    m.Hello: m.Hello(PROTOCOL_VERSION, "syncd 0.1.0", ("watch", "blob")),
    m.Open: m.Open(1, "/home/agent/work/" + CAFE, {"ignore": ["*.o", "node_modules/"], "preserve": []},
                   True, False),
    m.Opened: m.Opened(1, "/home/agent/work/" + CAFE, "3.8.10", "inotify"),
    m.Scan: m.Scan(2, ("a", CAFE), True),
    m.ScanChunk: m.ScanChunk(2, (FILE_ENTRY, DIR_ENTRY, LINK_ENTRY), ("gone", CAFE), True, ("locked/" + CAFE,)),
    m.Hash: m.Hash(3, (CAFE, "b")),
    m.BlobStart: m.BlobStart(7, "big/" + CAFE, 2**33),
    m.BlobData: m.BlobData(7, os.urandom(1000)),
    m.Apply: m.Apply(4, ALL_OPS),
    m.Applied: m.Applied(4, (
        m.OpResult(m.OK, "", FILE_ENTRY),
        m.OpResult(m.CHANGED, "file changed since it was scanned"),
        m.OpResult(m.UNSAFE, "path %r escapes" % CAFE, None),
        m.OpResult(m.FAILED, "No space left on device", LINK_ENTRY),
    )),
    m.Changes: m.Changes((CAFE, "x/y"), False),
    m.Failure: m.Failure(5, "ENOENT", "no such root " + CAFE),
    m.Fatal: m.Fatal("shutting down: " + CAFE),
    m.Bye: m.Bye(),
    m.Fetch: m.Fetch(6, CAFE),
    m.FileData: m.FileData(6, b"", FILE_ENTRY, ""),
    m.TarReceive: m.TarReceive(7, "skills/" + CAFE, True, False, True),
    m.TarReady: m.TarReady(7, "/work/.syncd-tmp-tar-7-" + CAFE, "/usr/bin/tar"),
    m.TarSend: m.TarSend(8, 16 << 20, True),
    m.TarAck: m.TarAck(8, 4 << 20),
    m.TarDigests: m.TarDigests(7, (FILE_ENTRY, DIR_ENTRY)),
    m.TarStart: m.TarStart(8, 50000, 1 << 30),
    m.TarData: m.TarData(8, b"\0" * 1024),
    m.TarEnd: m.TarEnd(7, (m.Skip("src/" + CAFE, "changed", "changed while it was archived"),), True),
    m.TarResult: m.TarResult(8, (FILE_ENTRY,), (m.Skip("fifo", "special", "not synced"),), 3, "/work", True),
    m.TarPlaced: m.TarPlaced(8, (m.Skip("fifo", "special", "not synced"),), 3, (DIR_ENTRY,)),
    m.ScanTree: m.ScanTree(7, ("", "src/" + CAFE), bytes(range(32))),
    m.TreeMatched: m.TreeMatched(7, b"\x02"),
}


def test_samples_cover_every_message_type_and_op() -> None:
    assert set(SAMPLES) == set(m.MESSAGE_TYPES)
    op_types = set(m.Op.__args__)  # type: ignore[attr-defined]
    assert {type(op) for op in ALL_OPS} == op_types


class Pair:
    """Two connections after the handshake, like h11's ConnectionPair."""

    def __init__(self) -> None:
        self.a = Connection("syncd-a")
        self.b = Connection("syncd-b")
        got_b = self.b.receive_data(self.a.initiate())
        got_a = self.a.receive_data(self.b.initiate())
        assert got_b == [self.a.hello] and got_a == [self.b.hello]
        assert self.a.peer == self.b.hello and self.b.peer == self.a.hello

    def a_to_b(self, *messages: Any) -> list[Any]:
        return self.b.receive_data(b"".join(self.a.send(msg) for msg in messages))


@pytest.mark.parametrize("message", list(SAMPLES.values()), ids=lambda msg: type(msg).__name__)
def test_round_trip_every_message(message: Any) -> None:
    assert decode_body(encode(message)[4:]) == message
    if isinstance(message, m.Hello):
        a, b = Connection(message.software, message.capabilities), Connection()
        assert b.receive_data(a.initiate()) == [message]
        return
    a, b = Connection(), Connection()
    got = b.receive_data(a.initiate() + a.send(message))
    assert got == [a.hello, message]
    assert type(got[1]) is type(message)
    # And in the other direction, after the handshake.
    assert a.receive_data(b.initiate() + b.send(message)) == [b.hello, message]


def test_non_utf8_path_keeps_its_bytes() -> None:
    pair = Pair()
    (got,) = pair.a_to_b(m.Fetch(1, CAFE))
    assert os.fsencode(got.path) == b"caf\xe9.txt"
    (chunk,) = pair.a_to_b(SAMPLES[m.ScanChunk])
    assert os.fsencode(chunk.entries[0].path) == b"src/caf\xe9.txt"
    assert os.fsencode(chunk.entries[2].target) == b"../caf\xe9.txt"


@pytest.mark.parametrize("entry", [
    m.Entry("a.txt", m.FILE, 0o644, 5, 1_700_000_000_123_456_789, 12, b"\x00" * 32),
    m.Entry("d", m.DIR, 0o755, 0, 0, 2**64 - 1),
    m.Entry("l", m.SYMLINK, 0o777, 0, 1, 3, None, os.fsdecode(b"../\xff")),
    m.Entry(os.fsdecode(b"caf\xe9"), m.FILE, 0o600, 0, -1, 0, b""),
])
def test_entries_go_on_the_wire_field_by_field_in_order(entry: m.Entry) -> None:
    """Entries are laid out without reflection (they are many); the layout is still the
    tag and then every field in declaration order, and comes back equal."""
    wire = codec._to_wire(entry)
    assert wire == [m.TAGS[m.Entry]] + [getattr(entry, name) for name in m.Entry._fields]
    chunk = m.ScanChunk(1, (entry,), (), True, ())
    assert decode_body(encode(chunk)[4:]) == chunk


@pytest.mark.parametrize("size", [0, 1, 255, 256, 65_535, 65_536, 1 << 20])
@pytest.mark.parametrize("make", [lambda data: m.TarData(7, data), lambda data: m.BlobData(2**40, data)])
def test_bulk_data_in_pieces_is_the_same_frame(make: Any, size: int) -> None:
    """A large TarData or BlobData goes out as a header and its data, uncopied; joined,
    the pieces are exactly the frame ``encode`` makes, and read back the same."""
    message = make(os.urandom(size))
    parts = codec.encode_parts(message)
    assert b"".join(parts) == encode(message)
    assert len(parts) == (2 if size >= 65_536 else 1)
    if len(parts) == 2:
        assert parts[1] is message.data
    a = Connection()
    a.initiate()
    b = Connection()
    b.receive_data(a.initiate())
    got = [msg for part in a.send_parts(message) for msg in b.receive_data(part)]
    assert got == [message]


def test_bulk_data_over_the_frame_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "MAX_FRAME", 100_000)
    with pytest.raises(ValueError, match="exceeds"):
        codec.encode_parts(m.TarData(1, bytes(100_000)))


def test_nested_ops_and_results_keep_their_types() -> None:
    pair = Pair()
    (apply,) = pair.a_to_b(SAMPLES[m.Apply])
    assert [type(op) for op in apply.ops] == [type(op) for op in ALL_OPS]
    assert isinstance(apply.ops, tuple)
    assert apply.ops[0].expect == m.Expect(m.ABSENT)
    assert apply.ops[2].expect is None
    (applied,) = pair.a_to_b(SAMPLES[m.Applied])
    assert all(isinstance(r, m.OpResult) for r in applied.results)
    assert applied.results[0].entry == FILE_ENTRY
    assert applied.results[1].entry is None


def test_byte_at_a_time() -> None:
    a, b = Connection(), Connection()
    messages = list(SAMPLES.values())[1:]  # Hello is sent by initiate
    data = a.initiate() + b"".join(a.send(msg) for msg in messages)
    got: list[Any] = []
    for i in range(len(data)):
        got += b.receive_data(data[i : i + 1])
    assert got == [a.hello, *messages]
    assert b.buffered == 0


def test_many_messages_in_one_chunk() -> None:
    pair = Pair()
    messages = [m.Changes(("f%d" % i,), i % 2 == 0) for i in range(500)] + list(SAMPLES.values())[1:]
    assert pair.a_to_b(*messages) == messages


def test_split_chunks_at_every_boundary() -> None:
    a, b = Connection(), Connection()
    data = a.initiate() + a.send(SAMPLES[m.Apply]) + a.send(m.Bye())
    for cut in range(len(data) + 1):
        b = Connection()
        got = b.receive_data(data[:cut]) + b.receive_data(data[cut:])
        assert got == [a.hello, SAMPLES[m.Apply], m.Bye()]


def test_send_before_initiate_is_refused() -> None:
    with pytest.raises(RuntimeError):
        Connection().send(m.Bye())


@pytest.mark.parametrize("value", [m.Expect(m.FILE), FILE_ENTRY, ALL_OPS[0], "text", b"raw", None, {"a": 1}])
def test_encode_refuses_a_non_message(value: Any) -> None:
    with pytest.raises(TypeError):
        encode(value)


# ---- malformed input ------------------------------------------------------------------------


def _frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def _after_hello(payload: bytes) -> None:
    """Feed a valid Hello then ``payload`` to a fresh connection; must raise ProtocolError."""
    a, b = Connection(), Connection()
    b.receive_data(a.initiate())
    with pytest.raises(ProtocolError):
        b.receive_data(payload)
    assert b.closed
    with pytest.raises(ProtocolError):  # nothing more is accepted once the stream is bad
        b.receive_data(a.send(m.Bye()))


def test_garbage_from_a_shell_is_reported_as_garbage() -> None:
    conn = Connection()
    with pytest.raises(ProtocolError, match="garbage") as info:
        conn.receive_data(b"bash: python3: command not found\n")
    assert "python3: command not found" in str(info.value)
    assert conn.closed
    with pytest.raises(ProtocolError):
        conn.receive_data(b"more")


def test_short_garbage_waits_then_fails() -> None:
    conn = Connection()
    assert conn.receive_data(b"ba") == []  # not yet a whole header
    with pytest.raises(ProtocolError, match="garbage"):
        conn.receive_data(b"sh: not found\n")


def test_frame_over_max_is_refused_without_waiting_for_the_body() -> None:
    conn = Connection()
    with pytest.raises(ProtocolError):
        conn.receive_data(struct.pack(">I", MAX_FRAME + 1))


def test_frame_of_max_size_is_accepted_as_a_length() -> None:
    conn = Connection()
    assert conn.receive_data(struct.pack(">I", MAX_FRAME) + b"\x00" * 10) == []


def test_zero_length_frame() -> None:
    conn = Connection()
    with pytest.raises(ProtocolError):
        conn.receive_data(b"\x00\x00\x00\x00")


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # a byte msgpack never uses
        b"\x92\x01",  # array of 2 with one element missing (truncated)
        b"\x91\x0e\x0e",  # trailing bytes after a complete object
        b"\xd9\x05ab",  # truncated str
    ],
    ids=["reserved-byte", "truncated-array", "extra-data", "truncated-str"],
)
def test_undecodable_body(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_body(body)
    _after_hello(struct.pack(">I", len(body)) + body)


HELLO_WIRE = [1, PROTOCOL_VERSION, "peer", []]


@pytest.mark.parametrize(
    "obj",
    [
        [999],  # unknown tag
        ["hello"],  # tag of the wrong type
        [],  # no tag at all
        14,  # not an array
        {"tag": 14},  # a map
        [32, "p", 0, 0, 0, 0, 0, None, None],  # a struct tag (Entry) where a message is expected
        [14, "extra"],  # Bye takes no fields
        [15, 1],  # Fetch: too few fields
        [15, 1, "p", "extra"],  # Fetch: too many fields
        [15, "1", "p"],  # str where int expected
        [15, True, "p"],  # bool where int expected
        [15, 1.0, "p"],  # float where int expected
        [15, 1, b"p"],  # bytes where str expected
        [15, None, "p"],  # nil where int expected
        [8, 1, "text"],  # BlobData: str where bytes expected
        [2, 1, "/r", {"ignore": "*.o"}, True, False],  # Open: list expected in the map
        [2, 1, "/r", {"ignore": []}, 1, False],  # Open: int where bool expected
        [4, 1, "a", True],  # Scan: paths must be an array or nil
        [11, ["a", 1], False],  # Changes: int inside an array of str
        [9, 1, [[14]]],  # Apply: a message tag inside the ops
        [9, 1, [[34, "ok", "", None]]],  # Apply: an OpResult inside the ops
        [9, 1, [[44, "p"]]],  # Remove with a missing field
        [9, 1, [[44, "p", [33, "file", 0, 0, 0]]]],  # Expect with a str kind
        [9, 1, [[44, "p", [32, "p", 0, 0, 0, 0, 0, None, None]]]],  # Entry where an Expect belongs
        [10, 1, [[40, "p", b"", 0, 0, None]]],  # Applied: an op where an OpResult belongs
        [10, 1, [[34, "ok", "", [32, "p", "0", 0, 0, 0, 0, None, None]]]],  # bad nested Entry
        [5, 1, [[32, "p", 0, 0, 0, 0, 0, "digest", None]], [], True],  # str digest
        [5, 1, b"\x01\x00", [], True, []],  # ScanChunk: an entry block cut short
        [5, 1, b"\x01\x00\x00\x00" + bytes(8), [], True, []],  # ScanChunk: a block missing its entry
        [5, 1, [[32, "p", 0, 0, 0, 0, 0, None, None]], [], True, []],  # entries as an array, not a block
        [5, 1, 7, [], True, []],  # ScanChunk: an int for the entries
    ],
)
def test_malformed_message_after_hello(obj: Any) -> None:
    _after_hello(_frame(obj))


def test_error_names_the_message_and_the_problem() -> None:
    a, b = Connection(), Connection()
    b.receive_data(a.initiate())
    with pytest.raises(ProtocolError, match=r"Fetch: expected int, got bool"):
        b.receive_data(_frame([15, True, "p"]))


def test_wrong_field_count_message() -> None:
    with pytest.raises(ProtocolError, match="expected 2 fields, got 1"):
        decode_body(msgpack.packb([15, 1]))


def test_first_message_must_be_hello() -> None:
    a, b = Connection(), Connection()
    a.initiate()
    with pytest.raises(ProtocolError, match="Hello"):
        b.receive_data(a.send(m.Bye()))
    assert b.closed


def test_protocol_version_mismatch() -> None:
    b = Connection()
    with pytest.raises(ProtocolError, match="version"):
        b.receive_data(_frame([1, PROTOCOL_VERSION + 1, "syncd 9", []]))
    assert b.closed and b.peer is None


def test_second_hello_is_refused() -> None:
    pair = Pair()
    with pytest.raises(ProtocolError, match="twice"):
        pair.b.receive_data(encode(pair.a.hello))
    assert pair.b.closed


def test_connection_is_closed_after_a_bad_frame() -> None:
    a, b = Connection(), Connection()
    b.receive_data(a.initiate())
    with pytest.raises(ProtocolError):
        b.receive_data(_frame([999]) + a.send(m.Bye()))
    assert b.closed
    with pytest.raises(ProtocolError, match="closed"):
        b.receive_data(a.send(m.Bye()))


def test_messages_before_a_bad_frame_in_the_same_chunk_do_not_hang() -> None:
    a, b = Connection(), Connection()
    data = a.initiate() + a.send(m.Bye()) + b"garbage!"
    with pytest.raises(ProtocolError):
        b.receive_data(data)


def test_encode_refuses_oversized_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "MAX_FRAME", 100)
    with pytest.raises(ValueError):
        encode(m.BlobData(1, b"x" * 200))
