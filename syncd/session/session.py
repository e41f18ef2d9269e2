"""One sync session: a local root and a remote root kept identical, live.

Watch first, then scan (nothing changed during the scan is missed); every watcher batch
is only a list of paths to re-stat. Each cycle observes the dirty paths on both sides,
replays detected renames, reconciles against the base, applies the plan on both sides,
and records in the base only what both sides now hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from syncd.agent.watch import Watcher, start_watcher
from syncd.engine import model as em
from syncd.engine.index import BaseIndex, dir_prints, sides_prints
from syncd.engine.model import Action, Agreed, Intent, Plan, Policy
from syncd.engine.reconcile import ancestors, detect_moves, needs_digest, reconcile, rekey
from syncd.engine.recovery import adopt
from syncd.fsops import read_file
from syncd.protocol import messages as m
from syncd.rules import Rules
from syncd.scan import is_ignore_file, is_temp_name, is_under, parent_of, root_is_empty
from syncd.session import interpreters
from syncd.session.agent_client import AgentClient, AgentError
from syncd.session.config import SessionConfig
from syncd.session.local_side import LocalSide, load_base, local_digests
from syncd.session.resync import (
    ResyncProgress,
    ResyncRefused,
    ResyncSummary,
    abandon,
    open_early_pull,
    open_early_push,
)
from syncd.session.resync import pull as resync_pull
from syncd.session.resync import push as resync_push
from syncd.session.tar_worker import ProduceWorker
from syncd.store import Store, StoreBusy, add_conflicts, clear_intents, load_intents, record_intents
from syncd.tarstream import ExtractError
from syncd.transport.channel import DirectArgv, TransportError
from syncd.transport.connect import start_agent

log = logging.getLogger("syncd.session")
ANSWER_FIRST = 0.02  # seconds between the end of a resync and arming the local watcher
T = TypeVar("T")

INLINE_MAX = 256 * 1024  # files up to this size ride inside the Apply batch
BATCH_BYTES = 4 * 1024 * 1024
BATCH_OPS = 1000
BLOB_CHUNK = 1024 * 1024
FETCH_PARALLEL = 32
MOVE_WINDOW = 2.0  # seconds during which events under a moved directory's old name are translated
# Seconds a path its side reports gone waits, once, for the new name that would make it a
# move: a rename's two events can be delivered in two batches (see _hold_departures).
MOVE_GRACE = 0.1
RETRIES = 3  # immediate retries of a failing path before it waits for a full rescan
DIGEST_FILL_CHUNK = 512  # files hashed per job of the digest fill (see _fill_digests)
MAX_PARKED_UNKNOWN = 10_000  # unreadable paths re-asked each cycle; beyond that, the full rescan finds them


class SessionError(Exception):
    """The session cannot go on; the message is for the user."""


class Halted(SessionError):
    """A safety halt: propagating would lose data; nothing was changed."""


@dataclass
class Stats:
    cycles: int = 0
    sent_files: int = 0
    sent_bytes: int = 0
    received_files: int = 0
    received_bytes: int = 0
    deleted: int = 0
    conflicts: list[em.Conflict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    last_cycle: float = 0.0
    wire_out: int = 0
    wire_in: int = 0

    def summary(self) -> str:
        return (f"sent {self.sent_files} files ({self.sent_bytes} bytes), received {self.received_files} files "
                f"({self.received_bytes} bytes), deleted {self.deleted}, conflicts {len(self.conflicts)}; "
                f"wire out {self.wire_out} bytes, in {self.wire_in} bytes")


Observed = dict[str, m.Entry | None]


def _expect(entry: m.Entry | None) -> m.Expect:
    if entry is None:
        return m.Expect(m.ABSENT)
    if entry.kind == m.FILE:
        return m.Expect(m.FILE, entry.size, entry.mtime_ns, entry.ino)
    return m.Expect(entry.kind, 0, 0, entry.ino)


def _replace_base(store: Store, rows: list[Agreed]) -> None:
    store.replace_all(rows)
    clear_intents(store)


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _stop_started(starting: asyncio.Future[Watcher]) -> None:
    """Stop a watcher whose start completed after its session gave up waiting for it."""
    if not starting.cancelled() and starting.exception() is None:
        starting.result().stop(wait=False)


class Session:
    def __init__(self, cfg: SessionConfig, report: Callable[[str], None] | None = None,
                 on_connected: Callable[[], None] | None = None, resync: str | None = None,
                 on_resync: Callable[[ResyncSummary], None] | None = None, resync_force: bool = False) -> None:
        self.cfg = cfg
        self.resync = resync  # "push" or "pull": rebuild that side first, then sync live
        self.on_resync = on_resync
        self.resync_force = resync_force  # resync even from an empty source tree
        self.resync_progress: ResyncProgress | None = ResyncProgress(resync) if resync else None
        self.resync_summary: ResyncSummary | None = None
        self._in_place = False  # the running stream's tree is in place (see placed)
        self.on_connected = on_connected
        self.report = report or (lambda line: None)
        self.state = "starting"
        self.stats = Stats()
        self.store: Store | None = None
        self.base = BaseIndex()
        self.agent: AgentClient | None = None
        self.local: LocalSide | None = None
        self.rules = Rules(cfg.ignore, cfg.preserve_absent)
        self.local_dirty: set[str] = set()
        self.remote_dirty: set[str] = set()
        self.local_full = True
        self.remote_full = True
        self.wakeup = asyncio.Event()
        self.idle = asyncio.Event()
        self._stop = asyncio.Event()
        self._local_armed = asyncio.Event()
        self._fs_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"syncd-fs-{cfg.name}")
        self._tasks: list[asyncio.Task[None]] = []
        self.remote_root = ""
        self._failures: dict[str, int] = {}  # path -> consecutive failed attempts
        self._recent_moves: list[tuple[str, str, float]] = []  # (old, new, when) replayed moves
        self._walk_next: set[str] = set()  # known directories to walk, not just stat, next cycle
        # Paths to look at again on both sides (a failed operation), which unlike watcher
        # reports say nothing about what either side did.
        self._recheck: set[str] = set()
        # Paths reconcile deferred: looked at again with the next cycle, never on their own.
        self._parked: set[str] = set()
        # Per side: tracked paths that side itself was seen to lack (its own report or a full
        # scan) while their base rows stayed; the evidence holds while the rows do.
        self._seen_gone: dict[em.Side, set[str]] = {"local": set(), "remote": set()}
        # Per side: tracked paths reported gone and held back by the last cycle (see
        # _hold_departures); the next cycle takes their absence as it finds it.
        self._held: dict[em.Side, set[str]] = {"local": set(), "remote": set()}
        self._hold_until = 0.0  # monotonic time before which no cycle starts
        self._intents: list[Intent] = []
        # Fingerprints of the base's directory listings on each side for full scans, and
        # the directories each side's last full scan found unchanged.
        self._prints: dict[em.Side, dict[str, bytes]] = {"local": {}, "remote": {}}
        self._matched: dict[str, set[str]] = {"local": set(), "remote": set()}
        # The local tree, scanned while the agent starts, for the first cycle.
        self._prescan: asyncio.Future[tuple[list[m.Entry], set[str]]] | None = None
        # The remote tree, scanned as soon as the agent runs and the base is fingerprinted.
        self._remote_prescan: asyncio.Future[tuple[list[m.Entry], set[str]] | None] | None = None
        # The archiver of a resync --push, or of a first sync into an empty remote.
        self._push_worker: asyncio.Future[ProduceWorker] | None = None
        # Its direct stream, logging in while the agent starts (see resync.open_early_push).
        self._early_push: asyncio.Future[Any] | None = None
        # A pull's, likewise (see resync.open_early_pull).
        self._early_pull: asyncio.Future[Any] | None = None
        self._local_ready = asyncio.Event()  # _prepare_local is done
        self.unhashed = 0  # files _fill_digests has still to hash
        self._first_progress: ResyncProgress | None = None  # a first sync's stream, if it goes
        self.remote_empty = False  # the agent found nothing synced in the remote root
        self._first_pull = False  # a first sync into an empty local root: see _first_sync
        self._prints_ready = asyncio.Event()
        self.started_cycles = 0
        self.finished_cycles = 0
        self.force_next = False  # skip the safety halts for one cycle (resume --force)
        self.connected = False

    # -- lifecycle ------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        self.wakeup.set()

    async def connect(self) -> None:
        """Check the local root, start the agent and bind it to the remote root. The
        local side is prepared meanwhile (see _prepare_local): it needs no remote."""
        cfg = self.cfg
        if not os.path.isdir(cfg.local):
            raise SessionError(f"local directory {cfg.local} does not exist")
        try:
            self.store = Store(cfg.index_path())
        except StoreBusy as exc:
            raise SessionError(str(exc)) from None
        self.state = "connecting"
        preparing = asyncio.ensure_future(self._prepare_local())
        try:
            await self._start_remote()
            await preparing
        except BaseException:
            preparing.cancel()
            await asyncio.gather(preparing, return_exceptions=True)
            raise
        self.connected = True
        if self.on_connected is not None:
            self.on_connected()

    async def _start_remote(self) -> None:
        cfg = self.cfg
        python = interpreters.Recorded(cfg.state_dir, cfg.remote, cfg.agent)
        try:
            channel = await start_agent(cfg.remote, cfg.agent, cfg.name, on_link=self._on_link,
                                        python_path=python.path)
        except TransportError as exc:
            raise SessionError(str(exc)) from None
        agent = self.agent = AgentClient(channel)
        try:
            agent.begin()
            # Open, and the first scan, follow our Hello without waiting for the agent's:
            # it serves them in order as soon as it runs.
            opening = asyncio.ensure_future(agent.open(cfg.remote.path, self.rules.to_wire(), True, True))
            try:
                await agent.wait_hello()
                if agent.supports("scan-tree") and self.resync is None:
                    self._remote_prescan = asyncio.ensure_future(self._scan_remote_tree(agent, opening))
                opened = await opening
            finally:
                opening.cancel()
                await asyncio.gather(opening, return_exceptions=True)
        except AgentError as exc:
            await agent.close()
            self.agent = None
            raise SessionError(f"{cfg.remote.describe()}: {exc}") from None
        self.remote_root = opened.root
        self.remote_empty = opened.empty
        python.found(opened.executable)
        log.info("%s: agent on python %s, root %s, watcher %s", cfg.name, opened.python, opened.root,
                 opened.watcher)

    def _on_link(self, direct_argv: DirectArgv) -> None:
        # Each returns at once (None) where no such stream is to come.
        self._early_push = asyncio.ensure_future(open_early_push(self, direct_argv))
        self._early_pull = asyncio.ensure_future(open_early_pull(self, direct_argv))

    @property
    def first_pull(self) -> bool:
        """A first sync into an empty local root (once _prepare_local is done)."""
        return self._first_pull

    def take_early_pull(self) -> asyncio.Future[Any] | None:
        """The command started for a pull while the agent started, if any (the caller
        owns it now)."""
        early, self._early_pull = self._early_pull, None
        return early

    def take_early_push(self) -> asyncio.Future[Any] | None:
        """The direct stream started for a push while the agent started, if any (the
        caller owns it now)."""
        early, self._early_push = self._early_push, None
        return early

    async def _prepare_local(self) -> None:
        """Load the base and fingerprint it, then start arming the local watcher and
        scanning the local tree: the first cycle then mostly waits for the remote side."""
        store = self.store
        assert store is not None
        if self.resync == "push":  # the tree is listed, and its stream begins, while the agent starts
            self._start_push_worker()  # (it needs no base: started before the base loads)
        loading = asyncio.ensure_future(asyncio.to_thread(load_base, store, self.cfg.local))
        try:
            self.base = await asyncio.shield(loading)
        except asyncio.CancelledError:
            # The store is closed after a cancellation: let its reader finish first.
            await asyncio.gather(loading, return_exceptions=True)
            raise
        self._intents = load_intents(store)
        self.local = LocalSide(self.cfg.local, self.rules, self.base)
        # A first sync (no base yet) may go as one stream: see _first_sync.
        first = self.resync is None and not self._intents and not self.base and not self.base.kept_rows()
        if first and self.cfg.mode != "push" and root_is_empty(self.cfg.local, self.rules.is_ignored):
            self._first_pull = True  # unless the remote is empty too; its scan would be wasted
        # Unless intents are to be adopted (a plain scan, left to the first cycle) or a resync
        # replaces the base (the cycle after it fingerprints the new one).
        if not self._intents and self.resync is None:
            # Before the watcher: the remote scan waits for them, and starting watchfiles
            # holds the GIL for a while on a big tree. Both sides in one pass: the local
            # scan needs its own soon after.
            self._prints.update(await asyncio.to_thread(sides_prints, self.base))
        self._prints_ready.set()
        first_push = first and not self._first_pull and self.cfg.mode != "pull"
        if self.resync is None and not self._first_pull and not first_push:
            self._tasks.append(asyncio.create_task(self._watch_local()))
        # else armed after the resync or the first sync's stream: watching a tree being
        # rebuilt only costs (each event would be looked at again anyway, a full scan
        # follows, and a watcher thread slows the extraction). Nor is one armed while the
        # tree is archived: the watcher is told of every file opened (watchfiles asks
        # inotify for IN_OPEN), which cost its thread 0.9 CPU-s on 50,000 files.
        if first_push:
            # If the remote turns out empty the tree goes as one stream, so the archiver
            # starts now and the scan waits.
            self._first_progress = ResyncProgress("push")
            self._start_push_worker(self._first_progress)
        elif first and self._first_pull:
            self._first_progress = ResyncProgress("pull")
        elif not self._intents and self.resync is None:  # a resync changes the tree first
            self._prescan = asyncio.ensure_future(self._scan_local_tree(prints_ready=True))
        self._local_ready.set()

    def _start_push_worker(self, progress: ResyncProgress | None = None) -> asyncio.Future[ProduceWorker]:
        progress = progress or self.resync_progress
        assert progress is not None
        self._push_worker = asyncio.ensure_future(ProduceWorker.start(self.cfg.local, self.rules.to_wire(),
                                                                      progress.add))
        return self._push_worker

    async def _drop_prepared_streams(self) -> None:
        for early in (self.take_early_push(), self.take_early_pull()):
            if early is not None:
                await abandon(early)
        if self._push_worker is not None:
            worker, self._push_worker = self._push_worker, None
            if not worker.done():
                worker.cancel()
            with contextlib.suppress(BaseException):
                await (await worker).close()

    async def push_worker(self) -> ProduceWorker:
        """The process archiving the local tree for a resync --push (started early)."""
        return await (self._push_worker or self._start_push_worker())

    async def _scan_remote_tree(self, agent: AgentClient, opening: asyncio.Future[Any]
                                ) -> tuple[list[m.Entry], set[str]] | None:
        """The first cycle's remote scan, sent as soon as the base is fingerprinted and
        the root is open (a scan after a refused Open is a protocol error)."""
        await self._prints_ready.wait()
        try:
            await asyncio.shield(opening)
        except Exception:
            return None  # the Open failed: that error is the session's, reported there
        if self._intents or self._first_pull:
            return None  # adopting intents needs a scan of every path; a stream scans anyway
        return await agent.scan_tree(self._prints["remote"])

    async def _scan_local_tree(self, prints_ready: bool = False) -> tuple[list[m.Entry], set[str]]:
        """Scan the local tree against the base's fingerprints (computed here unless
        ``prints_ready`` says the current ones were made from this base)."""
        local = self.local
        assert local is not None
        if not prints_ready:
            self._prints["local"] = await asyncio.to_thread(dir_prints, self.base, "local")
        # Watch before scanning, so nothing changed during the scan is missed.
        await self._local_armed.wait()
        return await asyncio.to_thread(local.scanner.scan_tree, self._prints["local"])

    async def close(self) -> None:
        """Release everything; each step runs even if an earlier one failed, so the index
        lock is always given back."""
        if self.agent is not None:
            self.stats.wire_out = self.agent.bytes_sent
            self.stats.wire_in = self.agent.bytes_received
        try:
            for prescan in (self._prescan, self._remote_prescan):
                if prescan is not None:
                    prescan.cancel()
                    await asyncio.gather(prescan, return_exceptions=True)
            await self._drop_prepared_streams()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks.clear()
            if self.agent is not None:
                agent, self.agent = self.agent, None
                await agent.close()
        finally:
            try:
                if self.local is not None:
                    local, self.local = self.local, None
                    await asyncio.get_running_loop().run_in_executor(self._fs_pool, local.close)
            finally:
                if self.store is not None:
                    store, self.store = self.store, None
                    store.close()
                self.connected = False
                self._fs_pool.shutdown(wait=False)  # a Session runs once; the runner makes a new one

    async def run(self) -> None:
        """Connect, sync, then follow changes on both sides until stopped."""
        try:
            # A stop request must not wait for a hung handshake (connect timeout).
            connecting = asyncio.ensure_future(self.connect())
            stopping = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not connecting.done():
                connecting.cancel()
                with contextlib.suppress(asyncio.CancelledError, SessionError):
                    await connecting
                return
            connecting.result()
            if self.resync is not None:
                await self._resync(self.resync)
                # Whoever waits for the resync is answered first (a few turns of the loop):
                # arming the watcher on a large tree holds the interpreter for a while.
                await asyncio.sleep(ANSWER_FIRST)
                self._tasks.append(asyncio.create_task(self._watch_local()))
            elif self._first_progress is not None:
                await self._first_sync(self._first_progress)
                self._tasks.append(asyncio.create_task(self._watch_local()))
            self._tasks.append(asyncio.create_task(self._pump_remote()))
            await self.follow()
        except (AgentError, ConnectionError) as exc:
            raise SessionError(f"lost the link to {self.cfg.remote.describe()}: {exc}") from None
        finally:
            await self.close()

    async def _resync(self, direction: str) -> None:
        """Rebuild one side before syncing live; a stop request interrupts it (the
        destination then stays as it was)."""
        self.resync_summary = await self._stream(direction, f"resync --{direction}")
        self._answer_resync(self.resync_summary)

    def _answer_resync(self, summary: ResyncSummary) -> None:
        """Tell whoever waits for the resync, once: as soon as the tree is in place
        (placed), or when the stream returns if it never said so."""
        answer, self.on_resync = self.on_resync, None
        if answer is not None:
            answer(summary)

    async def _first_sync(self, progress: ResyncProgress) -> None:
        """A first sync (no base yet) from a tree into an empty side (the remote, or the
        local root) sends that tree as one tar stream, which only adds: whatever appears
        on the destination meanwhile stays, for the cycles that follow to reconcile like
        any other change. Otherwise (both hold something or both are empty, or the stream
        fails) the cycles do it all."""
        self._first_progress = None
        direction = progress.direction
        if direction == "push":
            # Not waiting for the archiver to list the tree: the stream's second login
            # then overlaps the listing (see resync.push).
            go = (self.remote_empty and self._push_worker is not None
                  and not root_is_empty(self.cfg.local, self.rules.is_ignored))
        else:
            go = not self.remote_empty
        if go:
            self.resync_progress = progress
            try:
                summary = await self._stream(direction, "first sync", merge=True)
                arrow = "->" if direction == "push" else "<-"
                if direction == "push":
                    self.stats.sent_files += summary.files
                    self.stats.sent_bytes += summary.bytes
                else:
                    self.stats.received_files += summary.files
                    self.stats.received_bytes += summary.bytes
                self.report(f"{arrow} first sync: {summary.files} entries, {summary.bytes} bytes, as one stream "
                            f"in {summary.seconds:.2f}s")
                return
            except SessionError as exc:
                if self._stop.is_set():
                    # Stopped mid-stream. Before the placement began the destination is as it
                    # was and the next start streams again; after it, the next start finds
                    # both sides holding the tree and compares entry by entry.
                    return
                log.warning("%s: %s; syncing entry by entry instead", self.cfg.name, exc)
            finally:
                self.resync_progress = None
        await self._drop_prepared_streams()
        self._first_pull = False
        # The local scan runs first, as with any start: it reads the .gitignore files the
        # remote scan's results are filtered by.
        self._prescan = asyncio.ensure_future(self._scan_local_tree())

    def placed(self, summary: ResyncSummary) -> None:
        """The stream's tree is in place; what is left is recording it as the base. Whoever
        waits for a resync is answered now: a stop no longer interrupts it (see _stream),
        and should the process die before the base is written, the next start finds both
        sides alike and agrees on them (the old base stays whole until then)."""
        self._in_place = True
        if self.resync_progress is not None:
            self.resync_progress.phase = "recording"
        if self.resync is not None:
            self._answer_resync(summary)

    async def _stream(self, direction: str, what: str, merge: bool = False) -> ResyncSummary:
        """Run one tar stream (resync_push or resync_pull); a stop request interrupts it
        until its tree is in place."""
        self.state = f"resync-{direction}"
        self._in_place = False
        run = resync_push if direction == "push" else resync_pull
        work = asyncio.ensure_future(run(self, self.resync_force or merge, merge))
        stopping = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not work.done() and self._in_place:
            # Only the base is left to write: cut short, the next start would compare the
            # whole tree entry by entry instead.
            await asyncio.wait({work})
        if not work.done():
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
            raise SessionError(f"the {what} was interrupted; nothing was replaced")
        try:
            summary = work.result()
        except ResyncRefused as exc:
            raise SessionError(str(exc)) from None
        except (AgentError, ExtractError, OSError, ValueError) as exc:
            raise SessionError(f"{what} failed: {getattr(exc, 'strerror', None) or exc}") from None
        log.info("%s: %s: %d entries, %d bytes, %d deleted, %d skipped in %.2fs, %s", self.cfg.name, what,
                 summary.files, summary.bytes, summary.deleted, len(summary.skipped), summary.seconds,
                 "beside the session channel (direct)" if summary.direct else "over the session channel")
        # Changes seen meanwhile are mostly our own writes; a full scan of both sides
        # settles them and anything edited during the stream.
        if self.agent is not None:
            while not self.agent.changes.empty():
                self.agent.changes.get_nowait()
        if self._remote_prescan is not None:  # made before the stream: stale
            prescan, self._remote_prescan = self._remote_prescan, None
            prescan.cancel()
            await asyncio.gather(prescan, return_exceptions=True)
        self.local_dirty.clear()
        self.remote_dirty.clear()
        self.local_full = self.remote_full = True
        return summary

    async def reset_base(self, rows: list[Agreed]) -> None:
        """The base becomes exactly ``rows`` (after a resync); pending intents and failure
        counts belong to the old state. The index is written first, by the file-system
        thread: tens of thousands of rows take the better part of a second, and the event
        loop meanwhile serves the daemon's other sessions (nothing else of this one runs
        during a resync)."""
        store = self.store
        assert store is not None
        await self._fs(_replace_base, store, rows)
        keep = {row.path for row in rows}
        stale = [p for p in self.base if p not in keep] + [r.path for r in self.base.kept_rows() if r.path not in keep]
        for path in stale:
            self.base.discard(path)
        for row in rows:
            self.base.set(row)
        self._intents = []
        self._failures.clear()
        self.unhashed = len(self._unhashed_rows())  # filled once live (see follow)

    async def follow(self) -> None:
        next_rescan = time.monotonic() + self.cfg.rescan_interval
        # Filled once the first cycle is done (it is what a restart waits for); a row that
        # cycle changes is skipped by the fill.
        unhashed = self._unhashed_rows()
        self.unhashed = len(unhashed)
        while not self._stop.is_set():
            if self.local_full or self.remote_full or self.local_dirty or self.remote_dirty or self._recheck:
                self.idle.clear()
                await self.cycle()
                if unhashed:
                    self._tasks.append(asyncio.create_task(self._fill_digests(unhashed)))
                    unhashed = []
                continue
            self.state = "watching"
            self.idle.set()
            timeout = max(0.0, next_rescan - time.monotonic())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), timeout)
            self.wakeup.clear()
            if self.agent is not None and self.agent.error is not None:
                raise SessionError(f"lost the agent: {self.agent.error}")
            if time.monotonic() >= next_rescan:
                self.local_full = self.remote_full = True
                next_rescan = time.monotonic() + self.cfg.rescan_interval

    def _unhashed_rows(self) -> list[Agreed]:
        return [row for row in self.base.values() if row.kind == m.FILE and row.digest is None]

    async def _fill_digests(self, rows: list[Agreed]) -> None:
        """Hash the local files the base records without a digest, and record the digests.

        A resync's stream (and a first sync's) carries files unhashed both ways: hashing
        the gigabyte there would keep a core busy on the stream's path and put the tree in
        place later (a 50,000-file pull here: 6.6 s against 6.0 s). Until a file's digest
        is in, the base still tells a change from its stat; only a change of mtime alone
        then counts as new content, and a rename of that file travels as a copy. A file
        is hashed only if it is still the one recorded (size, mtime, inode, checked again
        after reading); one a cycle changed meanwhile is left to it. In slices, on the
        file-system thread, so a cycle's work waits for one slice at most; what a restart
        finds still unhashed is filled then."""
        started, filled = time.monotonic(), 0
        try:
            for i in range(0, len(rows), DIGEST_FILL_CHUNK):
                chunk = rows[i:i + DIGEST_FILL_CHUNK]
                digests = await self._fs(local_digests, self.cfg.local, chunk)
                updates: list[tuple[str, Agreed | None]] = []
                for row in chunk:
                    digest = digests.get(row.path)
                    if digest is not None and self.base.get(row.path) == row:  # no cycle changed it since
                        updates.append((row.path, row._replace(digest=digest)))
                self._commit(updates)
                filled += len(updates)
                self.unhashed -= len(chunk)
        except Exception as exc:  # the base stays right without them: a stat still tells a change
            log.warning("%s: stopped recording file digests after %d of %d: %s", self.cfg.name, filled,
                        len(rows), exc)
            return
        finally:
            self.unhashed = 0
        log.info("%s: recorded the digests of %d of %d files in %.2fs", self.cfg.name, filled, len(rows),
                 time.monotonic() - started)

    # -- watching -----------------------------------------------------------------------------

    def _on_local_batch(self, paths: set[str], overflow: bool) -> None:
        """Runs on the event loop: record a watcher batch and wake the cycle."""
        if overflow or "" in paths:
            self.local_full = True
        self.local_dirty.update(self._translate({p for p in paths if p and not is_temp_name(p)}))
        self.wakeup.set()

    async def _watch_local(self) -> None:
        """watchfiles first (it falls back to our inotify watcher on names that are not
        UTF-8 or when the watch limit is reached, with a warning naming the sysctl)."""
        loop = asyncio.get_running_loop()

        def on_batch(paths: set[str], overflow: bool) -> None:
            loop.call_soon_threadsafe(self._on_local_batch, set(paths), overflow)

        def ignored(rel: str, is_dir: bool) -> bool:
            return is_temp_name(rel) or self.rules.is_ignored(rel, is_dir)

        starting = asyncio.ensure_future(asyncio.to_thread(
            start_watcher, self.cfg.local, on_batch, ignored, "watchfiles", 10
        ))
        try:
            watcher = await asyncio.shield(starting)
        except asyncio.CancelledError:
            # Cancelled while it started (the connection failed, the session closed): it
            # must not outlive us, however late its start completes.
            starting.add_done_callback(_stop_started)
            raise
        finally:
            self._local_armed.set()
        try:
            await self._stop.wait()
        finally:
            # Told here and now: the join needs a pool thread, and a job still queued for
            # one never runs once this task is cancelled (close() cancels it). A watcher
            # left running kept its thread and, through on_batch, the whole session.
            watcher.stop(wait=False)
            await asyncio.to_thread(watcher.stop)

    async def _pump_remote(self) -> None:
        assert self.agent is not None
        while True:
            changes = await self.agent.changes.get()
            if changes.overflow:
                self.remote_full = True
            self.remote_dirty.update(self._translate({p for p in changes.paths if p and not is_temp_name(p)}))
            if "" in changes.paths:
                self.remote_full = True
            self.wakeup.set()

    # -- observing -----------------------------------------------------------------------------

    def _ignored(self, path: str, kind: int) -> bool:
        return self.rules.is_ignored(path, kind == m.DIR)

    def _observe(self, entries: list[m.Entry], absent: list[str], full: bool, filtered: bool = False,
                 matched: set[str] | None = None, unlisted: Iterable[str] = ()) -> Observed:
        """Scan results as an observation. ``filtered``: already passed through our rules
        (the local scanner); the remote's answer is checked against local rules too.
        ``matched``: directories a tree scan found unchanged; their children are left out
        of the observation, so the engine takes them to hold their base state (as they do)."""
        observed: Observed = {}
        if filtered:
            observed = {entry.path: entry for entry in entries}
        else:
            for entry in entries:
                if not self._ignored(entry.path, entry.kind):
                    observed[entry.path] = entry
        for path in absent:
            observed[path] = None
        if full:
            self._absent_unless_found(observed, self.base, matched)
        unknown = set(unlisted)
        if unknown:
            # Directories the walk could not list: what is under them is unknown, not gone,
            # so the base stands for it (like under a directory a tree scan matched).
            for path in [p for p, e in observed.items() if e is None and ("" in unknown or is_under(p, unknown))]:
                del observed[path]
        return observed

    @staticmethod
    def _drop_unreadable(observed: Observed) -> Observed:
        """The local scanner hashes every file it lists, so a file without a digest is one
        it could not read: what it holds is unknown, and the base stands for it (it is
        not a deletion) until it can be read. The remote's are dropped the same way once
        the agent fails to hash them (see _observe_remote)."""
        for path in [p for p, e in observed.items() if e is not None and e.kind == m.FILE and e.digest is None]:
            del observed[path]
        return observed

    def _absent_unless_found(self, observed: Observed, paths: Iterable[str], matched: set[str] | None = None) -> None:
        """After a full scan: the tracked ``paths`` it did not find are absent, except those
        in a directory found unchanged (``matched``: not listed) and those now ignored
        (forgotten here: neither sent nor deleted)."""
        forget = []
        for path in paths:
            if path in observed or (matched and parent_of(path) in matched):
                continue
            agreed = self.base.get(path)
            if agreed is None:
                continue
            if self._ignored(path, agreed.kind):
                forget.append(path)
            else:
                observed[path] = None
        if forget:
            self._commit([(p, None) for p in forget])

    def _sweep_kept(self, observed: Observed, matched: set[str]) -> None:
        """After a full local scan: local-only paths it did not find are gone (decided by
        reconcile) or newly ignored (forgotten here, like tracked ones). Those in a
        directory found unchanged (``matched``) were not listed: they are still there."""
        forget = []
        for row in self.base.kept_rows():
            if row.path in observed or parent_of(row.path) in matched:
                continue
            if self._ignored(row.path, row.kind):
                forget.append(row.path)
            else:
                observed[row.path] = None
        if forget:
            self._commit([(p, None) for p in forget])

    def _park_unknown(self, asked: set[str], observed: Observed) -> None:
        """Paths asked about whose state the scan could not read (e.g. below a directory
        that cannot be searched: neither found nor absent) are looked at again at each
        later cycle until they can be. The event that ends it, a chmod of that directory,
        names only the directory, so without this they would wait for a full rescan."""
        unknown = [p for p in asked if p not in observed and not self._ignored(p, m.FILE)
                   and not self._ignored(p, m.DIR)]
        self._parked.update(unknown[:MAX_PARKED_UNKNOWN])

    def _split_dirty(self, dirty: set[str]) -> tuple[list[str], list[str]]:
        """Known directories need only a stat; anything else is walked if a directory."""
        shallow: list[str] = []
        deep: list[str] = []
        walk = self._walk_next
        for path in dirty:
            agreed = self.base.get(path)
            known_dir = agreed is not None and agreed.kind == m.DIR and path not in walk
            (shallow if known_dir else deep).append(path)
        return shallow, deep

    def _has_row(self, side: em.Side, path: str) -> bool:
        return path in self.base or (side == "local" and self.base.kept(path) is not None)

    def _unconfirmed(self, side: em.Side, observed: Observed, full: bool, reported: set[str]) -> set[str]:
        """Tracked paths seen absent on ``side`` although ``side`` reported neither them nor
        a directory above them (now or in an earlier cycle while their rows stayed), and was
        not scanned in full: they were looked at because the other side reported them, or
        to retry an operation. Such an absence may be a directory move on ``side`` whose
        events (which tell a move from a deletion) are still on their way. ``reported``:
        what ``side`` reported, translated across the moves just made (see _translate)."""
        gone = self._seen_gone[side]
        sure = reported | gone
        doubtful = set()
        for path, entry in observed.items():
            if entry is not None:
                gone.discard(path)
            elif not self._has_row(side, path):
                continue  # absent as agreed: nothing to doubt
            elif full or is_under(path, sure):
                gone.add(path)
            else:
                doubtful.add(path)
        return doubtful

    def _hold_departures(self, side: em.Side, observed: Observed, full: bool, reported: set[str]) -> None:
        """Take out of this cycle the tracked paths ``side`` reported gone that no move
        explains, and look at them again after MOVE_GRACE. A rename reaches the watcher as
        a departure and an arrival, and the two can fall into successive batches (the
        batch closes after a short quiet step, which a loaded machine can stretch between
        the two): deleted now, the old name would be a deletion on the other side and the
        new one a transfer of everything it holds. Held once: the next cycle deletes what
        is still gone and unexplained. A full scan saw both names; it holds nothing.
        ``reported`` as for _unconfirmed."""
        held_before, self._held[side] = self._held[side], set()
        if full or not self.base:
            return
        tops = {path for path, entry in observed.items()
                if entry is None and path in self.base and not is_under(path, held_before)
                and is_under(path, reported)}
        tops = {path for path in tops if not is_under(parent_of(path), tops)}
        if not tops:
            return
        for path in [p for p in observed if is_under(p, tops)]:
            del observed[path]
        self._held[side] = tops
        (self.local_dirty if side == "local" else self.remote_dirty).update(tops)
        self._hold_until = time.monotonic() + MOVE_GRACE

    def _translate(self, paths: set[str]) -> set[str]:
        """Events can name a path under a directory this session just moved (they were
        queued before the move): look at the new name too."""
        if not self._recent_moves:
            return paths
        now = time.monotonic()
        self._recent_moves = [mv for mv in self._recent_moves if now - mv[2] < MOVE_WINDOW]
        extra = set()
        for old, new, _ in self._recent_moves:
            for path in paths:
                if path.startswith(old + "/"):
                    extra.add(new + path[len(old):])
        return paths | extra

    async def _observe_local(self, full: bool, dirty: set[str]) -> Observed:
        local = self.local
        assert local is not None
        # Watch before scanning, so nothing changed during the first scan is missed.
        await self._local_armed.wait()
        for path in dirty:
            if is_ignore_file(path):
                local.reload_ignore_file(path)
        if full:
            if not os.path.isdir(self.cfg.local):
                raise Halted(f"the local root {self.cfg.local} vanished; nothing was propagated")
            if self._intents:  # adopting them needs every path seen
                entries = await asyncio.to_thread(local.scanner.scan_all)
                observed = self._observe(entries, [], True, filtered=True, unlisted=local.scanner.unlisted)
                self._sweep_kept(observed, set())
                return self._drop_unreadable(observed)
            if self._prescan is not None:
                # Scanned while the agent started. What changed since it began came as
                # events: look at those paths again next cycle.
                prescan, self._prescan = self._prescan, None
                entries, matched = await prescan
                self.local_dirty |= dirty
            else:
                entries, matched = await asyncio.to_thread(local.scanner.scan_tree, self._prints["local"])
            self._matched["local"] = matched
            observed = self._observe(entries, [], True, filtered=True, matched=matched)
            self._sweep_kept(observed, matched)
            return self._drop_unreadable(observed)
        shallow, deep = self._split_dirty(dirty)

        def scan() -> tuple[list[m.Entry], list[str], list[str]]:
            e1, a1 = local.scanner.scan_paths(shallow, recursive=False)
            unlisted = list(local.scanner.unlisted)
            replaced = self._replaced_dirs(e1, "local")
            e2, a2 = local.scanner.scan_paths(deep + replaced, recursive=True)
            unlisted += local.scanner.unlisted
            e1 = [e for e in e1 if e.path not in replaced]
            walked = replaced + [p for p in deep if p in self._walk_next]
            return e1 + e2, a1 + a2 + self._vanished_under(walked, e2), unlisted

        entries, absent, unlisted = await asyncio.to_thread(scan)
        return self._drop_unreadable(self._observe(entries, absent, False, unlisted=unlisted))

    def _replaced_dirs(self, entries: list[m.Entry], side: em.Side) -> list[str]:
        """Known directories whose inode changed: replaced (e.g. renamed away and made
        again), so their contents must be walked, not assumed."""
        out = []
        for entry in entries:
            agreed = self.base.get(entry.path)
            if (entry.kind == m.DIR and agreed is not None and agreed.kind == m.DIR
                    and agreed.ino(side) and entry.ino != agreed.ino(side)):
                out.append(entry.path)
        return out

    def _vanished_under(self, dirs: list[str], found: list[m.Entry]) -> list[str]:
        """Base paths under walked directories that the walk did not find."""
        seen = {e.path for e in found}
        return [p for d in dirs for p in self.base.under(d) if p not in seen]

    async def _observe_remote(self, full: bool, dirty: set[str]) -> Observed:
        agent = self.agent
        assert agent is not None
        matched: set[str] | None = None
        unlisted: list[str] = []
        tree_scan = None
        if full and self._remote_prescan is not None:
            prescan, self._remote_prescan = self._remote_prescan, None
            tree_scan = await prescan
            # What changed since it began came as events: look at those paths again.
            self.remote_dirty |= dirty
        elif full and not self._intents and agent.supports("scan-tree"):
            tree_scan = await agent.scan_tree(self._prints["remote"])
        if tree_scan is not None:
            entries, matched = tree_scan
            absent: list[str] = []
            self._matched["remote"] = matched
        elif full:
            entries, absent, unlisted = await agent.scan(None)
        else:
            shallow, deep = self._split_dirty(dirty)
            entries, absent, unlisted = await agent.scan(shallow, recursive=False) if shallow else ([], [], [])
            replaced = self._replaced_dirs(entries, "remote")
            if replaced:
                entries = [e for e in entries if e.path not in replaced]
            if deep or replaced:
                more, gone, unlisted_below = await agent.scan(deep + replaced, recursive=True)
                entries += more
                unlisted += unlisted_below
                walked = replaced + [p for p in deep if p in self._walk_next]
                absent += gone + self._vanished_under(walked, more)
        observed = self._observe(entries, absent, full, matched=matched, unlisted=unlisted)
        missing = needs_digest(self.base, observed, "remote")
        if missing:
            hashed, vanished = await agent.hash(missing)
            for entry in hashed:
                observed[entry.path] = entry
            for path in vanished:
                observed[path] = None
            for path in missing:
                current = observed.get(path)
                if current is not None and current.digest is None:
                    observed.pop(path)  # unreadable: leave it for a later cycle
        return observed

    # -- a cycle -------------------------------------------------------------------------------

    async def flush(self) -> None:
        """A barrier: return once everything changed on either side before the call has
        been applied to the other side and recorded. Both sides are rescanned (watchers
        are only hints), then follow-up work is drained."""
        target = self.started_cycles + 1
        self.local_full = self.remote_full = True
        self.wakeup.set()
        while True:
            if self.agent is not None and self.agent.error is not None:
                raise SessionError(f"lost the agent: {self.agent.error}")
            if (self.finished_cycles >= target and self.idle.is_set() and not self.local_dirty
                    and not self.remote_dirty and not self._recheck and not self.local_full
                    and not self.remote_full):
                return
            if self._stop.is_set():
                raise SessionError("the session stopped")
            await asyncio.sleep(0.01)

    def pending(self) -> tuple[int, int]:
        return len(self.local_dirty | self._recheck), len(self.remote_dirty | self._recheck)

    async def cycle(self) -> None:
        pause = self._hold_until - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)  # the other half of a held rename may be on its way
        self.started_cycles += 1
        if self.local_full and self.remote_full:
            self._failures.clear()  # a full rescan gives every path a fresh chance
        self.state = "scanning"
        local_full, remote_full = self.local_full, self.remote_full
        local_dirty, remote_dirty = self.local_dirty, self.remote_dirty
        self.local_full = self.remote_full = False
        self.local_dirty, self.remote_dirty = set(), set()
        reported: dict[em.Side, set[str]] = {"local": set(local_dirty), "remote": set(remote_dirty)}
        recheck = self._recheck | self._parked
        self._recheck, self._parked = set(), set()
        if not local_full:
            local_dirty |= remote_dirty | recheck  # look at both sides of every path
        if not remote_full:
            remote_dirty |= local_dirty | recheck
        t0 = time.perf_counter()
        self._matched = {"local": set(), "remote": set()}
        if not self._intents and self._prescan is None:
            # In a thread, so the loop keeps serving events; nothing else changes the base
            # while a cycle runs.
            sides = tuple(side for side, full in zip(em.SIDES, (local_full, remote_full)) if full)
            if sides:
                self._prints.update(await asyncio.to_thread(sides_prints, self.base, sides))
        rules_seen = self.rules.generation
        local, remote = await asyncio.gather(
            self._observe_local(local_full, local_dirty),
            self._observe_remote(remote_full, remote_dirty),
        )
        if self.rules.generation != rules_seen:
            # The local scan read .gitignore files while the remote's answer was being
            # observed: what they ignore is not the remote's to send either.
            for path in [p for p, e in remote.items() if e is not None and self._ignored(p, e.kind)]:
                del remote[path]
        t1 = time.perf_counter()
        if not local_full:
            self._park_unknown(local_dirty, local)
        if not remote_full:
            self._park_unknown(remote_dirty, remote)
        self._walk_next.clear()  # both sides were walked where asked
        if self._intents and local_full and remote_full:
            # The last run was cut before these operations were confirmed: adopt those
            # that landed, so they are not mistaken for edits made on their side.
            adopted = adopt(self.base, self._intents, local, remote)
            if adopted:
                log.info("%s: adopted %d operations confirmed after a cut", self.cfg.name, len(adopted))
            self._commit(adopted)
            # Both scans listed every path, but absences were only noted for rows the base
            # had then: a path adopted now and missing on a side went since the operation
            # landed (e.g. deleted at its source), which is a change to propagate.
            now_tracked = [path for path, row in adopted if row is not None]
            self._absent_unless_found(local, now_tracked)
            self._absent_unless_found(remote, now_tracked)
            self._intents = []
            assert self.store is not None
            clear_intents(self.store)
        self._check_roots(local, remote, local_full, remote_full)
        moves = detect_moves(self.base, local, remote)
        if moves:
            await self._apply_moves(moves, local, remote)
        # Events named under a directory moved just now count for its new name too.
        sure = {side: self._translate(reported[side]) for side in em.SIDES}
        self._hold_departures("local", local, local_full, sure["local"])
        self._hold_departures("remote", remote, remote_full, sure["remote"])
        unconfirmed: dict[em.Side, set[str]] = {
            "local": self._unconfirmed("local", local, local_full, sure["local"]),
            "remote": self._unconfirmed("remote", remote, remote_full, sure["remote"]),
        }
        plan = reconcile(self.base, local, remote, self._policy(), unconfirmed)
        self._check_deletions(plan)
        await self._check_not_emptied(plan)
        t2 = time.perf_counter()
        self.state = "syncing"
        self._parked.update(plan.deferred)
        await self.execute(plan)
        for side in em.SIDES:
            self._seen_gone[side] = {p for p in self._seen_gone[side] if self._has_row(side, p)}
        if plan.actions:
            log.info("%s: cycle %d applied %d changes (%s)", self.cfg.name, self.started_cycles,
                     len(plan.actions), self.stats.summary())
        log.debug("%s: cycle %d: observed %d local%s, %d remote%s in %.3fs, planned %d actions in %.3fs, "
                  "applied in %.3fs", self.cfg.name, self.started_cycles, len(local), " (full)" * local_full,
                  len(remote), " (full)" * remote_full, t1 - t0, len(plan.actions), t2 - t1,
                  time.perf_counter() - t2)
        self.force_next = False
        self.finished_cycles += 1
        self.stats.cycles += 1
        self.stats.last_cycle = time.time()

    def _fs(self, func: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run an operation on the local root. One worker thread, so the root's cached
        directory descriptors are never used and released concurrently."""
        return asyncio.get_running_loop().run_in_executor(self._fs_pool, func, *args)

    def _policy(self) -> Policy:
        return Policy(self.cfg.mode, self.cfg.winner, self.rules.is_preserved, _stamp())

    def _check_roots(self, local: Observed, remote: Observed, local_full: bool, remote_full: bool) -> None:
        if not self.base or self.force_next:
            return
        for side, observed, full in (("local", local, local_full), ("remote", remote, remote_full)):
            # A directory found unchanged has children (only those get a fingerprint).
            if full and not self._matched[side] and not any(e is not None for e in observed.values()):
                raise Halted(
                    f"the {side} root is empty while {len(self.base)} entries are tracked; "
                    "refusing to propagate the loss (resync or resume with --force)"
                )

    def _check_deletions(self, plan: Plan) -> None:
        if self.force_next:
            return
        tracked = len(self.base)
        # A row becoming a local-only marker leaves the tracked set like a forgotten one.
        forgotten = sum(1 for path, row in plan.records.items()
                        if (row is None or row.local_only) and path in self.base)
        for side in em.SIDES:
            count = plan.deletions(side)
            if count > self.cfg.max_delete_min and count > self.cfg.max_delete_ratio * tracked:
                raise Halted(
                    f"this cycle would delete {count} of {tracked} tracked entries on the {side} side; "
                    "halted without changing anything (resync or resume with --force)"
                )
            gone = sum(1 for a in plan.actions if a.side == side and a.kind == em.DELETE and a.path in self.base)
            if gone and tracked > 1 and gone + forgotten >= tracked:
                # Everything would go: the other root was emptied (or vanished), whatever
                # the size of the tree. Live events reach here without a full scan.
                raise Halted(
                    f"the {em.other(side)} root is empty ({tracked} tracked entries gone); "
                    "refusing to propagate the loss (resync or resume with --force)"
                )

    async def _check_not_emptied(self, plan: Plan) -> None:
        """Before deleting on one side what the other deleted, make sure the other root
        still holds something: a root emptied by a stream of live events is a halt, not
        a thousand small deletions."""
        if self.force_next or not self.base:
            return
        top = [p for p in self.base if "/" not in p]
        for side in em.SIDES:
            if not any(a.side == side and a.kind == em.DELETE for a in plan.actions):
                continue
            origin = em.other(side)
            if origin == "local":
                local = self.local
                assert local is not None
                entries, _ = await asyncio.to_thread(local.scanner.scan_paths, top, False, False)
            else:
                assert self.agent is not None
                entries, _, _ = await self.agent.scan(top, recursive=False)
            if not entries:
                raise Halted(
                    f"the {origin} root is empty ({len(self.base)} tracked entries gone); "
                    "refusing to propagate the loss (resync or resume with --force)"
                )

    async def _apply_moves(self, moves: list[Action], local: Observed, remote: Observed) -> None:
        assert self.store is not None
        record_intents(self.store, [Intent(mv.side, mv.path, None, mv.dest) for mv in moves])
        for move in moves:
            op = m.Rename(move.path, move.dest, _expect(move.current))
            if move.side == "remote":
                assert self.agent is not None
                (result,) = await self.agent.apply([op])
            else:
                assert self.local is not None
                result = await self._fs(self.local.root.apply, op)
                await self._fs(self.local.root.release)
            if result.status != m.OK:
                log.info("%s: rename %s -> %s on %s skipped: %s", self.cfg.name, move.path, move.dest,
                         move.side, result.message)
                continue
            self.report(f"{'->' if move.side == 'remote' else '<-'} {move.side:6} move   {move.path} -> {move.dest}")
            changed = [move.path, *self.base.under(move.path), *self.base.kept_under(move.path)]
            rekey(self.base, move.path, move.dest)
            # What either side changed inside it around the move may have been reported
            # under the old name: walk the new one next cycle, on both sides.
            self._recent_moves.append((move.path, move.dest, time.monotonic()))
            self.local_dirty = self._translate(self.local_dirty)
            self.remote_dirty = self._translate(self.remote_dirty)
            self._recheck = self._translate(self._recheck)
            for side in em.SIDES:  # what a side was seen to lack moved along too
                self._seen_gone[side] = self._translate(self._seen_gone[side])
            self._walk_next.add(move.dest)
            self.local_dirty.add(move.dest)
            self.remote_dirty.add(move.dest)
            updates: list[tuple[str, Agreed | None]] = [(p, None) for p in changed]
            updates += [(p, self.base.get(p) or self.base.kept(p))
                        for p in [move.dest, *self.base.under(move.dest), *self.base.kept_under(move.dest)]]
            self._commit(updates)
            # The side that replayed the move was observed before it: what it held under the
            # old name (changes inside included) now lives under the new one.
            seen = local if move.side == "local" else remote
            carried: Observed = {}
            for path in list(seen):
                if path == move.dest or path.startswith(move.dest + "/"):
                    del seen[path]
                elif path == move.path or path.startswith(move.path + "/"):
                    entry = seen.pop(path)
                    moved = move.dest + path[len(move.path):]
                    carried[moved] = None if entry is None else entry._replace(path=moved)
            seen.update(carried)
        assert self.store is not None
        clear_intents(self.store)

    def _commit(self, updates: list[tuple[str, Agreed | None]]) -> None:
        if not updates:
            return
        for path, agreed in updates:
            if agreed is None:
                self.base.discard(path)
            else:
                self.base.set(agreed)
        assert self.store is not None
        self.store.commit(updates)

    # -- executing a plan ----------------------------------------------------------------------

    async def execute(self, plan: Plan) -> None:
        if plan.records:
            self._commit(list(plan.records.items()))
        if plan.conflicts:
            assert self.store is not None
            add_conflicts(self.store, plan.conflicts)
        for conflict in plan.conflicts:
            self.stats.conflicts.append(conflict)
            if conflict.loser_copy:
                self.report(f"!! conflict {conflict.path}: {conflict.winner} wins, "
                            f"other version kept as {conflict.loser_copy}")
            else:
                self.report(f"!! conflict {conflict.path}: {conflict.winner} wins, other version replaced "
                            "(inside .git: no conflict copy)")
        remote_actions = [a for a in plan.actions if a.side == "remote"]
        local_actions = [a for a in plan.actions if a.side == "local"]
        assert self.store is not None and self.local is not None
        record_intents(self.store, self._intents_for(plan.actions))
        # Directory descriptors cached by an earlier cycle may name renamed directories.
        await self._fs(self.local.root.release)
        asides = [a for a in plan.actions if a.kind == em.ASIDE]
        if asides:
            # Conflict copies first: a loser that could not be kept aside is not overwritten.
            await asyncio.gather(self._run_remote([a for a in asides if a.side == "remote"]),
                                 self._run_local([a for a in asides if a.side == "local"]))
            # A copy kept aside marks its new name dirty (see _settle); a failed one did not.
            failed = {(a.side, a.path) for a in asides
                      if a.dest not in (self.remote_dirty if a.side == "remote" else self.local_dirty)}
            remote_actions = [a for a in remote_actions if a.kind != em.ASIDE and ("remote", a.path) not in failed]
            local_actions = [a for a in local_actions if a.kind != em.ASIDE and ("local", a.path) not in failed]
        await asyncio.gather(self._run_remote(remote_actions), self._run_local(local_actions))
        if plan.actions and self.store is not None:
            clear_intents(self.store)

    def _intents_for(self, actions: list[Action]) -> list[Intent]:
        out = []
        for action in actions:
            if action.kind == em.DELETE:
                out.append(Intent(action.side, action.path, None))
            elif action.kind in (em.COPY, em.META_ONLY) and action.source is not None:
                source = action.source
                # The side being written gets its inode number when adopted.
                inos = (0, source.ino) if action.side == "local" else (source.ino, 0)
                out.append(Intent(action.side, action.path, em.agreed_from(source, *inos)))
        return out

    def _record(self, action: Action, source: m.Entry, written: m.Entry | None) -> tuple[str, Agreed]:
        ino = written.ino if written is not None else 0
        if action.side == "remote":
            return action.path, em.agreed_from(source, source.ino, ino)
        return action.path, em.agreed_from(source, ino, source.ino)

    def _settle(self, action: Action, result: m.OpResult, source: m.Entry | None,
                updates: list[tuple[str, Agreed | None]]) -> None:
        """Turn one operation's result into base updates, retries and messages."""
        arrow = "->" if action.side == "remote" else "<-"
        if result.status == m.OK:
            self._failures.pop(action.path, None)
            if action.kind == em.DELETE:
                updates.append((action.path, None))
                self.stats.deleted += 1
                self.report(f"{arrow} {action.side:6} delete {action.path}")
            elif action.kind == em.ASIDE:
                (self.remote_dirty if action.side == "remote" else self.local_dirty).add(action.dest)
                self.report(f"{arrow} {action.side:6} keep   {action.path} as {action.dest}")
            elif source is not None:
                updates.append(self._record(action, source, result.entry))
                size = source.size if source.kind == m.FILE and action.kind == em.COPY else 0
                if action.side == "remote":
                    self.stats.sent_files += 1
                    self.stats.sent_bytes += size
                else:
                    self.stats.received_files += 1
                    self.stats.received_bytes += size
                what = {m.DIR: "mkdir ", m.SYMLINK: "link  "}.get(source.kind, "put   ")
                if action.kind == em.META_ONLY:
                    what = "meta  "
                self.report(f"{arrow} {action.side:6} {what} {action.path}"
                            + (f" ({size} bytes)" if size else ""))
            return
        # Nothing was done. CHANGED: the side moved on since the scan; look again, with
        # its parents (a missing parent is the usual cause) - but a path that keeps failing
        # waits for the next full rescan instead of spinning.
        if result.status == m.CHANGED:
            failures = 1  # a race with a writer, not a failure: always look again
        else:
            failures = self._failures[action.path] = self._failures.get(action.path, 0) + 1
        not_empty = "not empty" in result.message.lower()
        if not not_empty and failures <= RETRIES:
            self._recheck.update([action.path, *ancestors(action.path)])
        elif failures == RETRIES + 1:
            log.warning("%s: %s on %s keeps failing (%s); retrying at the next full rescan",
                        self.cfg.name, action.path, action.side, result.message)
        if failures > RETRIES + 1:
            return  # already reported
        if result.status == m.CHANGED:
            log.debug("%s: %s %s on %s deferred: %s", self.cfg.name, action.kind, action.path,
                      action.side, result.message)
            return
        if action.kind == em.DELETE and not_empty:
            return  # holds ignored or preserved entries: it stays, and so does its base row
        message = f"{action.kind} {action.path} on {action.side}: {result.status}: {result.message}"
        self.stats.errors = (self.stats.errors + [message])[-50:]
        log.warning("%s: %s", self.cfg.name, message)
        self.report(f"!! {message}")

    def _ops_for(self, action: Action) -> list[m.Op]:
        """Operations for every action but file copies (which need content)."""
        expect = _expect(action.current)
        current = action.current
        if action.kind == em.DELETE:
            return [m.Remove(action.path, expect)]
        if action.kind == em.ASIDE:
            if current is not None and current.kind == m.DIR:
                return [m.Rename(action.path, action.dest, expect)]
            return [m.CopyAside(action.path, action.dest, expect)]
        source = action.source
        assert source is not None
        if action.kind == em.META_ONLY:
            return [m.SetMeta(action.path, source.mode, source.mtime_ns if source.kind == m.FILE else 0, expect)]
        ops: list[m.Op] = []
        if current is not None and current.kind != source.kind:
            ops.append(m.Remove(action.path, expect))  # a type change: clear the way first
            expect = m.Expect(m.ABSENT)
        if source.kind == m.DIR:
            ops.append(m.MakeDir(action.path, source.mode, None))
        elif source.kind == m.SYMLINK:
            ops.append(m.MakeLink(action.path, source.target or "", expect))
        return ops

    async def _run_remote(self, actions: list[Action]) -> None:
        if not actions:
            return
        agent = self.agent
        local = self.local
        assert agent is not None and local is not None
        pending: list[tuple[asyncio.Future[tuple[m.OpResult, ...]], list[tuple[Action, m.Entry | None, bool]]]] = []
        ops: list[m.Op] = []
        owners: list[tuple[Action, m.Entry | None, bool]] = []  # (action, source, counts)
        size = 0
        updates: list[tuple[str, Agreed | None]] = []

        def flush() -> None:
            nonlocal ops, owners, size
            if ops:
                pending.append((agent.submit_apply(ops), owners))
            ops, owners, size = [], [], 0

        async def drain_some() -> None:
            # Keep the pipeline full without letting unacknowledged batches pile up.
            while len(pending) > 8:
                task, batch_owners = pending.pop(0)
                self._settle_batch(await task, batch_owners, updates)

        def small(action: Action) -> bool:
            source = action.source
            return (action.kind == em.COPY and source is not None and source.kind == m.FILE
                    and source.size <= INLINE_MAX)

        # Small files are read ahead in groups: one thread hop per group, not per file.
        contents: dict[int, tuple[bytes, m.Entry] | str] = {}

        async def read_ahead(start: int) -> None:
            group: list[int] = []
            budget = 0
            for index in range(start, len(actions)):
                action = actions[index]
                if not small(action):
                    continue
                assert action.source is not None
                group.append(index)
                budget += action.source.size
                if budget >= BATCH_BYTES or len(group) >= 512:
                    break
            read = await self._fs(lambda: [local.read_small(actions[i].path) for i in group])
            contents.update(zip(group, read, strict=True))

        for index, action in enumerate(actions):
            source = action.source
            if action.kind == em.COPY and source is not None and source.kind == m.FILE:
                expect = _expect(action.current)
                if action.current is not None and action.current.kind != m.FILE:
                    ops.append(m.Remove(action.path, expect))
                    owners.append((action, None, False))
                    expect = m.Expect(m.ABSENT)
                if source.size <= INLINE_MAX:
                    if index not in contents:
                        await read_ahead(index)
                    read = contents.pop(index)
                    if isinstance(read, str):
                        self.local_dirty.add(action.path)
                        continue
                    data, actual = read
                    ops.append(m.PutFile(action.path, data, actual.mode, actual.mtime_ns, expect))
                    owners.append((action, actual, True))
                    size += len(data)
                else:
                    flush()  # the directory this file goes into must be made first
                    actual_or_none = await self._stream_blob(action.path)
                    blob_id, actual_entry = actual_or_none
                    if actual_entry is None:
                        ops.append(m.DropBlob(action.path, blob_id))
                        owners.append((action, None, False))
                        self.local_dirty.add(action.path)
                    else:
                        ops.append(m.PutBlob(action.path, blob_id, actual_entry.mode, actual_entry.mtime_ns, expect))
                        owners.append((action, actual_entry, True))
                    size += BLOB_CHUNK
            else:
                for op in self._ops_for(action):
                    ops.append(op)
                    owners.append((action, source, True))
            if size >= BATCH_BYTES or len(ops) >= BATCH_OPS:
                flush()
                await agent.drain()
                await drain_some()
        flush()
        for task, batch_owners in pending:
            self._settle_batch(await task, batch_owners, updates)
        self._commit(updates)

    def _settle_batch(self, results: tuple[m.OpResult, ...],
                      owners: list[tuple[Action, m.Entry | None, bool]],
                      updates: list[tuple[str, Agreed | None]]) -> None:
        for result, (action, source, counts) in zip(results, owners, strict=True):
            if not counts:
                if result.status != m.OK:
                    self._settle(action, result, None, updates)
                continue
            self._settle(action, result, source, updates)

    async def _stream_blob(self, rel: str) -> tuple[int, m.Entry | None]:
        """Send a large local file as BlobStart/BlobData; return its id and the entry read."""
        agent = self.agent
        local = self.local
        assert agent is not None and local is not None
        blob_id = agent.new_blob_id()
        agent.send(m.BlobStart(blob_id, rel, 0))
        chunks = read_file(local.root, rel)
        while True:
            item = await self._fs(next, chunks, None)
            if item is None:
                return blob_id, None
            data, entry, error = item
            if error:
                return blob_id, None
            if entry is not None:
                return blob_id, entry
            agent.send(m.BlobData(blob_id, data))
            await agent.drain()

    async def _run_local(self, actions: list[Action]) -> None:
        if not actions:
            return
        local = self.local
        assert local is not None
        updates: list[tuple[str, Agreed | None]] = []
        fetches: dict[str, asyncio.Task[tuple[int, m.Entry | None, str]]] = {}
        sem = asyncio.Semaphore(FETCH_PARALLEL)

        def start_fetches(start: int) -> None:
            # Actions are ordered: by the first file copy, every directory is made, so the
            # downloads (which stage beside their destination) can all start together.
            for later in actions[start:]:
                src = later.source
                if later.kind == em.COPY and src is not None and src.kind == m.FILE:
                    fetches[later.path] = asyncio.create_task(self._fetch(later.path, sem))

        started = False
        try:
            for index, action in enumerate(actions):
                source = action.source
                if action.kind == em.COPY and source is not None and source.kind == m.FILE:
                    if not started:
                        start_fetches(index)
                        started = True
                    blob_id, actual, error = await fetches.pop(action.path)
                    expect = _expect(action.current)
                    ops: list[m.Op] = []
                    if action.current is not None and action.current.kind != m.FILE:
                        ops.append(m.Remove(action.path, expect))
                        expect = m.Expect(m.ABSENT)
                    if actual is None:
                        await self._fs(local.root.drop_blob, blob_id)
                        self.remote_dirty.add(action.path)
                        self.local_dirty.add(action.path)
                        if error:
                            log.info("%s: fetch %s: %s", self.cfg.name, action.path, error)
                        continue
                    ops.append(m.PutBlob(action.path, blob_id, actual.mode, actual.mtime_ns, expect))
                    results = await self._fs(self._apply_local, ops)
                    self._settle(action, results[-1], actual, updates)
                else:
                    ops = self._ops_for(action)
                    results = await self._fs(self._apply_local, ops)
                    for result in results:
                        self._settle(action, result, source, updates)
                        if result.status != m.OK:
                            break
        finally:
            for task in fetches.values():
                task.cancel()
            await asyncio.gather(*fetches.values(), return_exceptions=True)
            self._commit(updates)

    def _apply_local(self, ops: list[m.Op]) -> list[m.OpResult]:
        assert self.local is not None
        out = []
        for index, op in enumerate(ops):
            result = self.local.root.apply(op)
            out.append(result)
            if result.status != m.OK:
                for skipped in ops[index + 1 :]:
                    if isinstance(skipped, m.PutBlob):
                        self.local.root.drop_blob(skipped.blob)  # its temp file must not linger
                break
        self.local.root.release()
        return out

    async def _fetch(self, rel: str, sem: asyncio.Semaphore) -> tuple[int, m.Entry | None, str]:
        """Download a remote file into a local temp file beside its destination."""
        agent = self.agent
        local = self.local
        assert agent is not None and local is not None
        blob_id = agent.new_blob_id()
        async with sem:
            await self._fs(local.root.start_blob, blob_id, rel)
            async for part in agent.fetch(rel):
                if part.error:
                    return blob_id, None, part.error
                if part.data:
                    await self._fs(local.root.blob_data, blob_id, part.data)
                if part.entry is not None:
                    return blob_id, part.entry, ""
        return blob_id, None, "no data"


__all__ = ["Session", "SessionError", "Halted"]
