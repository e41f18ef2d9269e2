"""Start the agent on an endpoint and hand back a channel that speaks the protocol."""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys

from syncd.endpoint import Endpoint
from syncd.transport import bootstrap
from syncd.transport.channel import Channel, OnLink, TransportError, spawn
from syncd.transport.options import AgentOptions

log = logging.getLogger("syncd.transport")


class AgentExited(TransportError):
    """The agent's command ended before the agent ran (no such interpreter, one too old)."""


def _exit_reason(status: int | None, stderr: str) -> str:
    if status == 127 or "python3: not found" in stderr or "No such file" in stderr and "python" in stderr:
        return f"the remote has no python3 (exit {status}): {stderr or 'command not found'}"
    if status == 64:
        return stderr or "the remote python3 is too old (3.8 or newer is needed)"
    return f"the agent failed to start (exit {status}): {stderr or 'no message'}"


async def start_agent(endpoint: Endpoint, opts: AgentOptions, label: str = "",
                      on_link: OnLink | None = None, python_path: str | None = None) -> Channel:
    """Run the loader on the endpoint, upload the zipapp if the cache lacks it, and return
    the channel positioned at the agent's first protocol byte. The agent's stderr is
    logged with ``label`` (see Channel). ``on_link`` is told how to run a script beside
    the agent (Channel.direct_argv) as soon as the endpoint is reached: a process can
    then log in while the agent starts.

    ``python_path``: the interpreter that ``opts.python`` led to last time (Opened's
    ``executable``), tried first. Where ``python3`` is a wrapper script (pyenv's and
    asdf's shims), running the interpreter itself saves the wrapper's start-up, about
    80 ms, on every connect. Should it not start the agent, ``opts.python`` does."""
    first = python_path if python_path and endpoint.kind != "local" else None
    command = bootstrap.loader_command(first or opts.python, opts.cache_dir)
    if endpoint.kind == "ssh":
        # asyncssh is heavy: loaded only when needed, and by a thread, so that the event
        # loop meanwhile starts the local side's work (a first sync's archiving child is
        # spawned about 0.25 s sooner).
        ssh = await asyncio.to_thread(importlib.import_module, "syncd.transport.ssh")
        channel: Channel = await ssh.open_channel(endpoint.host, endpoint.user, opts.ssh, command, on_link)
    elif endpoint.kind in ("local", "exec"):
        if endpoint.kind == "local":
            shell = ["/bin/sh", "-c"]
            python = sys.executable if opts.python == "python3" else opts.python
            command = bootstrap.loader_command(python, opts.cache_dir)
        else:
            shell = [*endpoint.command, "sh", "-c"]
        if on_link is not None:
            on_link(lambda script: [*shell, script])
        channel = await spawn(shell, command)
    else:
        raise TransportError(f"unknown endpoint kind {endpoint.kind!r}")
    try:
        try:
            await _until_ready(channel)
        except AgentExited as exc:
            if first is None:
                raise
            log.info("%s: %s did not start the agent (%s); starting it with %s", label or endpoint.describe(),
                     first, exc, opts.python)
            channel = await channel.rerun(bootstrap.loader_command(opts.python, opts.cache_dir))
            await _until_ready(channel)
        channel.log_stderr_as(label)
    except (ConnectionError, OSError) as exc:
        await channel.close()
        raise TransportError(f"connection lost while starting the agent: {exc}") from None
    except TransportError:
        await channel.close()
        raise
    return channel


async def _until_ready(channel: Channel) -> None:
    """Read the loader's answer, uploading the zipapp if it asks for it."""
    line = await channel.readline()
    if line == bootstrap.NEED:
        channel.write(bootstrap.agent_zipapp())
        await channel.drain()
        line = await channel.readline()
    if line != bootstrap.READY:
        status = await channel.exit_status()
        if status is None and line:
            raise TransportError(f"the remote answered garbage while starting the agent: {line[:80]!r}")
        raise AgentExited(_exit_reason(status, channel.stderr_text()))
