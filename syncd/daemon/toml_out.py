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
        # A JSON string is a valid TOML basic string for everything json.dumps emits
        # with ensure_ascii (escapes \uXXXX; lone surrogates are refused below).
        value.encode("utf-8")
        return json.dumps(value, ensure_ascii=True)
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
