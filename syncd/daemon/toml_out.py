"""Write the small TOML documents syncd keeps (tomllib only reads)."""

from __future__ import annotations

import json
from typing import Any


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        value.encode("utf-8")  # lone surrogates cannot be written: refuse them
        out = []
        for ch in value:
            code = ord(ch)
            if ch in ('"', "\\"):
                out.append("\\" + ch)
            elif code < 0x20 or code == 0x7F:
                out.append("\\u%04X" % code)
            elif code > 0xFFFF:
                out.append("\\U%08X" % code)  # TOML has no surrogate pairs
            elif code > 0x7E:
                out.append("\\u%04X" % code)
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else json.dumps(key)


def dumps_tables(tables: dict[str, dict[str, dict[str, Any]]]) -> str:
    """``{"sessions": {"name": {...}}}`` -> ``[sessions.name]`` blocks."""
    lines: list[str] = []
    for top, entries in tables.items():
        for name, body in entries.items():
            lines.append(f"[{_key(top)}.{_key(name)}]")
            lines.extend(f"{_key(k)} = {_value(v)}" for k, v in body.items())
            lines.append("")
    return "\n".join(lines)
