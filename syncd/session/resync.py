"""Full resyncs: rebuild one side from the other as one tar stream, then reset the base.

``--push``: the local tree streams to the agent, which stages it on the remote root's
filesystem and mirrors it in, keeping ignored entries. ``--pull``: the agent streams the
remote tree; it is staged inside the local root and mirrored in, keeping ignored and
preserve-absent entries. Either way nothing on the destination changes until the whole
stream has arrived, and the base index becomes exactly what both sides now hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from syncd.engine.model import Agreed, agreed_from, kept_local
from syncd.protocol import messages as m
from syncd.session.agent_client import DIGESTS_CHUNK, DIRECT_TAR, AgentClient, TarUpload
from syncd.session.direct import (
    CREATE_OK,
    DirectFailed,
    DirectStream,
    DirectUnavailable,
    cue_lines,
    tar_create_script_on_cue,
    tar_script,
    tar_script_on_cue,
)
from syncd.session.tar_worker import ExtractWorker, ProduceWorker
from syncd.tarstream import (
    LEAVE_REASONS,
    UNREADABLE,
    VANISHED,
    ExtractError,
    merge_in,
    mirror,
    path_key,
    staging_name,
    unstage,
)

if TYPE_CHECKING:
    from syncd.session.local_side import LocalSide
    from syncd.session.session import Session
    from syncd.transport.channel import DirectArgv



log = logging.getLogger("syncd.session")
DIRECT_POLL = 0.2  # seconds between passing on the archived entries while a direct stream runs
# A pull this large (or of this many files) goes direct; the environment variable is for
# tests and tuning (0: every pull that can).
DIRECT_PULL_BYTES = int(os.environ.get("SYNCD_DIRECT_PULL_BYTES", 128 << 20))
DIRECT_PULL_FILES = 20_000


class ResyncRefused(Exception):
    """The resync would only delete: the source is empty (override with force)."""


def _refuse_empty(direction: str, source: str) -> ResyncRefused:
    return ResyncRefused(f"the {source} tree is empty: a resync --{direction} would only delete; nothing was "
                         f"changed (pass --force if that is what you want)")


@dataclass
class ResyncProgress:
    """Live counters of a resync, shown by `status` and the CLI."""

    direction: str
    phase: str = "scanning"
    files: int = 0
    bytes: int = 0
    total_files: int = 0
    total_bytes: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, files: int, size: int) -> None:
        self.files += files
        self.bytes += size

    def as_dict(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.bytes / elapsed
        left = max(self.total_bytes - self.bytes, 0)
        eta = left / rate if rate > 0 and self.phase == "streaming" else None
        return {"direction": self.direction, "phase": self.phase, "files": self.files, "bytes": self.bytes,
                "total_files": self.total_files, "total_bytes": self.total_bytes,
                "seconds": round(elapsed, 3), "rate": round(rate), "eta": None if eta is None else round(eta, 1)}


@dataclass
class ResyncSummary:
    direction: str
    files: int
    bytes: int
    seconds: float
    deleted: int
    skipped: list[m.Skip]
    direct: bool = False  # the stream went by a way of its own (see direct), not the channel

    def as_dict(self) -> dict[str, Any]:
        return {"direction": self.direction, "files": self.files, "bytes": self.bytes,
                "seconds": round(self.seconds, 3), "deleted": self.deleted, "direct": self.direct,
                "skipped": [{"path": s.path, "reason": s.reason, "detail": s.detail} for s in self.skipped]}


def _base_rows(sources: list[m.Entry], placed: list[m.Entry], source_side: str) -> list[Agreed]:
    """Base rows for what landed: the source's entry (with its digest), both inodes."""
    by_path = {e.path: e for e in sources}
    rows = []
    for dest in placed:
        src = by_path.get(dest.path)
        if src is None or src.kind != dest.kind:
            continue
        if source_side == "local":
            rows.append(agreed_from(src, src.ino, dest.ino))
        else:
            rows.append(agreed_from(src, dest.ino, src.ino))
    return rows


def _with_digests(local: LocalSide, entries: list[m.Entry]) -> list[m.Entry]:
    """Kept files with their digests (a marker must say what content stays local-only); a
    file that cannot be read gets no marker and is simply not tracked."""
    out = []
    for entry in entries:
        if entry.kind == m.FILE and entry.digest is None:
            digest = local.digest_of(entry.path)
            if digest is None:
                continue
            entry = entry._replace(digest=digest)
        out.append(entry)
    return out


async def _make_kept_dirs(session: Session, kept: list[m.Entry], sources: list[m.Entry],
                          on_side: str) -> list[Agreed]:
    """Directories the destination kept because they hold ignored or preserved entries,
    while the source lacks them: made on the source too (empty), so that both sides agree
    and the live sync has nothing to undo. Returns their base rows."""
    have = {e.path for e in sources}
    todo = sorted((e for e in kept if e.kind == m.DIR and e.path not in have), key=lambda e: path_key(e.path))
    if not todo:
        return []
    ops: list[m.Op] = [m.MakeDir(e.path, e.mode, m.Expect(m.ABSENT)) for e in todo]
    if on_side == "local":
        local = session.local
        assert local is not None

        def make() -> list[m.OpResult]:
            try:
                return [local.root.apply(op) for op in ops]
            finally:
                local.root.release()

        results = list(await session._fs(make))
    else:
        assert session.agent is not None
        results = list(await session.agent.apply(ops))
    rows = []
    for kept_entry, result in zip(todo, results):
        made = result.entry
        if result.status != m.OK or made is None:
            continue  # e.g. a file on the source where the destination kept a directory
        local_ino, remote_ino = (made.ino, kept_entry.ino) if on_side == "local" else (kept_entry.ino, made.ino)
        rows.append(Agreed(kept_entry.path, m.DIR, kept_entry.mode & 0o7777, 0, made.mtime_ns, None, None,
                           local_ino, remote_ino))
    return rows


async def push(session: Session, force: bool = False, merge: bool = False) -> ResyncSummary:
    """Rebuild the remote from the local tree (listed, read and hashed by a child process:
    see tar_worker). With ``merge`` (a first sync into an empty remote) the stream only
    adds where the remote has nothing: see tarstream.merge_in."""
    agent = session.agent
    progress = session.resync_progress  # made with the session (it counts from the connection)
    assert agent is not None and progress is not None
    worker = await session.push_worker()
    upload = agent.tar_to_agent("", False, merge, direct=True)
    try:
        # A direct stream's process reaches the remote while the child lists the tree.
        opening = asyncio.ensure_future(_open_direct(session, upload, worker))
        try:
            progress.total_files, progress.total_bytes = await worker.announced()
            if not progress.total_files and not force:
                raise _refuse_empty("push", "local")
            progress.phase = "streaming"
            worker = await _send_stream(session, upload, worker, await opening)
        except BaseException:
            await abandon(opening)
            upload.cancel()
            raise
        progress.phase = "placing"
        sent = list(worker.entries.values())
        await upload.share_entries(worker.take_sent())
        placement = await upload.placed(worker.skipped)
        # In place: answered now, while the listing of what was placed, for the base, is
        # still on its way.
        kept = await _make_kept_dirs(session, list(placement.kept), sent, "local")
        summary = ResyncSummary("push", len(sent), progress.bytes, time.monotonic() - progress.started,
                                placement.deleted, worker.skipped + list(placement.skipped),
                                direct=isinstance(opening.result(), DirectStream))
        session.placed(summary)
        placed, _ = await upload.listing()
    finally:
        upload.close()
        await worker.close()
    await session.reset_base(await session._fs(_base_rows, sent, placed, "local") + kept)
    progress.phase = "done"
    return summary


async def open_early_push(session: Session, direct_argv: DirectArgv) -> DirectStream | DirectUnavailable | None:
    """Where the local tree is being archived for a push (a resync --push, or a first
    sync that may push into an empty remote), start its direct stream as soon as the
    endpoint is reached: the process logs in while the agent starts, then waits for the
    staging path (tar_script_on_cue), and the archiver for its go (see _open_direct)."""
    if session._push_worker is None:  # a first sync's archiver starts once the base is loaded
        await session._local_ready.wait()
        if session._push_worker is None:
            return None
    worker = await session._push_worker
    argv = direct_argv(tar_script_on_cue())
    if argv is None:
        return None
    try:
        return await DirectStream.start(argv, worker.take_stream())
    except DirectUnavailable as exc:
        return exc


async def _open_direct(session: Session, upload: TarUpload,
                       worker: ProduceWorker) -> DirectStream | DirectUnavailable | None:
    """Start the direct stream where the agent and the channel offer one (see direct),
    or take the one started early: the stream, None where there is none, or why it did
    not start (the child's stream was handed over then: the child must start over)."""
    agent = session.agent
    assert agent is not None
    ready = await upload.ready()
    early = session.take_early_push()
    if early is not None:
        try:
            stream = await early
        except BaseException:
            await abandon(early)
            raise
        if isinstance(stream, DirectStream):
            cue = cue_lines(ready.tar, ready.staging) if ready and ready.tar else None
            if cue is not None:
                worker.go(cue)
                return stream
            await stream.close()
            return DirectUnavailable("the agent offers no direct stream")
        if isinstance(stream, DirectUnavailable):
            _warn_channel(session, "push", stream)
            return stream
    argv = agent.channel.direct_argv(tar_script(ready.tar, ready.staging)) if ready and ready.tar else None
    if argv is None:
        return None
    worker.go()
    try:
        return await DirectStream.start(argv, worker.take_stream())
    except DirectUnavailable as exc:
        _warn_channel(session, "push", exc)
        return exc


def _warn_channel(session: Session, direction: str, why: DirectUnavailable) -> None:
    log.warning("%s: the %s goes over the session channel: the direct stream did not start: %s",
                session.cfg.name, direction, why)


async def abandon(opening: asyncio.Future[Any]) -> None:
    """Stop a direct stream still starting, or close it if it started."""
    if not opening.done():
        opening.cancel()
    with contextlib.suppress(BaseException):
        stream = await opening
        if isinstance(stream, (DirectStream, EarlyPull)):
            await stream.close()


async def _send_stream(session: Session, upload: TarUpload, worker: ProduceWorker,
                       opened: DirectStream | DirectUnavailable | None) -> ProduceWorker:
    """Send the archive, by the direct stream if one ``opened``, else over the channel.
    Returns the child that archived it: a new one if the direct stream did not start."""
    progress = session.resync_progress
    assert progress is not None
    if isinstance(opened, DirectUnavailable):
        await worker.close()
        progress.files = progress.bytes = 0
        worker = await session._start_push_worker()
        await worker.announced()
    elif opened is not None:
        try:
            await _wait_direct(opened, upload, worker)
        except DirectFailed:
            # Unless the child failed for want of a reader, its own failure came first.
            with contextlib.suppress(ExtractError):
                await worker.finish()
            if worker.error is not None and not worker.reader_gone:
                raise ExtractError(worker.error) from None
            raise
        await worker.finish()  # tar may end well on a stream the child cut short
        return worker
    async for chunk in worker.chunks():
        await upload.send(chunk)
        # The entries go along as the files are archived: none are left to send while the
        # agent waits for the end.
        await upload.share_entries(worker.take_sent(DIGESTS_CHUNK))
    await worker.finish()
    return worker


async def _wait_direct(stream: DirectStream, upload: TarUpload, worker: ProduceWorker) -> None:
    """Until the remote tar has the whole stream, pass on the entries as files are archived."""
    waiter = asyncio.ensure_future(stream.wait())
    try:
        while True:
            done, _ = await asyncio.wait([waiter], timeout=DIRECT_POLL)
            await upload.share_entries(worker.take_sent(DIGESTS_CHUNK))
            if done:
                waiter.result()  # raises DirectFailed
                return
    finally:
        if not waiter.done():
            waiter.cancel()


async def pull(session: Session, force: bool = False, merge: bool = False) -> ResyncSummary:
    """Rebuild the local tree from the remote, keeping ignored and preserve-absent entries.
    With ``merge`` (a first sync into an empty local root) the stream only adds where the
    local root has nothing: see tarstream.merge_in. The remote's GNU tar archives the tree
    straight into the extracting child where the agent and the channel offer a way (see
    direct) and the tree is expected to be big enough for that way's own login, else the
    agent streams it over the channel."""
    agent, progress = session.agent, session.resync_progress
    assert agent is not None and progress is not None
    early = session.take_early_pull()
    opened: EarlyPull | DirectUnavailable | None = None
    if early is not None:
        try:
            opened = await early  # None: the base says the tree is small
        except BaseException:
            await abandon(early)
            raise
    if isinstance(opened, DirectUnavailable):
        _warn_channel(session, "pull", opened)
    elif (agent.supports(DIRECT_TAR) and agent.channel.direct_argv("true") is not None
            and (opened is not None or (early is None and expect_big(session)))):
        try:
            return await _pull(session, force, merge, opened)
        except DirectUnavailable as exc:
            _warn_channel(session, "pull", exc)
        progress.files = progress.bytes = 0
    elif opened is not None:
        await opened.close()
    return await _pull(session, force, merge, None, direct=False)


def expect_big(session: Session) -> bool:
    """Whether a pull should go direct: the base says the remote tree is worth the
    login, or there is no base to ask (the login then costs a little CPU, and only the
    first time)."""
    base = session.base
    if not base:
        return True
    rows = base.mapping().values()
    return _worth_direct(len(rows), sum(row.size for row in rows if row.kind == m.FILE))


def _worth_direct(files: int, size: int) -> bool:
    # A direct pull logs in again (0.1-0.5 s, while the agent starts where it can), and
    # then moves a byte for less CPU than the channel: below this, the channel is faster.
    return size >= DIRECT_PULL_BYTES or files >= DIRECT_PULL_FILES


class EarlyPull:
    """A direct pull's command started before the agent is up (see open_early_pull),
    writing into a pipe whose read end is for the extracting child."""

    def __init__(self, stream: DirectStream, read_fd: int, write_fd: int) -> None:
        self.stream = stream
        self.read_fd = read_fd
        self.write_fd = write_fd  # for the rules that go ahead of the archive

    def take_pipe(self) -> tuple[int, int]:
        """The pipe's two ends (the caller owns them now)."""
        pipe = (self.read_fd, self.write_fd)
        self.read_fd = self.write_fd = -1
        return pipe

    async def close(self) -> None:
        self.read_fd = _closed(self.read_fd)
        self.write_fd = _closed(self.write_fd)
        await self.stream.close()


async def open_early_pull(session: Session, direct_argv: DirectArgv) -> EarlyPull | DirectUnavailable | None:
    """Where the session is to pull a big tree (a resync --pull, or a first sync into an
    empty local root), start the direct stream's command as soon as the endpoint is
    reached: it logs in while the agent starts, then waits for the tar and the root
    (tar_create_script_on_cue). None where no pull is expected."""
    await session._local_ready.wait()  # the base says how big the tree is
    if not (session.resync == "pull" or session.first_pull) or not expect_big(session):
        return None
    argv = direct_argv(tar_create_script_on_cue())
    if argv is None:
        return None
    read_fd, write_fd = os.pipe()
    try:
        stream = await DirectStream.start(argv, stdout_fd=os.dup(write_fd), stdin_pipe=True)
    except DirectUnavailable as exc:
        _closed(read_fd), _closed(write_fd)
        return exc
    except BaseException:
        _closed(read_fd), _closed(write_fd)
        raise
    return EarlyPull(stream, read_fd, write_fd)


def _closed(fd: int) -> int:
    """Close ``fd`` unless it is -1 (none); returns -1."""
    if fd >= 0:
        os.close(fd)
    return -1


class _PullCommand:
    """A direct pull's remote command (tar_create_script_on_cue) writing into the
    extracting child's pipe ``input_fd``: started early (see open_early_pull) or once the
    agent names its tar (``start``), then given the names of the entries to archive as
    the agent lists them (``names``, then ``end``), then waited for; ``close`` in any case."""

    def __init__(self, agent: AgentClient, input_fd: int, early: DirectStream | None) -> None:
        self.agent = agent
        self.input_fd = input_fd  # our end of the child's pipe
        self.piped = early  # the command, once it runs

    async def start(self, tar: str, root: str) -> None:
        """Have the command archive with ``tar`` in ``root``. Raises DirectUnavailable if
        it cannot run (nothing was archived then)."""
        cue = cue_lines(tar, root) if tar else None
        if cue is None:
            raise DirectUnavailable("the agent offers no direct stream")
        if self.piped is None:
            argv = self.agent.channel.direct_argv(tar_create_script_on_cue())
            if argv is None:
                raise DirectUnavailable("no way to run a command beside the agent")
            fd, self.input_fd = self.input_fd, -1
            self.piped = await DirectStream.start(argv, stdout_fd=fd, stdin_pipe=True)
        else:
            self.input_fd = _closed(self.input_fd)  # the command has its own: its end is the child's EOF
        await self._write(cue)

    async def names(self, entries: tuple[m.Entry, ...]) -> None:
        """More entries for tar to archive."""
        if entries:
            await self._write(b"".join(os.fsencode(e.path) + b"\0" for e in entries))

    def end(self) -> None:
        """No more names: tar finishes the archive."""
        assert self.piped is not None and self.piped.proc.stdin is not None
        self.piped.proc.stdin.close()

    async def _write(self, data: bytes) -> None:
        assert self.piped is not None and self.piped.proc.stdin is not None
        with contextlib.suppress(ConnectionError):  # it died: wait() says how
            self.piped.proc.stdin.write(data)
            await self.piped.proc.stdin.drain()

    def no_stream(self) -> None:
        """If the command was never started, the extracting child sees an empty stream."""
        self.input_fd = _closed(self.input_fd)

    async def close(self) -> None:
        self.input_fd = _closed(self.input_fd)
        if self.piped is not None:
            await self.piped.close()


async def _pull(session: Session, force: bool, merge: bool, opened: EarlyPull | None,
                direct: bool = True) -> ResyncSummary:
    local, agent, progress = session.local, session.agent, session.resync_progress
    assert local is not None and agent is not None and progress is not None
    staging_rel = staging_name("resync")
    staging = os.path.join(session.cfg.local, staging_rel)
    rules = session.rules
    # Extracted by a child process: see tar_worker for why.
    command: _PullCommand | None = None
    if direct:
        try:
            extractor, input_fd = await ExtractWorker.start_on_pipe(
                staging, session.cfg.local, rules.to_wire(), progress.add,
                opened.take_pipe() if opened is not None else None)
        except BaseException:
            if opened is not None:
                await opened.close()
            raise
        command = _PullCommand(agent, input_fd, opened.stream if opened is not None else None)
    else:
        extractor = await ExtractWorker.start(staging, session.cfg.local, rules.to_wire(), progress.add)
    sent: list[m.Entry] = []
    skipped: list[m.Skip] = []
    refused = False
    stream = agent.tar_from_agent(direct=direct)
    consumed = 0
    try:
        async for item in stream:
            if isinstance(item, m.TarStart):
                progress.total_files, progress.total_bytes = item.files, item.size
                progress.phase = "streaming"
                refused = item.files == 0 and not force  # the stream is tiny: read it to its end
            elif isinstance(item, m.TarData) and not direct:
                await extractor.feed(item.data)  # waits while the extractor is behind
                consumed += len(item.data)
                stream.ack(consumed)
            elif isinstance(item, m.TarResult):
                if command is not None:
                    await command.names(item.entries)  # archived as they are listed
                elif not sent and not skipped:
                    await extractor.finish()  # the archive is complete
                sent.extend(item.entries)
                skipped.extend(item.skipped)
                if item.done:
                    break
            elif isinstance(item, m.TarReady) and command is not None:  # the entries follow
                await command.start(item.tar, session.remote_root)
                progress.phase = "streaming"
            else:
                raise ValueError(f"unexpected {type(item).__name__} in a tar stream")
        if command is not None:
            command.no_stream()  # unless the command has the pipe
        if refused:
            raise _refuse_empty("pull", "remote")
        if command is not None:
            if command.piped is not None:
                command.end()
                try:
                    await command.piped.wait(CREATE_OK)
                except DirectFailed as exc:
                    # The child's failure (a full disk, say) stops it reading: then it is
                    # the reason, whatever the command made of its stdout going away.
                    if exc.reader_gone() or await extractor.failed_writing():
                        await extractor.finish()
                    raise
            await extractor.finish()
            skipped.extend(await _not_streamed(session, sent, extractor.entries))
        progress.phase = "placing"
        await session._fs(unstage, local.root, staging_rel, extractor.entries,
                          [s.path for s in skipped if s.reason not in LEAVE_REASONS])
        if merge:
            result = await session._fs(merge_in, local.root, staging_rel, extractor.entries)
        else:
            existing = await session._fs(local.scanner.scan_all, False)
            leave = [s.path for s in skipped if s.reason in LEAVE_REASONS]
            result = await session._fs(
                mirror, local.root, staging_rel, extractor.entries, existing,
                lambda rel, kind: rules.is_preserved(rel, kind == m.DIR), leave,
            )
    finally:
        if command is not None:
            await command.close()
        stream.close()
        await extractor.close()
    kept = await _make_kept_dirs(session, result.kept_dirs, sent, "remote")
    summary = ResyncSummary("pull", len(result.entries), extractor.bytes, time.monotonic() - progress.started,
                            result.deleted, skipped + extractor.skipped + result.skipped, direct=direct)
    session.placed(summary)
    # Preserve-absent entries the remote lacks stay local-only (not sent back) until changed.
    markers = [kept_local(entry) for entry in await session._fs(_with_digests, local, result.kept)]
    await session.reset_base(await session._fs(_base_rows, sent, result.entries, "remote") + kept + markers)
    progress.phase = "done"
    return summary


async def _not_streamed(session: Session, sent: list[m.Entry], staged: dict[str, m.Entry]) -> list[m.Skip]:
    """Entries the agent listed that the remote's tar left out of a direct stream: gone
    since (they are deleted here as the remote lacks them), or there but unreadable, or
    not to be looked at (left as they are here, as after any unreadable file)."""
    agent = session.agent
    assert agent is not None
    missing = [e.path for e in sent if e.path not in staged]
    if not missing:
        return []
    _, absent, _ = await agent.scan(missing, recursive=False)
    gone = set(absent)
    return [m.Skip(path, VANISHED, f"{path} vanished while the remote was archived") if path in gone else
            m.Skip(path, UNREADABLE, f"{path} was not in the stream (unreadable on the remote): left as it is")
            for path in missing]
