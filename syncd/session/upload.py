"""One-shot directory uploads: replace a directory on the remote with a local one's
content, as one tar stream over a connection of its own (the live session, if any, is
left alone)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

from syncd.fsops import UnsafePath, split_path
from syncd.protocol import messages as m
from syncd.rules import Rules
from syncd.scan import Scanner
from syncd.session import interpreters
from syncd.session.agent_client import AgentClient, AgentError, TarUpload
from syncd.session.config import SessionConfig
from syncd.session.resync import ResyncProgress
from syncd.tarstream import TarProducer, scan_skips, walk_following
from syncd.transport.channel import TransportError
from syncd.transport.connect import start_agent

CHUNK_QUEUE = 8


class UploadError(Exception):
    """The upload could not be done; the remote directory is as it was."""


def check_remote_dir(remote_dir: str) -> str:
    """REMOTE_DIR must be a plain relative path (no '..', not the root itself)."""
    clean = remote_dir.rstrip("/") or remote_dir  # "a/" is "a"; "/" stays absolute
    try:
        split_path(clean)
    except UnsafePath as exc:
        raise UploadError(f"REMOTE_DIR must be relative to the remote root (or to the runtime directory "
                          f"with --runtime), without '..': {exc}") from None
    return clean


async def upload(cfg: SessionConfig, local_dir: str, remote_dir: str, runtime: bool = False,
                 follow_symlinks: bool = False, excludes: tuple[str, ...] = ()) -> dict[str, Any]:
    """Replace ``remote_dir`` with ``local_dir``'s content; returns a summary."""
    target = check_remote_dir(remote_dir)
    if not os.path.isdir(local_dir):
        raise UploadError(f"{local_dir} is not a directory")
    started = time.monotonic()
    rules = Rules(excludes)
    if follow_symlinks:
        entries, skipped = await asyncio.to_thread(walk_following, local_dir, rules.is_ignored)
    else:
        scanner = Scanner(local_dir, rules.is_ignored)
        entries = await asyncio.to_thread(scanner.scan_all, False)
        skipped = scan_skips(scanner.skipped)
    python = interpreters.Recorded(cfg.state_dir, cfg.remote, cfg.agent)
    try:
        channel = await start_agent(cfg.remote, cfg.agent, f"{cfg.name} (upload)", python_path=python.path)
    except TransportError as exc:
        raise UploadError(str(exc)) from None
    client = AgentClient(channel)
    try:
        await client.start()
        opened = await client.open(cfg.remote.path, Rules().to_wire(), True, False)
        python.found(opened.executable)
        progress = ResyncProgress("upload")
        producer = TarProducer(local_dir, entries, follow_symlinks=follow_symlinks, progress=progress.add)
        stream = client.tar_to_agent(target, runtime)
        _, remote_skips, _, where = await send_stream(producer, stream, skipped)
    except AgentError as exc:
        raise UploadError(f"{cfg.remote.describe()}: {exc}") from None
    finally:
        await client.close()
    all_skipped = skipped + producer.skipped + remote_skips
    return {"files": progress.files, "bytes": progress.bytes, "seconds": round(time.monotonic() - started, 3),
            "where": where, "skipped": [{"path": s.path, "reason": s.reason, "detail": s.detail}
                                        for s in all_skipped]}


async def send_stream(producer: TarProducer, upload: TarUpload,
                      skipped: list[m.Skip]) -> tuple[list[m.Entry], list[m.Skip], int, str]:
    """Stream ``producer``'s archive to the agent (read and hashed by a worker thread, sent
    as it comes), then finish the stream; returns the agent's result."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes | None] = asyncio.Queue(CHUNK_QUEUE)
    stop = False

    def produce() -> None:
        try:
            for chunk in producer.chunks():
                if stop:
                    return
                asyncio.run_coroutine_threadsafe(chunks.put(chunk), loop).result()
        finally:
            producer.close()
            asyncio.run_coroutine_threadsafe(chunks.put(None), loop)

    work = asyncio.ensure_future(asyncio.to_thread(produce))
    try:
        while (chunk := await chunks.get()) is not None:
            await upload.send(chunk)
        await work  # raises if the producer failed
        return await upload.finish(producer.skipped + skipped)
    except BaseException:
        stop = True
        upload.close()
        while not work.done():  # the thread may be blocked on a full queue: empty it
            while not chunks.empty():
                chunks.get_nowait()
            await asyncio.sleep(0.01)
        with contextlib.suppress(BaseException):
            work.result()
        raise
