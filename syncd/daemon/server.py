"""``syncd daemon``: many sessions in one event loop, driven over a Unix socket.

Start-up order matters to systemd: load sessions, listen on the socket, then READY=1.
The watchdog is fed from a task on the same loop, so a hung loop stops feeding it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import logging
import os
import signal
import socket
import struct
from dataclasses import dataclass
from typing import Any

from syncd.control import wire
from syncd.control.client import default_socket_path
from syncd.daemon.notify import Notifier
from syncd.daemon.registry import ConfigError, Registry, parse_sessions, read_toml
from syncd.daemon.runner import FlushTimeout, SessionRunner
from syncd.session.config import default_state_dir
from syncd.session.session import Halted, SessionError
from syncd.session.spec import SessionSpec, SpecError

log = logging.getLogger("syncd.daemon")
DEFAULT_FLUSH_TIMEOUT = 120.0
DEFAULT_RESYNC_TIMEOUT = 3600.0


class DaemonError(Exception):
    """The daemon cannot start; the message is for the user."""


@dataclass(frozen=True)
class DaemonSettings:
    socket: str
    state_dir: str
    group: str | None = None


def daemon_state_dir() -> str:
    # systemd's StateDirectory= sets $STATE_DIRECTORY.
    return os.environ.get("STATE_DIRECTORY", "").split(":")[0] or (
        "/var/lib/syncd" if os.geteuid() == 0 else default_state_dir()
    )


def default_config_path() -> str | None:
    """/etc/syncd/syncd.toml for root, else $XDG_CONFIG_HOME/syncd/syncd.toml, if present."""
    if os.geteuid() == 0:
        path = "/etc/syncd/syncd.toml"
    else:
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
        path = os.path.join(base, "syncd", "syncd.toml")
    return path if os.path.exists(path) else None


def load_settings(config_path: str | None, socket_override: str | None) -> tuple[DaemonSettings, dict[str, Any]]:
    data = read_toml(config_path) if config_path else {}
    if config_path and not os.path.exists(config_path):
        raise ConfigError(f"{config_path}: no such file")
    section = data.get("daemon", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{config_path}: [daemon] must be a table")
    unknown = set(section) - {"socket", "state_dir", "group"}
    if unknown:
        raise ConfigError(f"{config_path}: [daemon] has unknown settings: {', '.join(sorted(unknown))}")
    for key in ("socket", "state_dir", "group"):
        if key in section and not isinstance(section[key], str):
            raise ConfigError(f"{config_path}: daemon.{key} must be a string")
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    socket_path = socket_override or section.get("socket") or (
        os.path.join(runtime, "syncd.sock") if runtime else default_socket_path()
    )
    settings = DaemonSettings(socket_path, section.get("state_dir") or daemon_state_dir(), section.get("group"))
    return settings, data


class Daemon:
    def __init__(self, config_path: str | None, socket_override: str | None) -> None:
        config_path = config_path or default_config_path()
        self.config_path = config_path
        self.socket_override = socket_override
        self.settings, config = load_settings(config_path, socket_override)
        self.static = parse_sessions(config_path or "", config) if config_path else {}
        self.registry = Registry(self.settings.state_dir)
        self.runners: dict[str, SessionRunner] = {}
        self.dynamic: dict[str, tuple[SessionSpec, bool]] = {}
        self.notifier = Notifier()
        self.server: asyncio.base_events.Server | None = None
        self._stop = asyncio.Event()
        self._lock_fd = -1
        self._gid: int | None = None

    # -- start-up -----------------------------------------------------------------------------

    def _take_lock(self) -> None:
        os.makedirs(self.settings.state_dir, mode=0o700, exist_ok=True)
        path = os.path.join(self.settings.state_dir, "daemon.lock")
        self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DaemonError(f"another syncd daemon uses the state directory {self.settings.state_dir}") from None

    def _prepare_socket(self) -> None:
        path = self.settings.socket
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale socket from a daemon that died
            else:
                raise DaemonError(f"another syncd daemon is listening on {path}")
            finally:
                probe.close()
        if self.settings.group:
            try:
                self._gid = grp.getgrnam(self.settings.group).gr_gid
            except KeyError:
                raise DaemonError(f"group {self.settings.group!r} does not exist") from None

    async def start(self) -> None:
        self._take_lock()
        self._prepare_socket()
        self.dynamic = self.registry.load()
        for spec, paused in {**self.static, **self.dynamic}.values():
            self._spawn(spec, paused)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The umask only around bind(): nothing else may run meanwhile (agents started by
        # the sessions would inherit it).
        old_umask = os.umask(0o177 if self._gid is None else 0o117)
        try:
            listener.bind(self.settings.socket)
        finally:
            os.umask(old_umask)
        if self._gid is not None:
            os.chown(self.settings.socket, -1, self._gid)
            os.chmod(self.settings.socket, 0o660)
        else:
            os.chmod(self.settings.socket, 0o600)
        self.server = await asyncio.start_unix_server(self._serve, sock=listener)
        log.info("listening on %s with %d sessions", self.settings.socket, len(self.runners))
        self.notifier.send("READY=1", f"STATUS={self.summary()}")

    def _spawn(self, spec: SessionSpec, paused: bool) -> None:
        runner = SessionRunner(spec, self.settings.state_dir, paused)
        self.runners[spec.name] = runner
        runner.start()

    def summary(self) -> str:
        states: dict[str, int] = {}
        for runner in self.runners.values():
            states[runner.live_state] = states.get(runner.live_state, 0) + 1
        detail = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        count = len(self.runners)
        return f"{count} session{'' if count == 1 else 's'}" + (f": {detail}" if detail else "")

    # -- running ------------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        await self.start()
        ticker = asyncio.create_task(self._tick())
        try:
            await self._stop.wait()
        finally:
            self.notifier.send("STOPPING=1", "STATUS=stopping")
            ticker.cancel()
            await self.shutdown()

    async def _tick(self) -> None:
        """Feed the watchdog from the loop itself and keep STATUS= current."""
        interval = self.notifier.watchdog_interval or 5.0
        last_status = ""
        while True:
            if self.notifier.watchdog_interval:
                self.notifier.send("WATCHDOG=1")
            status = self.summary()
            if status != last_status:
                self.notifier.send(f"STATUS={status}")
                last_status = status
            await asyncio.sleep(min(interval, 5.0))

    async def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        await asyncio.gather(*(r.stop() for r in self.runners.values()), return_exceptions=True)
        with contextlib.suppress(OSError):
            os.unlink(self.settings.socket)
        self.notifier.close()

    async def reload(self) -> None:
        """SIGHUP: re-read the config file; a bad one is reported and the old one kept."""
        if not self.config_path:
            log.info("SIGHUP: no --config file to reload")
            return
        try:
            _settings, config = load_settings(self.config_path, self.socket_override)
            static = parse_sessions(self.config_path, config)
        except ConfigError as exc:
            log.error("SIGHUP: keeping the current configuration: %s", exc)
            return
        for name in set(self.static) - set(static):
            if name not in self.dynamic and name in self.runners:
                await self.runners.pop(name).stop()
        for name, (spec, paused) in static.items():
            current = self.runners.get(name)
            if current is not None and current.spec == spec:
                continue
            if current is not None:
                await self.runners.pop(name).stop()
            self._spawn(spec, paused)
        self.static = static
        log.info("SIGHUP: configuration reloaded (%d sessions)", len(self.runners))

    # -- the control socket ---------------------------------------------------------------------

    def _peer_allowed(self, writer: asyncio.StreamWriter) -> tuple[bool, str]:
        sock = writer.get_extra_info("socket")
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        who = f"pid {pid} uid {uid} gid {gid}"
        if uid == 0 or uid == os.geteuid():
            return True, who
        if self._gid is not None:
            if gid == self._gid:
                return True, who
            try:
                import pwd

                user = pwd.getpwuid(uid).pw_name
                if user in grp.getgrgid(self._gid).gr_mem:
                    return True, who
            except KeyError:
                pass
        return False, who

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            allowed, who = self._peer_allowed(writer)
            if not allowed:
                log.warning("control: refused a connection from %s", who)
                writer.write(wire.pack(wire.error(wire.E_DENIED, "permission denied")))
                await writer.drain()
                return
            while True:
                try:
                    header = await reader.readexactly(wire.HEADER.size)
                except asyncio.IncompleteReadError:
                    return
                try:
                    length = wire.check_length(header)
                    body = await reader.readexactly(length)
                    request = wire.parse_request(wire.unpack_body(body))
                except wire.WireError as exc:
                    writer.write(wire.pack(wire.error(wire.E_BAD_REQUEST, str(exc))))
                    await writer.drain()
                    return  # the stream may be out of step: close it
                reply = await self.dispatch(request)
                writer.write(wire.pack(reply))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("control: unexpected error")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _runner(self, name: str) -> SessionRunner:
        runner = self.runners.get(name)
        if runner is None:
            raise LookupError(name)
        return runner

    async def dispatch(self, request: wire.Request) -> dict[str, Any]:
        try:
            return wire.ok(await self._handle(request.cmd, request.args))
        except LookupError as exc:
            return wire.error(wire.E_UNKNOWN_SESSION, f"no session named {exc.args[0]!r}")
        except SpecError as exc:
            return wire.error(wire.E_INVALID, str(exc))
        except FlushTimeout as exc:
            return wire.error(wire.E_TIMEOUT, str(exc))
        except Halted as exc:
            return wire.error(wire.E_HALTED, str(exc))
        except (SessionError, ValueError) as exc:
            return wire.error(wire.E_FAILED, str(exc))
        except FileExistsError as exc:
            return wire.error(wire.E_EXISTS, str(exc))

    async def _handle(self, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "debug-hang":
            if os.environ.get("SYNCD_DEBUG_HOOKS") != "1":
                raise ValueError("debug hooks are disabled")
            import time

            log.warning("debug-hang: blocking the event loop on purpose")
            time.sleep(float(args.get("seconds", 3600.0)))  # noqa: ASYNC251 - the point of the hook
            return None
        if cmd == "ping":
            return {"sessions": len(self.runners), "pid": os.getpid()}
        if cmd == "list":
            return [{"name": r.spec.name, "local": r.spec.local, "remote": r.spec.remote, "state": r.live_state}
                    for r in sorted(self.runners.values(), key=lambda r: r.spec.name)]
        if cmd == "add":
            return await self._add(args["name"], args["spec"], bool(args.get("replace", False)),
                                   bool(args.get("paused", False)))
        if cmd == "rm":
            runner = self._runner(args["name"])
            if args["name"] in self.static:
                raise ValueError(f"{args['name']} is declared in {self.config_path}; remove it there")
            await runner.stop()
            del self.runners[args["name"]]
            self.dynamic.pop(args["name"], None)
            self.registry.save(self.dynamic)
            return {"removed": args["name"]}
        if cmd == "status":
            if "name" in args:
                return [self._runner(args["name"]).status()]
            return [r.status() for r in sorted(self.runners.values(), key=lambda r: r.spec.name)]
        if cmd == "flush":
            runner = self._runner(args["name"])
            await runner.flush(float(args.get("timeout", DEFAULT_FLUSH_TIMEOUT)))
            return runner.status()
        if cmd == "pause":
            runner = self._runner(args["name"])
            runner.pause()
            self._persist_paused(runner)
            return {"state": "paused"}
        if cmd == "resume":
            runner = self._runner(args["name"])
            runner.resume(bool(args.get("force", False)))
            self._persist_paused(runner)
            return {"state": "resuming"}
        if cmd == "conflicts":
            runner = self._runner(args["name"])
            return runner.conflicts(bool(args.get("clear", False)))
        if cmd == "resync":
            runner = self._runner(args["name"])
            if args["direction"] not in ("push", "pull"):
                raise ValueError("resync: direction must be push or pull")
            try:
                return await runner.resync(args["direction"], float(args.get("timeout", DEFAULT_RESYNC_TIMEOUT)),
                                           bool(args.get("force", False)))
            finally:
                self._persist_paused(runner)  # a resync lifts a pause; a failed one pauses
        if cmd == "upload":
            runner = self._runner(args["name"])
            excludes = args.get("exclude", [])
            if not all(isinstance(p, str) for p in excludes):
                raise ValueError("upload: exclude must be a list of strings")
            if not os.path.isabs(args["local"]):
                raise ValueError("upload: LOCAL_DIR must be an absolute path")
            return await runner.upload(args["local"], args["remote"], bool(args.get("runtime", False)),
                                       bool(args.get("follow_symlinks", False)), tuple(excludes),
                                       float(args.get("timeout", DEFAULT_RESYNC_TIMEOUT)))
        raise ValueError(f"unhandled command {cmd}")

    def _persist_paused(self, runner: SessionRunner) -> None:
        name = runner.spec.name
        if name in self.dynamic:
            self.dynamic[name] = (runner.spec, runner.paused)
            self.registry.save(self.dynamic)

    async def _add(self, name: str, data: dict[str, Any], replace: bool, paused: bool = False) -> dict[str, Any]:
        spec = SessionSpec.from_dict(name, data)
        current = self.runners.get(name)
        if current is not None:
            if current.spec == spec:
                return {"name": name, "changed": False}
            if not replace:
                raise FileExistsError(
                    f"session {name!r} exists with other settings; pass --replace to change it"
                )
            if name in self.static:
                raise ValueError(f"{name} is declared in {self.config_path}; change it there")
            await current.stop()
            del self.runners[name]
        self.dynamic[name] = (spec, paused)
        self.registry.save(self.dynamic)
        self._spawn(spec, paused)
        return {"name": name, "changed": True}


async def run_daemon(config_path: str | None, socket_override: str | None) -> None:
    daemon = Daemon(config_path, socket_override)
    await daemon.run()
