"""The control socket's wire format: schema checks, framing bounds, undecodable bodies."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from syncd.control import wire
from syncd.control.wire import COMMANDS, HEADER, MAX_MESSAGE, VERSION, Request, WireError


def req(cmd: Any, args: Any = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"v": VERSION, "cmd": cmd, **extra}
    if args is not None:
        out["args"] = args
    return out


SPEC = {"local": "/srv/a", "remote": "local:/srv/b"}

ACCEPT: list[tuple[str, dict[str, Any], Request]] = [
    ("ping, args omitted", req("ping"), Request("ping", {})),
    ("ping, empty args", req("ping", {}), Request("ping", {})),
    ("list", req("list", {}), Request("list", {})),
    ("status without name", req("status", {}), Request("status", {})),
    ("status with name", req("status", {"name": "w"}), Request("status", {"name": "w"})),
    ("add minimal", req("add", {"name": "w", "spec": SPEC}), Request("add", {"name": "w", "spec": SPEC})),
    ("add replace", req("add", {"name": "w", "spec": SPEC, "replace": True}),
     Request("add", {"name": "w", "spec": SPEC, "replace": True})),
    ("rm", req("rm", {"name": "w"}), Request("rm", {"name": "w"})),
    ("flush float timeout", req("flush", {"name": "w", "timeout": 2.5}),
     Request("flush", {"name": "w", "timeout": 2.5})),
    ("flush int timeout becomes float", req("flush", {"name": "w", "timeout": 3}),
     Request("flush", {"name": "w", "timeout": 3.0})),
    ("pause", req("pause", {"name": "w"}), Request("pause", {"name": "w"})),
    ("resume force false", req("resume", {"name": "w", "force": False}),
     Request("resume", {"name": "w", "force": False})),
    ("conflicts clear", req("conflicts", {"name": "w", "clear": True}),
     Request("conflicts", {"name": "w", "clear": True})),
    ("debug-hang (schema only; the daemon gates it)", req("debug-hang", {"seconds": 1}),
     Request("debug-hang", {"seconds": 1.0})),
    ("extra top-level keys are ignored", req("ping", {}, id=7), Request("ping", {})),
]


@pytest.mark.parametrize(("label", "obj", "expected"), ACCEPT, ids=[a[0] for a in ACCEPT])
def test_parse_request_accepts(label: str, obj: dict[str, Any], expected: Request) -> None:
    parsed = wire.parse_request(obj)
    assert parsed == expected
    if "timeout" in expected.args or "seconds" in expected.args:
        value = expected.args.get("timeout", expected.args.get("seconds"))
        assert type(parsed.args.get("timeout", parsed.args.get("seconds"))) is float, value


REJECT: list[tuple[str, Any, str]] = [
    # (label, request, words the message must contain)
    ("not a map: list", [1, "ping"], "must be a map"),
    ("not a map: string", "ping", "must be a map"),
    ("not a map: None", None, "must be a map"),
    ("no version", {"cmd": "ping", "args": {}}, "version"),
    ("version 0", {"v": 0, "cmd": "ping"}, "version"),
    ("version 2", {"v": 2, "cmd": "ping"}, "version"),
    ("version as string", {"v": "1", "cmd": "ping"}, "version"),
    ("no command", {"v": VERSION, "args": {}}, "unknown command"),
    ("unknown command", req("explode", {}), "unknown command"),
    ("command of another case", req("PING", {}), "unknown command"),
    ("command not a string", req(1, {}), "unknown command"),
    ("command as bytes", req(b"ping", {}), "unknown command"),
    ("args a list", req("ping", []), "args must be a map"),
    ("args a string", req("ping", "x"), "args must be a map"),
    ("args None", {"v": VERSION, "cmd": "ping", "args": None}, "args must be a map"),
    ("unknown argument", req("ping", {"x": 1}), "unknown argument 'x'"),
    ("unknown argument next to good ones", req("rm", {"name": "w", "force": True}), "unknown argument 'force'"),
    ("missing required name", req("rm", {}), "missing argument 'name'"),
    ("missing spec", req("add", {"name": "w"}), "missing argument 'spec'"),
    ("missing name for add", req("add", {"spec": SPEC}), "missing argument 'name'"),
    ("name an int", req("rm", {"name": 1}), "name must be str"),
    ("name None", req("rm", {"name": None}), "name must be str"),
    ("name bytes", req("rm", {"name": b"w"}), "name must be str"),
    ("name a list", req("status", {"name": ["w"]}), "name must be str"),
    ("spec a list", req("add", {"name": "w", "spec": [1]}), "spec must be dict"),
    ("spec a string", req("add", {"name": "w", "spec": "local:/x"}), "spec must be dict"),
    ("replace an int (bool vs int)", req("add", {"name": "w", "spec": SPEC, "replace": 1}), "replace must be bool"),
    ("replace a string", req("add", {"name": "w", "spec": SPEC, "replace": "yes"}), "replace must be bool"),
    ("force 0 (bool vs int)", req("resume", {"name": "w", "force": 0}), "force must be bool"),
    ("clear None", req("conflicts", {"name": "w", "clear": None}), "clear must be bool"),
    ("timeout a bool (bool vs int)", req("flush", {"name": "w", "timeout": True}), "timeout must be float"),
    ("timeout a string", req("flush", {"name": "w", "timeout": "5"}), "timeout must be float"),
    ("timeout None", req("flush", {"name": "w", "timeout": None}), "timeout must be float"),
    ("seconds a bool", req("debug-hang", {"seconds": False}), "seconds must be float"),
]


@pytest.mark.parametrize(("label", "obj", "words"), REJECT, ids=[r[0] for r in REJECT])
def test_parse_request_rejects(label: str, obj: Any, words: str) -> None:
    with pytest.raises(WireError) as info:
        wire.parse_request(obj)
    assert words in str(info.value)


@pytest.mark.parametrize("version", [True, 1.0], ids=["bool", "float"])
def test_parse_request_version_must_be_an_int(version: Any) -> None:
    with pytest.raises(WireError):
        wire.parse_request({"v": version, "cmd": "ping", "args": {}})


def test_schema_covers_the_cli_commands() -> None:
    for cmd in ("ping", "add", "rm", "list", "status", "flush", "pause", "resume", "conflicts"):
        assert cmd in COMMANDS
    for cmd, schema in COMMANDS.items():
        for arg, (kind, required) in schema.items():
            assert kind in (str, int, bool, float, list, dict), (cmd, arg)
            assert isinstance(required, bool)


# ---------------------------------------------------------------------------------------
# framing
# ---------------------------------------------------------------------------------------


def test_pack_round_trip() -> None:
    message = {"v": VERSION, "cmd": "add", "args": {"name": "w", "spec": {"local": "/é", "ignore": ["a", "b"]}}}
    framed = wire.pack(message)
    length = wire.check_length(framed[: HEADER.size])
    assert length == len(framed) - HEADER.size
    assert wire.unpack_body(framed[HEADER.size:]) == message
    assert wire.parse_request(wire.unpack_body(framed[HEADER.size:])) == Request("add", message["args"])


def test_replies() -> None:
    assert wire.ok({"a": 1}) == {"ok": True, "result": {"a": 1}}
    assert wire.ok() == {"ok": True, "result": None}
    assert wire.error(wire.E_DENIED, "permission denied") == {
        "ok": False, "code": "denied", "message": "permission denied"}
    codes = {wire.E_BAD_REQUEST, wire.E_UNKNOWN_SESSION, wire.E_EXISTS, wire.E_INVALID, wire.E_TIMEOUT,
             wire.E_HALTED, wire.E_DENIED, wire.E_FAILED}
    assert len(codes) == 8


@pytest.mark.parametrize(("length", "ok"), [
    (0, False), (1, True), (MAX_MESSAGE - 1, True), (MAX_MESSAGE, True), (MAX_MESSAGE + 1, False),
    (2**31, False), (2**32 - 1, False),
])
def test_check_length_bounds(length: int, ok: bool) -> None:
    header = HEADER.pack(length)
    if ok:
        assert wire.check_length(header) == length
    else:
        with pytest.raises(WireError, match="out of bounds"):
            wire.check_length(header)


def test_pack_refuses_a_message_over_the_limit() -> None:
    overhead = len(msgpack.packb({"x": b""}, use_bin_type=True))
    at_limit = {"x": b"\0" * (MAX_MESSAGE - overhead - 4)}  # bin32 header is 5 bytes, bin8 is 2
    framed = wire.pack(at_limit)
    assert len(framed) - HEADER.size <= MAX_MESSAGE
    wire.check_length(framed[: HEADER.size])
    with pytest.raises(WireError, match="exceeds"):
        wire.pack({"x": b"\0" * MAX_MESSAGE})


def test_header_is_big_endian_u32() -> None:
    assert HEADER.size == 4
    assert wire.pack({})[:4] == b"\x00\x00\x00\x01"


@pytest.mark.parametrize("body", [
    b"\xc1",  # never used in msgpack
    b"\x80\x01",  # a map, then extra data
    b"\x82\xa1a",  # truncated map
    b"\xa2\xff\xfe",  # a str that is not UTF-8
    b"\x81\x01\x02",  # a map with an int key (strict_map_key)
    b"\x91" * 100_000 + b"\xc0",  # nesting deeper than the unpacker allows
], ids=["reserved-byte", "extra-data", "truncated", "bad-utf8", "int-key", "deep"])
def test_unpack_body_undecodable(body: bytes) -> None:
    with pytest.raises(WireError, match="undecodable"):
        wire.unpack_body(body)


def test_unpack_body_plain_values() -> None:
    assert wire.unpack_body(msgpack.packb([1, "a", b"b"], use_bin_type=True)) == [1, "a", b"b"]
    # A decodable non-map body is parse_request's business.
    with pytest.raises(WireError, match="must be a map"):
        wire.parse_request(wire.unpack_body(msgpack.packb([1])))


def test_ext_types_decode_but_fail_the_schema() -> None:
    body = msgpack.packb({"v": 1, "cmd": "rm", "args": {"name": msgpack.ExtType(1, b"x")}}, use_bin_type=True)
    with pytest.raises(WireError, match="name must be str"):
        wire.parse_request(wire.unpack_body(body))
