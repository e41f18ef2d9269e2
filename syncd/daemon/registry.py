"""The sessions a daemon hosts, persisted as TOML in its state directory."""

from __future__ import annotations

import os
import tomllib
from typing import Any

from syncd.daemon.toml_out import dumps_tables
from syncd.session.spec import SessionSpec, SpecError


class ConfigError(Exception):
    """A configuration file cannot be used; the message names the file and the problem."""


def read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None


def parse_sessions(path: str, data: dict[str, Any]) -> dict[str, tuple[SessionSpec, bool]]:
    """``[sessions.NAME]`` tables -> {name: (spec, paused)}."""
    tables = data.get("sessions", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{path}: [sessions] must be a table of tables")
    out: dict[str, tuple[SessionSpec, bool]] = {}
    for name, body in tables.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: sessions.{name} must be a table")
        body = dict(body)
        paused = body.pop("paused", False)
        if not isinstance(paused, bool):
            raise ConfigError(f"{path}: sessions.{name}.paused must be true or false")
        try:
            out[name] = (SessionSpec.from_dict(name, body), paused)
        except SpecError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return out


class Registry:
    """sessions.toml under the state directory: written atomically on every change."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, "sessions.toml")

    def load(self) -> dict[str, tuple[SessionSpec, bool]]:
        return parse_sessions(self.path, read_toml(self.path))

    def save(self, sessions: dict[str, tuple[SessionSpec, bool]]) -> None:
        tables = {name: {**spec.to_dict(), "paused": paused} for name, (spec, paused) in sorted(sessions.items())}
        text = "# Managed by syncd (syncd add / rm / pause / resume).\n\n" + dumps_tables({"sessions": tables})
        temp = f"{self.path}.{os.getpid()}.tmp"
        with open(temp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, self.path)
