"""Command line: ``syncd run`` (one session in the foreground), ``syncd demo``, ``syncd agent``."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from syncd import __version__
from syncd.endpoint import EndpointError, parse_remote
from syncd.session.config import MODES, WINNERS, SessionConfig, default_state_dir
from syncd.session.session import Halted, Session, SessionError
from syncd.transport.connect import AgentOptions
from syncd.transport.ssh import SshOptions

# Stable exit codes (documented in README).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_HALTED = 5


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(stream=sys.stderr, level=level, format="syncd: %(levelname)s %(name)s: %(message)s")


def _fail(message: str, code: int = EXIT_ERROR) -> None:
    click.echo(f"syncd: error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="syncd")
def main() -> None:
    """Keep a local directory and a remote one identical, live, in both directions."""


def session_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--ignore", "ignore", multiple=True, metavar="PAT",
                     help="gitignore-style pattern not to sync (repeatable)"),
        click.option("--preserve-absent", "preserve", multiple=True, metavar="PAT",
                     help="local paths never deleted because the remote lacks them (repeatable)"),
        click.option("--mode", type=click.Choice(MODES), default="two-way", show_default=True),
        click.option("--conflict-winner", "winner", type=click.Choice(WINNERS), default="remote", show_default=True),
        click.option("--port", type=int, help="ssh port"),
        click.option("--identity", type=click.Path(dir_okay=False), help="ssh private key"),
        click.option("--known-hosts", type=click.Path(dir_okay=False), help="known_hosts file to trust"),
        click.option("--ssh-config", type=click.Path(dir_okay=False), help="ssh_config file (default ~/.ssh/config)"),
        click.option("--remote-python", default="python3", show_default=True, help="python on the remote"),
        click.option("--state-dir", type=click.Path(file_okay=False), default=None, help="where the base index lives"),
        click.option("-v", "--verbose", count=True),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def build_config(name: str, local: str, remote: str, opts: dict[str, Any]) -> SessionConfig:
    try:
        endpoint = parse_remote(remote)
    except EndpointError as exc:
        raise click.UsageError(str(exc)) from None
    ssh = SshOptions(port=opts.get("port") or endpoint.port, identity=opts.get("identity"),
                     known_hosts=opts.get("known_hosts"), ssh_config=opts.get("ssh_config"))
    return SessionConfig(
        name=name,
        local=os.path.abspath(local),
        remote=endpoint,
        ignore=tuple(opts.get("ignore") or ()),
        preserve_absent=tuple(opts.get("preserve") or ()),
        mode=opts.get("mode") or "two-way",
        winner=opts.get("winner") or "remote",
        agent=AgentOptions(python=opts.get("remote_python") or "python3", ssh=ssh),
        state_dir=opts.get("state_dir") or default_state_dir(),
    )


async def _run_session(session: Session) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, session.stop)
    await session.run()


def run_foreground(cfg: SessionConfig, quiet: bool = False) -> int:
    def report(line: str) -> None:
        if not quiet:
            click.echo(line)

    session = Session(cfg, report)
    try:
        asyncio.run(_run_session(session))
    except Halted as exc:
        _fail(f"halted: {exc}", EXIT_HALTED)
    except SessionError as exc:
        _fail(str(exc))
    finally:
        if session.stats.cycles and not quiet:
            click.echo(f"syncd: stopped: {session.stats.summary()}")
    return EXIT_OK


@main.command()
@click.argument("local", type=click.Path())
@click.argument("remote")
@click.option("--name", default=None, help="session name (default: derived from LOCAL)")
@click.option("-q", "--quiet", is_flag=True, help="do not print each change")
@session_options
def run(local: str, remote: str, name: str | None, quiet: bool, verbose: int, **opts: Any) -> None:
    """Sync LOCAL with REMOTE until interrupted, printing what travels.

    REMOTE is [user@]host:/path, ssh://[user@]host[:port]/path, local:/path or
    exec:"docker exec -i box"::/path.
    """
    _setup_logging(verbose)
    cfg = build_config(name or os.path.basename(os.path.abspath(local)) or "root", local, remote, opts)
    if not os.path.isdir(cfg.local):
        _fail(f"local directory {cfg.local} does not exist")
    sys.exit(run_foreground(cfg, quiet))


@main.command()
@click.option("--dir", "workdir", default="/tmp/syncd-demo", show_default=True, type=click.Path(file_okay=False))
def demo(workdir: str) -> None:
    """Show live two-way sync between two fresh directories, with no set-up."""
    from syncd.demo import run_demo

    _setup_logging(0)
    sys.exit(asyncio.run(run_demo(workdir)))


@main.command(hidden=True)
def agent() -> None:
    """Serve the agent protocol on stdin/stdout (normally started by syncd itself)."""
    from syncd.agent.main import main as agent_main

    sys.exit(agent_main())


if __name__ == "__main__":
    main()
