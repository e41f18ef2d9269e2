"""What one session is: two roots, the rules between them, and how to reach the remote."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

from syncd.endpoint import Endpoint
from syncd.transport.options import AgentOptions

MODES = ("two-way", "push", "pull")
WINNERS = ("remote", "local", "newer")


def default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "syncd")


@dataclass(frozen=True)
class SessionConfig:
    name: str
    local: str
    remote: Endpoint
    ignore: tuple[str, ...] = ()
    preserve_absent: tuple[str, ...] = ()
    mode: str = "two-way"
    winner: str = "remote"
    agent: AgentOptions = field(default_factory=AgentOptions)
    state_dir: str = field(default_factory=default_state_dir)
    rescan_interval: float = 300.0
    # Safety halt: a cycle deleting more than this share of tracked entries on one side,
    # and more than max_delete_min of them, stops the session.
    max_delete_ratio: float = 0.5
    max_delete_min: int = 100

    def index_path(self) -> str:
        # Keyed by the endpoints too: the same name pointed elsewhere starts a fresh base.
        key = hashlib.sha256(f"{self.local}\0{self.remote.describe()}".encode()).hexdigest()[:12]
        return os.path.join(self.state_dir, "sessions", f"{self.name}-{key}.sqlite")
