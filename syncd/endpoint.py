"""Parse the REMOTE argument: ssh, local subprocess, or a generic exec command."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


class EndpointError(ValueError):
    """The REMOTE argument cannot be understood."""


@dataclass(frozen=True)
class Endpoint:
    """Where the agent runs and which root it serves."""

    kind: str  # "ssh", "local" or "exec"
    path: str
    host: str = ""
    user: str | None = None
    port: int | None = None
    command: tuple[str, ...] = ()  # exec: argv prefix that gives a shell on the target

    def describe(self) -> str:
        if self.kind == "ssh":
            who = f"{self.user}@" if self.user else ""
            port = f":{self.port}" if self.port else ""
            return f"ssh://{who}{self.host}{port}/{self.path.lstrip('/')}"
        if self.kind == "exec":
            return f"exec:{shlex.join(self.command)}::{self.path}"
        return f"local:{self.path}"


_SCP_LIKE = re.compile(r"^(?:(?P<user>[^@/:]+)@)?(?P<host>[^@/:\[\]]+|\[[0-9a-fA-F:]+\]):(?P<path>.*)$")


def parse_remote(spec: str) -> Endpoint:
    """Parse ``[user@]host:/path``, ``ssh://[user@]host[:port]/path``, ``local:/path`` or
    ``exec:"docker exec -i box"::/path``."""
    if spec.startswith("local:"):
        path = spec[len("local:") :]
        if not path:
            raise EndpointError("local: needs a path, e.g. local:/srv/work")
        return Endpoint("local", path)
    if spec.startswith("exec:"):
        rest = spec[len("exec:") :]
        command, sep, path = rest.rpartition("::")
        if not sep or not command or not path:
            raise EndpointError('exec: needs a command and a path, e.g. exec:"docker exec -i box"::/work')
        try:
            argv = tuple(shlex.split(command))
        except ValueError as exc:
            raise EndpointError(f"exec command {command!r}: {exc}") from None
        if not argv:
            raise EndpointError("exec: the command is empty")
        return Endpoint("exec", path, command=argv)
    if spec.startswith("ssh://"):
        url = urlsplit(spec)
        if not url.hostname:
            raise EndpointError(f"{spec!r}: no host")
        try:
            port = url.port
        except ValueError:
            raise EndpointError(f"{spec!r}: bad port") from None
        path = unquote(url.path)
        if path.startswith("/~"):
            path = path[1:]
        if not path or path == "/":
            raise EndpointError(f"{spec!r}: no path (ssh://host/abs/path or ssh://host/~/rel)")
        return Endpoint("ssh", path, url.hostname, unquote(url.username) if url.username else None, port)
    match = _SCP_LIKE.match(spec)
    if match is None or not match.group("path"):
        raise EndpointError(
            f"cannot parse remote {spec!r}: expected [user@]host:/path, ssh://[user@]host[:port]/path, "
            'local:/path or exec:"CMD"::/path'
        )
    host = match.group("host").strip("[]")
    return Endpoint("ssh", match.group("path"), host, match.group("user"))
