"""Command line: ``syncd run`` (one session in the foreground), ``syncd demo``, ``syncd agent``."""

from __future__ import annotations

import faulthandler
import io
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from syncd import __version__
from syncd.control import wire
from syncd.control.client import DaemonUnavailable, RemoteError, call, default_socket_path
from syncd.endpoint import EndpointError
from syncd.session.config import MODES, WINNERS, SessionConfig, default_state_dir
from syncd.session.spec import SessionSpec, SpecError

if TYPE_CHECKING:
    from syncd.session.session import Session

# Stable exit codes (documented in README).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NO_DAEMON = 3
EXIT_UNKNOWN_SESSION = 4
EXIT_HALTED = 5
EXIT_TIMEOUT = 6
EXIT_CONFLICTS = 7

_CODE_EXITS = {
    wire.E_UNKNOWN_SESSION: EXIT_UNKNOWN_SESSION,
    wire.E_HALTED: EXIT_HALTED,
    wire.E_TIMEOUT: EXIT_TIMEOUT,
    wire.E_INVALID: EXIT_USAGE,
    wire.E_EXISTS: EXIT_ERROR,
}


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


def _spec(name: str, local: str, remote: str, opts: dict[str, Any]) -> SessionSpec:
    """The session the command-line options describe (paths made absolute)."""

    def absolute(key: str) -> str | None:
        return os.path.abspath(opts[key]) if opts.get(key) else None

    return SessionSpec(
        name=name, local=os.path.abspath(local), remote=remote,
        ignore=tuple(opts.get("ignore") or ()), preserve_absent=tuple(opts.get("preserve") or ()),
        mode=opts.get("mode") or "two-way", conflict_winner=opts.get("winner") or "remote",
        port=opts.get("port"), identity=absolute("identity"), known_hosts=absolute("known_hosts"),
        ssh_config=absolute("ssh_config"), remote_python=opts.get("remote_python") or "python3",
    )


async def _run_session(session: Session) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, session.stop)
    await session.run()


def run_foreground(cfg: SessionConfig, quiet: bool = False) -> int:
    # Imported here: the commands that only talk to the daemon start without the session's
    # modules (about a third of a second of imports on a small machine).
    import asyncio

    from syncd.session.session import Halted, Session, SessionError

    def report(line: str) -> None:
        if not quiet:
            click.echo(line)

    if isinstance(sys.stdout, io.TextIOWrapper):
        # One line per change, seen as it happens also through a pipe or in a log file.
        sys.stdout.reconfigure(line_buffering=True)
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
    faulthandler.enable()  # a crash in an extension leaves every thread's stack on stderr
    spec = _spec(name or os.path.basename(os.path.abspath(local)) or "root", local, remote, opts)
    try:
        cfg = spec.to_config(opts.get("state_dir") or default_state_dir())
    except EndpointError as exc:
        raise click.UsageError(str(exc)) from None
    if not os.path.isdir(cfg.local):
        _fail(f"local directory {cfg.local} does not exist")
    sys.exit(run_foreground(cfg, quiet))


@main.command()
@click.option("--dir", "workdir", default="/tmp/syncd-demo", show_default=True, type=click.Path(file_okay=False))
def demo(workdir: str) -> None:
    """Show live two-way sync between two fresh directories, with no set-up."""
    import asyncio

    from syncd.demo import run_demo

    _setup_logging(0)
    sys.exit(asyncio.run(run_demo(workdir)))


socket_option = click.option(
    "--socket", "socket_path", envvar="SYNCD_SOCKET", default=None, metavar="PATH",
    help="control socket (default: $SYNCD_SOCKET, /run/syncd/syncd.sock for root, else $XDG_RUNTIME_DIR/syncd)",
)
json_option = click.option("--json", "as_json", is_flag=True, help="print one JSON document")


def _call(socket_path: str | None, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = 30.0) -> Any:
    """One request to the daemon; typed failures become documented exit codes."""
    try:
        return call(socket_path or default_socket_path(), cmd, args, timeout)
    except DaemonUnavailable as exc:
        _fail(str(exc), EXIT_NO_DAEMON)
    except RemoteError as exc:
        _fail(str(exc), _CODE_EXITS.get(exc.code, EXIT_ERROR))
    raise AssertionError("unreachable")


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise click.BadParameter("must be a finite number of seconds")
    return value


def _printed_json(row: Any, as_json: bool) -> bool:
    if as_json:
        _print_json(row)
    return as_json


def timeout_option(default: float, help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--timeout", type=click.FloatRange(min=0, min_open=True, max=1e8), default=default,
                        show_default=True, callback=lambda ctx, param, value: _finite(value), help=help_text)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML file with [daemon] settings and [sessions.NAME] tables")
@socket_option
@click.option("-v", "--verbose", count=True)
def daemon(config_path: str | None, socket_path: str | None, verbose: int) -> None:
    """Run the daemon in the foreground (systemd's ExecStart)."""
    import asyncio

    from syncd.daemon.registry import ConfigError
    from syncd.daemon.server import DaemonError, run_daemon

    logging.basicConfig(stream=sys.stderr, level=logging.INFO - 10 * min(verbose, 1),
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    faulthandler.enable()  # a crash in an extension leaves every thread's stack in the journal
    try:
        asyncio.run(run_daemon(config_path, socket_path))
    except (DaemonError, ConfigError) as exc:
        _fail(str(exc))


@main.command()
@click.argument("name")
@click.argument("local", type=click.Path())
@click.argument("remote")
@click.option("--replace", is_flag=True, help="change an existing session with other settings")
@click.option("--paused", is_flag=True, help="add it paused (e.g. to start with `syncd resync --pull`)")
@socket_option
@session_options
def add(name: str, local: str, remote: str, replace: bool, paused: bool, socket_path: str | None, verbose: int,
        **opts: Any) -> None:
    """Add a session (idempotent: the same settings again change nothing)."""
    spec = _spec(name, local, remote, opts)
    try:
        spec.validate()
    except SpecError as exc:
        raise click.UsageError(str(exc)) from None
    args: dict[str, Any] = {"name": name, "spec": spec.to_dict(), "replace": replace}
    if paused:
        args["paused"] = True
    result = _call(socket_path, "add", args)
    click.echo(f"{name}: {'added' if result['changed'] else 'unchanged'}")


@main.command()
@click.argument("name")
@socket_option
def rm(name: str, socket_path: str | None) -> None:
    """Stop a session and forget it (files stay as they are)."""
    _call(socket_path, "rm", {"name": name})
    click.echo(f"{name}: removed")


@main.command(name="list")
@socket_option
@json_option
def list_sessions(socket_path: str | None, as_json: bool) -> None:
    """List sessions."""
    rows = _call(socket_path, "list")
    if as_json:
        _print_json({"sessions": rows})
        return
    if not rows:
        click.echo("no sessions")
    for row in rows:
        click.echo(f"{row['name']:20} {row['state']:13} {row['local']}  <->  {row['remote']}")


def _age(ts: float) -> str:
    if not ts:
        return "-"
    seconds = max(0, int(time.time() - ts))
    return f"{seconds}s ago" if seconds < 120 else f"{seconds // 60}m ago"


@main.command()
@click.argument("name", required=False)
@socket_option
@json_option
def status(name: str | None, socket_path: str | None, as_json: bool) -> None:
    """State, last cycle, pending changes, transfers, conflicts and errors."""
    rows = _call(socket_path, "status", {"name": name} if name else {})
    if as_json:
        _print_json({"sessions": rows})
        return
    if not rows:
        click.echo("no sessions")
        return
    click.echo(f"{'NAME':18} {'STATE':13} {'LAST CYCLE':11} {'PENDING':8} {'SENT':>10} {'RECEIVED':>10} CONFLICTS")
    for row in rows:
        pending = row["pending_local"] + row["pending_remote"]
        click.echo(f"{row['name']:18} {row['state']:13} {_age(row['last_cycle']):11} {pending:<8} "
                   f"{_size(row['sent_bytes']):>10} {_size(row['received_bytes']):>10} {row['conflicts']}")
        if row.get("resync"):
            click.echo("    " + _resync_line("resync", row, 0, 0.0, row["resync"]["seconds"]).split(": ", 1)[1])
        if row.get("unhashed"):
            click.echo(f"    recording the digests of {row['unhashed']} files placed by the resync")
        for problem in filter(None, [row["halt_reason"], row["last_error"], *row["errors"]]):
            click.echo(f"    ! {problem}")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def _flush_line(name: str, row: dict[str, Any], moved: int, rate: float, elapsed: float) -> str:
    pending = row["pending_local"] + row["pending_remote"]
    return (f"{name}: {row['state']:<12} pending {pending:<6} moved {_size(moved):>10} "
            f"{_size(int(rate)):>10}/s  {elapsed:5.1f}s")


def _resync_line(name: str, row: dict[str, Any], moved: int, rate: float, elapsed: float) -> str:
    progress = row.get("resync")
    if not progress:
        return f"{name}: {row['state']:<12} {elapsed:5.1f}s"
    eta = "" if progress["eta"] is None else f" ETA {progress['eta']:.0f}s"
    return (f"{name}: {progress['direction']} {progress['phase']:<9} {progress['files']}/{progress['total_files']} "
            f"files {_size(progress['bytes'])}/{_size(progress['total_bytes'])} "
            f"{_size(progress['rate'])}/s{eta}  {elapsed:5.1f}s")


def _with_progress(socket_path: str | None, name: str, work: Callable[[], Any],
                   line: Callable[[str, dict[str, Any], int, float, float], str] = _flush_line) -> Any:
    """Run a long request while a status line updates on the terminal."""
    import threading

    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = work()
        except SystemExit as exc:
            result["exit"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    started = time.monotonic()
    first: int | None = None
    while worker.is_alive():
        worker.join(0.5)
        if not worker.is_alive():
            break
        try:
            (row,) = call(socket_path or default_socket_path(), "status", {"name": name}, 5.0)
        except (DaemonUnavailable, RemoteError, ValueError):
            continue
        moved = row["sent_bytes"] + row["received_bytes"]
        first = moved if first is None else first
        elapsed = time.monotonic() - started
        rate = (moved - first) / elapsed if elapsed > 0 else 0.0
        click.echo("\r" + line(name, row, moved, rate, elapsed) + "\033[K", err=True, nl=False)
    click.echo("\r\033[K", err=True, nl=False)
    if "exit" in result:
        raise result["exit"]
    return result.get("value")


@main.command()
@click.argument("name")
@timeout_option(120.0, "seconds before giving up (exit 6)")
@socket_option
@json_option
def flush(name: str, timeout: float, socket_path: str | None, as_json: bool) -> None:
    """Return once every change made before the call is on both sides (a barrier).

    Exits 7 when the session has recorded conflicts (see `syncd conflicts`)."""
    started = time.monotonic()
    if sys.stderr.isatty() and not as_json:
        row = _with_progress(socket_path, name, lambda: _call(
            socket_path, "flush", {"name": name, "timeout": timeout}, timeout=timeout + 10))
    else:
        row = _call(socket_path, "flush", {"name": name, "timeout": timeout}, timeout=timeout + 10)
    row["flush_seconds"] = round(time.monotonic() - started, 3)
    if as_json:
        _print_json(row)
    else:
        click.echo(f"{name}: in sync ({row['flush_seconds']:.2f}s)")
    if row.get("conflicts"):
        if not as_json:
            click.echo(f"{name}: {row['conflicts']} conflicts recorded; see `syncd conflicts {name}`", err=True)
        sys.exit(EXIT_CONFLICTS)


@main.command()
@click.argument("name")
@socket_option
def pause(name: str, socket_path: str | None) -> None:
    """Stop syncing a session until resumed."""
    _call(socket_path, "pause", {"name": name})
    click.echo(f"{name}: paused")


@main.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="after a safety halt: propagate what halted it")
@socket_option
def resume(name: str, force: bool, socket_path: str | None) -> None:
    """Resume a paused or halted session."""
    result = _call(socket_path, "resume", {"name": name, "force": force})
    click.echo(f"{name}: {result['state']}")


@main.command()
@click.argument("name")
@click.option("--clear", is_flag=True, help="forget the listed conflicts (the copies stay on disk)")
@socket_option
@json_option
def conflicts(name: str, clear: bool, socket_path: str | None, as_json: bool) -> None:
    """List conflicts: the path, the winner, and where the losing version was kept."""
    rows = _call(socket_path, "conflicts", {"name": name, "clear": clear})
    if as_json:
        _print_json({"conflicts": rows})
        return
    if not rows:
        click.echo("no conflicts")
    for row in rows:
        kept = f"kept as {row['copy']}" if row["copy"] else "replaced, no copy (inside .git)"
        click.echo(f"{row['time']}  {row['path']}: {row['winner']} won; {row['loser']} version {kept}")


def _print_skipped(skipped: list[dict[str, Any]]) -> None:
    for skip in skipped[:20]:
        click.echo(f"    skipped {skip['path']}: {skip['reason']} ({skip['detail']})", err=True)
    if len(skipped) > 20:
        click.echo(f"    ... and {len(skipped) - 20} more (see --json)", err=True)


@main.command()
@click.argument("name")
@click.option("--push", "direction", flag_value="push", help="rebuild the remote from the local tree")
@click.option("--pull", "direction", flag_value="pull", help="rebuild the local tree from the remote")
@timeout_option(3600.0, "seconds before giving up waiting (exit 6)")
@click.option("--force", is_flag=True, help="even from an empty source tree (which deletes everything)")
@socket_option
@json_option
def resync(name: str, direction: str | None, timeout: float, force: bool, socket_path: str | None,
           as_json: bool) -> None:
    """Rebuild one side from the other as one tar stream, then sync live again.

    Ignored entries stay on both sides; with --pull, preserve-absent entries stay too. A
    resync cut short leaves the destination as it was. Lifts a halt or a pause. An empty
    source tree is refused unless --force (it would only delete)."""
    if direction is None:
        _fail("say which side is the truth: --push (local) or --pull (remote)", EXIT_USAGE)
    args: dict[str, Any] = {"name": name, "direction": direction, "timeout": timeout}
    if force:
        args["force"] = True
    if sys.stderr.isatty() and not as_json:
        row = _with_progress(socket_path, name, lambda: _call(socket_path, "resync", args, timeout=timeout + 10),
                             _resync_line)
    else:
        row = _call(socket_path, "resync", args, timeout=timeout + 10)
    if _printed_json(row, as_json):
        return
    click.echo(f"{name}: resync --{direction}: {row['files']} entries, {_size(row['bytes'])} in "
               f"{row['seconds']:.2f}s, {row['deleted']} deleted, {len(row['skipped'])} skipped; syncing live")
    _print_skipped(row["skipped"])


@main.command()
@click.argument("name")
@click.argument("local_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("remote_dir")
@click.option("--follow-symlinks", is_flag=True, help="send what symlinks point to, as regular files and directories")
@click.option("--exclude", multiple=True, metavar="PAT", help="gitignore-style pattern not to send (repeatable)")
@click.option("--runtime", is_flag=True, help="REMOTE_DIR is under the agent's runtime directory, not the remote root")
@timeout_option(3600.0, "seconds before giving up (exit 6)")
@socket_option
@json_option
def upload(name: str, local_dir: str, remote_dir: str, follow_symlinks: bool, exclude: tuple[str, ...],
           runtime: bool, timeout: float, socket_path: str | None, as_json: bool) -> None:
    """Replace REMOTE_DIR (relative to the session's remote root) with LOCAL_DIR's content."""
    args = {"name": name, "local": os.path.abspath(local_dir), "remote": remote_dir, "runtime": runtime,
            "follow_symlinks": follow_symlinks, "exclude": list(exclude), "timeout": timeout}
    row = _call(socket_path, "upload", args, timeout=timeout + 10)
    if _printed_json(row, as_json):
        return
    click.echo(f"{name}: uploaded {row['files']} entries, {_size(row['bytes'])} to {row['where']} "
               f"in {row['seconds']:.2f}s")
    _print_skipped(row["skipped"])


@main.command(hidden=True)
def agent() -> None:
    """Serve the agent protocol on stdin/stdout (normally started by syncd itself)."""
    from syncd.agent.main import main as agent_main

    sys.exit(agent_main())


if __name__ == "__main__":
    main()
