"""Connection options, kept free of heavy imports (the CLI loads them for every command)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SshOptions:
    port: int | None = None
    identity: str | None = None
    known_hosts: str | None = None
    ssh_config: str | None = None
    keepalive_interval: float = 10.0
    keepalive_count_max: int = 3

DEFAULT_CACHE_DIR = "~/.cache/syncd"  # on the remote: the agent's zipapp, outside any workspace


@dataclass(frozen=True)
class AgentOptions:
    python: str = "python3"  # interpreter on the remote
    cache_dir: str = DEFAULT_CACHE_DIR
    ssh: SshOptions = SshOptions()
