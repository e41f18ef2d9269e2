"""Control socket wire format: length-prefixed msgpack maps, with an explicit schema.

Request:  {"v": 1, "cmd": NAME, "args": {...}}
Reply:    {"ok": true, "result": ...} or {"ok": false, "code": CODE, "message": TEXT}
Each command's arguments are checked against COMMANDS before anything acts on them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

VERSION = 1
MAX_MESSAGE = 1024 * 1024
HEADER = struct.Struct(">I")

# Error codes; the CLI maps them to exit codes.
E_BAD_REQUEST = "bad-request"
E_UNKNOWN_SESSION = "unknown-session"
E_EXISTS = "exists"
E_INVALID = "invalid"
E_TIMEOUT = "timeout"
E_HALTED = "halted"
E_DENIED = "denied"
E_FAILED = "failed"

_STR, _INT, _BOOL, _FLOAT, _LIST, _MAP = str, int, bool, float, list, dict

# command -> {argument: (type, required)}
COMMANDS: dict[str, dict[str, tuple[type, bool]]] = {
    "ping": {},
    "add": {"name": (_STR, True), "spec": (_MAP, True), "replace": (_BOOL, False), "paused": (_BOOL, False)},
    "rm": {"name": (_STR, True)},
    "list": {},
    "status": {"name": (_STR, False)},
    "flush": {"name": (_STR, True), "timeout": (_FLOAT, False)},
    "pause": {"name": (_STR, True)},
    "resume": {"name": (_STR, True), "force": (_BOOL, False)},
    "conflicts": {"name": (_STR, True), "clear": (_BOOL, False)},
    "resync": {"name": (_STR, True), "direction": (_STR, True), "timeout": (_FLOAT, False),
               "force": (_BOOL, False)},
    "upload": {"name": (_STR, True), "local": (_STR, True), "remote": (_STR, True), "runtime": (_BOOL, False),
               "follow_symlinks": (_BOOL, False), "exclude": (_LIST, False), "timeout": (_FLOAT, False)},
    # Test hook (only with SYNCD_DEBUG_HOOKS=1 in the daemon's environment): block the
    # event loop, to prove the systemd watchdog restarts a hung daemon.
    "debug-hang": {"seconds": (_FLOAT, False)},
}


class WireError(Exception):
    """A malformed control message."""


@dataclass(frozen=True)
class Request:
    cmd: str
    args: dict[str, Any]


def pack(obj: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    if len(body) > MAX_MESSAGE:
        raise WireError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    return HEADER.pack(len(body)) + body


def unpack_body(body: bytes) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise WireError(f"undecodable message: {exc}") from None


def check_length(header: bytes) -> int:
    (length,) = HEADER.unpack(header)
    if length == 0 or length > MAX_MESSAGE:
        raise WireError(f"message length {length} out of bounds (1..{MAX_MESSAGE})")
    return int(length)


def parse_request(obj: Any) -> Request:
    """Validate a decoded request against the schema."""
    if not isinstance(obj, dict):
        raise WireError("a request must be a map")
    if type(obj.get("v")) is not int or obj.get("v") != VERSION:
        raise WireError(f"unsupported control protocol version {obj.get('v')!r} (expected {VERSION})")
    cmd = obj.get("cmd")
    if not isinstance(cmd, str) or cmd not in COMMANDS:
        raise WireError(f"unknown command {cmd!r}")
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise WireError("args must be a map")
    schema = COMMANDS[cmd]
    for key, value in args.items():
        if key not in schema:
            raise WireError(f"{cmd}: unknown argument {key!r}")
        expected = schema[key][0]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            args[key] = value
        if expected is float and isinstance(value, float) and not (0 < value < 1e9):
            raise WireError(f"{cmd}: {key} must be a positive, finite number")
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise WireError(f"{cmd}: {key} must be {expected.__name__}")
    for key, (_, required) in schema.items():
        if required and key not in args:
            raise WireError(f"{cmd}: missing argument {key!r}")
    return Request(cmd, args)


def ok(result: Any = None) -> dict[str, Any]:
    return {"ok": True, "result": result}


def error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "code": code, "message": message}
