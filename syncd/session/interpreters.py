"""The interpreter each remote's ``python3`` led to last time, kept in the state directory
for every session to the same host: the agent then starts with it directly (see
transport.connect.start_agent). A cache only: a lost or stale entry costs one start
through the configured name."""

from __future__ import annotations

import json
import logging
import os
import shlex

from syncd.endpoint import Endpoint
from syncd.transport.options import AgentOptions

log = logging.getLogger("syncd.session")

FILE_NAME = "interpreters.json"
MAX_HOSTS = 256  # the oldest are forgotten beyond this


def host_key(remote: Endpoint, agent: AgentOptions) -> str:
    """Whose interpreter: the host as reached (user, host, port; for ``exec:`` the command)
    and the interpreter named; "" for a ``local:`` endpoint, which runs the daemon's own."""
    if remote.kind == "ssh":
        who = f"{remote.user}@" if remote.user else ""
        port = remote.port or agent.ssh.port or 22
        return f"ssh://{who}{remote.host}:{port} {agent.python}"
    if remote.kind == "exec":
        return f"exec:{shlex.join(remote.command)} {agent.python}"
    return ""


def _load(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def recall(state_dir: str, key: str) -> str | None:
    """The interpreter recorded for ``key``, if any."""
    if not key:
        return None
    return _load(os.path.join(state_dir, FILE_NAME)).get(key)


def remember(state_dir: str, key: str, executable: str) -> None:
    """Record ``executable`` (an absolute path) for ``key``; failures are only logged."""
    if not key or not os.path.isabs(executable):
        return
    path = os.path.join(state_dir, FILE_NAME)
    known = _load(path)
    known.pop(key, None)
    known[key] = executable  # last: the most recently used are kept
    kept = dict(list(known.items())[-MAX_HOSTS:])
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(kept, fh, indent=1)  # in order of use: see MAX_HOSTS
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot record the remote interpreter in %s: %s", path, exc)
        try:
            os.unlink(tmp)
        except OSError:
            pass


class Recorded:
    """The interpreter recorded for ``remote`` (``path``, None if none), and ``found`` to
    record the one the agent then ran on."""

    def __init__(self, state_dir: str, remote: Endpoint, agent: AgentOptions) -> None:
        self.state_dir = state_dir
        self.key = host_key(remote, agent)
        self.path = recall(state_dir, self.key)

    def found(self, executable: str) -> None:
        if executable != self.path:
            remember(self.state_dir, self.key, executable)
