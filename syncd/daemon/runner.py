"""Supervision of one session inside the daemon: reconnect with capped, jittered backoff,
pause and resume, halts that wait for the user, and the flush barrier."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from typing import Any

from syncd.session.resync import ResyncSummary
from syncd.session.session import Halted, Session, SessionError
from syncd.session.spec import SessionSpec
from syncd.session.upload import UploadError
from syncd.session.upload import upload as upload_dir
from syncd.store import ConflictRecord, Store, StoreBusy, clear_conflicts, list_conflicts

log = logging.getLogger("syncd.daemon")

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0


class FlushTimeout(Exception):
    pass


class SessionRunner:
    def __init__(self, spec: SessionSpec, state_dir: str, paused: bool = False) -> None:
        self.spec = spec
        self.state_dir = state_dir
        self.paused = paused
        self.state = "paused" if paused else "starting"
        self.last_error = ""
        self.halt_reason = ""
        self.session: Session | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._force = False
        self.totals: dict[str, int] = {"sent_files": 0, "sent_bytes": 0, "received_files": 0,
                                       "received_bytes": 0, "deleted": 0}
        self.connected_since = 0.0
        # (direction, force, waiter) for the next session. The waiter goes with the request:
        # a session still finishing an earlier resync must not answer a later one.
        self._resync_request: tuple[str, bool, asyncio.Future[dict[str, Any]]] | None = None
        self._resync_waiter: asyncio.Future[dict[str, Any]] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"session:{self.spec.name}")

    async def stop(self) -> None:
        """Finish the operation in flight, then stop (the base index is saved per cycle)."""
        self._stopping = True
        self._wake.set()
        if self.session is not None:
            self.session.stop()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def pause(self) -> None:
        self.paused = True
        self.state = "paused"
        if self.session is not None:
            self.session.stop()

    def resume(self, force: bool = False) -> None:
        self.paused = False
        if force:
            self._force = True
            self.halt_reason = ""
        elif self.halt_reason:
            # A plain resume retries; if the danger is still there the session halts again.
            self.halt_reason = ""
        self._wake.set()

    async def _idle_until_woken(self, delay: float | None) -> None:
        self._wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)

    async def _supervise(self) -> None:
        backoff = BACKOFF_FIRST
        while not self._stopping:
            if self.paused or self.halt_reason:
                await self._idle_until_woken(None)
                continue
            request, self._resync_request = self._resync_request, None
            resync, force, waiter = request if request is not None else (None, False, None)
            on_resync = functools.partial(self._resync_done, waiter) if waiter is not None else None
            session = Session(self.spec.to_config(self.state_dir), self._report, on_connected=self._connected,
                              resync=resync, on_resync=on_resync, resync_force=force)
            session.force_next = self._force
            self._force = False
            self.session = session
            self.state = "connecting"
            try:
                await session.run()
            except Halted as exc:
                self.halt_reason = str(exc)
                self.state = "halted"
                log.error("%s: halted: %s", self.spec.name, exc)
            except SessionError as exc:
                self.last_error = str(exc)
                self.state = "disconnected"
                if waiter is not None and self._resync_failed(waiter, exc):
                    self._collect(session)
                    self.session = None
                    continue
                if session.connected or session.stats.cycles:
                    backoff = BACKOFF_FIRST  # it worked for a while: start over
                delay = backoff * random.uniform(0.5, 1.0)
                log.warning("%s: %s (retrying in %.1fs)", self.spec.name, exc, delay)
                backoff = min(backoff * 2, BACKOFF_MAX)
                self._collect(session)
                self.session = None
                if not self._stopping and not self.paused:
                    await self._idle_until_woken(delay)
                continue
            except Exception as exc:  # a bug must not take the other sessions down
                if waiter is not None:
                    self._resync_failed(waiter, SessionError(f"resync --{resync} failed: internal error: {exc!r}"))
                self.last_error = f"internal error: {exc!r}"
                self.state = "error"
                log.exception("%s: session crashed", self.spec.name)
                self._collect(session)
                self.session = None
                await self._idle_until_woken(BACKOFF_MAX)
                continue
            self._collect(session)
            self.session = None
            if not self.halt_reason and not self.paused:
                self.state = "stopped"
        if not self.paused and not self.halt_reason:
            self.state = "stopped"

    async def resync(self, direction: str, timeout: float, force: bool = False) -> dict[str, Any]:
        """Rebuild one side from the other (the live session stops for the duration, then
        goes on); returns the summary. A halt or a pause is lifted: this is the way out."""
        if self._resync_waiter is not None and not self._resync_waiter.done():
            raise ValueError(f"a resync of {self.spec.name} is already running")
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._resync_waiter = waiter
        self._resync_request = (direction, force, waiter)
        self.paused = False
        self.halt_reason = ""
        self.state = f"resync-{direction}"
        if self.session is not None:
            self.session.stop()
        self._wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            raise FlushTimeout(f"the resync is still running after {timeout:.0f}s (see `syncd status`)") from None

    async def upload(self, local_dir: str, remote_dir: str, runtime: bool, follow_symlinks: bool,
                     excludes: tuple[str, ...], timeout: float) -> dict[str, Any]:
        """Replace a remote directory with a local one's content (see session.upload)."""
        cfg = self.spec.to_config(self.state_dir)
        try:
            result = await asyncio.wait_for(
                upload_dir(cfg, local_dir, remote_dir, runtime, follow_symlinks, excludes), timeout)
        except UploadError as exc:
            raise SessionError(str(exc)) from None
        except TimeoutError:
            raise FlushTimeout(f"the upload did not finish within {timeout:.0f}s; "
                               "the remote directory is as it was") from None
        return {"name": self.spec.name, **result}

    def _resync_done(self, waiter: asyncio.Future[dict[str, Any]], summary: ResyncSummary) -> None:
        if not waiter.done():
            waiter.set_result({"name": self.spec.name, **summary.as_dict()})

    def _resync_failed(self, waiter: asyncio.Future[dict[str, Any]], exc: SessionError) -> bool:
        """A resync that did not complete: report it, and stay paused rather than sync
        live from the state the user wanted replaced. True if this was the case."""
        if waiter.done():
            return False
        waiter.set_exception(exc)
        if not self._stopping:
            self.paused = True
            self.state = "paused"
        log.error("%s: %s", self.spec.name, exc)
        return True

    def _connected(self) -> None:
        self.last_error = ""

    def _collect(self, session: Session) -> None:
        stats = session.stats
        for key in self.totals:
            self.totals[key] += getattr(stats, key)

    def _report(self, line: str) -> None:
        # One line per file would flood the journal on a big sync: cycles log a summary.
        if line.startswith("!!"):
            log.warning("%s: %s", self.spec.name, line[3:])
        else:
            log.debug("%s: %s", self.spec.name, line)

    # -- queries ----------------------------------------------------------------------------------

    @property
    def live_state(self) -> str:
        session = self.session
        if session is not None and session.connected and self.state not in ("paused", "halted"):
            return session.state
        return self.state

    async def flush(self, timeout: float) -> None:
        """Wait for the session to be connected, then for a full barrier cycle."""
        deadline = time.monotonic() + timeout
        while True:
            if self.halt_reason:
                raise Halted(self.halt_reason)
            if self.paused:
                raise SessionError("the session is paused")
            session = self.session
            if session is not None and session.connected:
                break
            if time.monotonic() >= deadline:
                raise FlushTimeout(f"not connected within {timeout:.0f}s: {self.last_error or self.state}")
            await asyncio.sleep(0.05)
        remaining = max(0.1, deadline - time.monotonic())
        try:
            await asyncio.wait_for(session.flush(), remaining)
        except TimeoutError:
            raise FlushTimeout(f"still syncing after {timeout:.0f}s") from None
        if self.halt_reason:
            raise Halted(self.halt_reason)

    def conflicts(self, clear: bool = False) -> list[dict[str, Any]]:
        """Conflicts recorded so far; ``clear`` forgets them once listed."""
        session = self.session
        if session is not None and session.store is not None:
            records = self._conflicts_in(session.store, clear)
        else:
            try:
                store = Store(self.spec.to_config(self.state_dir).index_path())
            except StoreBusy:
                return []
            try:
                records = self._conflicts_in(store, clear)
            finally:
                store.close()
        return [{"path": r.path, "winner": r.winner, "loser": r.loser, "copy": r.copy, "time": r.stamp}
                for r in records]

    @staticmethod
    def _conflicts_in(store: Store, clear: bool) -> list[ConflictRecord]:
        records = list_conflicts(store)
        if clear:
            clear_conflicts(store)
        return records

    def status(self) -> dict[str, Any]:
        session = self.session
        totals = dict(self.totals)
        pending = (0, 0)
        last_cycle = 0.0
        cycles = 0
        errors: list[str] = []
        resync: dict[str, Any] | None = None
        unhashed = 0
        if session is not None:
            unhashed = session.unhashed
            for key in totals:
                totals[key] += getattr(session.stats, key)
            pending = session.pending()
            last_cycle = session.stats.last_cycle
            cycles = session.stats.cycles
            errors = list(session.stats.errors[-5:])
            progress = session.resync_progress
            if progress is not None and progress.phase != "done":
                resync = progress.as_dict()
        return {
            "name": self.spec.name,
            "local": self.spec.local,
            "remote": self.spec.remote,
            "mode": self.spec.mode,
            "state": self.live_state,
            "last_error": self.last_error,
            "halt_reason": self.halt_reason,
            "last_cycle": last_cycle,
            "cycles": cycles,
            "pending_local": pending[0],
            "pending_remote": pending[1],
            **totals,
            "conflicts": len(self.conflicts()),
            "errors": errors,
            "resync": resync,
            "unhashed": unhashed,
        }
