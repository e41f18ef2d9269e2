"""A session as the user declared it: the form stored in TOML and sent over the socket."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from syncd.endpoint import EndpointError, parse_remote
from syncd.session.config import MODES, WINNERS, SessionConfig
from syncd.transport.options import AgentOptions, SshOptions

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SpecError(ValueError):
    """A session declaration is invalid; the message says which field and why."""


@dataclass(frozen=True)
class SessionSpec:
    name: str
    local: str
    remote: str  # as written: [user@]host:/path, ssh://..., local:/path, exec:"..."::/path
    ignore: tuple[str, ...] = ()
    preserve_absent: tuple[str, ...] = ()
    mode: str = "two-way"
    conflict_winner: str = "remote"
    port: int | None = None
    identity: str | None = None
    known_hosts: str | None = None
    ssh_config: str | None = None
    remote_python: str = "python3"

    def validate(self) -> None:
        if not isinstance(self.name, str) or not NAME_RE.fullmatch(self.name):
            raise SpecError(f"session name {self.name!r}: use letters, digits, '.', '_' or '-' (max 64)")
        try:
            self.local.encode("utf-8")
        except UnicodeEncodeError:
            raise SpecError(f"{self.name}: local path {self.local!r} is not valid UTF-8") from None
        if not os.path.isabs(self.local):
            raise SpecError(f"{self.name}: local path {self.local!r} must be absolute")
        try:
            parse_remote(self.remote)
        except EndpointError as exc:
            raise SpecError(f"{self.name}: {exc}") from None
        if self.mode not in MODES:
            raise SpecError(f"{self.name}: mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.conflict_winner not in WINNERS:
            raise SpecError(f"{self.name}: conflict_winner {self.conflict_winner!r} is not one of {', '.join(WINNERS)}")
        if not isinstance(self.remote_python, str) or not self.remote_python.strip():
            raise SpecError(f"{self.name}: remote_python must name a python interpreter")
        if self.port is not None and not 0 < self.port < 65536:
            raise SpecError(f"{self.name}: port {self.port} is out of range")

    def to_config(self, state_dir: str) -> SessionConfig:
        endpoint = parse_remote(self.remote)
        ssh = SshOptions(port=self.port or endpoint.port, identity=self.identity,
                         known_hosts=self.known_hosts, ssh_config=self.ssh_config)
        return SessionConfig(
            name=self.name,
            local=self.local,
            remote=endpoint,
            ignore=self.ignore,
            preserve_absent=self.preserve_absent,
            mode=self.mode,
            winner=self.conflict_winner,
            agent=AgentOptions(python=self.remote_python, ssh=ssh),
            state_dir=state_dir,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data without the name and without unset options (TOML and the socket)."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if key == "name" or value is None:
                continue
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, name: str, data: Any) -> SessionSpec:
        """Build and validate a spec from untrusted plain data."""
        if not isinstance(data, dict):
            raise SpecError(f"session {name!r}: expected a table")
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {"name": name}
        for key, value in data.items():
            if key not in known or key == "name":
                raise SpecError(f"session {name!r}: unknown setting {key!r}")
            if key in ("ignore", "preserve_absent"):
                if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                    raise SpecError(f"session {name!r}: {key} must be a list of strings")
                kwargs[key] = tuple(value)
            elif key == "port":
                if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                    raise SpecError(f"session {name!r}: port must be an integer")
                kwargs[key] = value
            else:
                if value is not None and not isinstance(value, str):
                    raise SpecError(f"session {name!r}: {key} must be a string")
                kwargs[key] = value
        for required in ("local", "remote"):
            if not kwargs.get(required):
                raise SpecError(f"session {name!r}: {required} is required")
        spec = cls(**kwargs)
        spec.validate()
        return spec
