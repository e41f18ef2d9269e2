"""The session's local watcher never outlives the session, however its task is cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from syncd.agent.watch import Watcher
from syncd.endpoint import parse_remote
from syncd.session import session as session_mod
from syncd.session.config import SessionConfig
from syncd.session.session import Session


def _session(tmp_path: Path) -> Session:
    (tmp_path / "local").mkdir()
    cfg = SessionConfig("w", str(tmp_path / "local"), parse_remote(f"local:{tmp_path / 'remote'}"),
                        state_dir=str(tmp_path / "state"))
    return Session(cfg)


def _recording_start(monkeypatch: pytest.MonkeyPatch) -> list[Watcher]:
    started: list[Watcher] = []
    real = session_mod.start_watcher

    def start(*args: Any, **kwargs: Any) -> Watcher:
        watcher = real(*args, **kwargs)
        started.append(watcher)
        return watcher

    monkeypatch.setattr(session_mod, "start_watcher", start)
    return started


def _gone(watcher: Watcher, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while watcher.running and time.monotonic() < deadline:
        time.sleep(0.01)
    return not watcher.running


@pytest.mark.parametrize("moment", ["stopping", "starting"])
def test_the_watcher_stops_when_its_task_is_cancelled_while_the_thread_pool_is_busy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moment: str) -> None:
    """close() cancels the task while it waits for a pool thread to start or stop the
    watcher; a job still queued then never runs. Here the pool's one thread is busy."""
    started = _recording_start(monkeypatch)
    session = _session(tmp_path)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(1)
        loop.set_default_executor(pool)
        gate = threading.Event()
        if moment == "starting":
            blocker = loop.run_in_executor(None, gate.wait)
            task = asyncio.create_task(session._watch_local())
            await asyncio.sleep(0.05)  # the start is queued behind the blocker
            task.cancel()
            gate.set()  # the start runs now, after its task is gone
            await blocker
        else:
            task = asyncio.create_task(session._watch_local())
            await session._local_armed.wait()
            blocker = loop.run_in_executor(None, gate.wait)
            session.stop()  # the task asks the busy pool to stop the watcher...
            await asyncio.sleep(0.05)
            task.cancel()  # ...and is cancelled meanwhile, as close() does
            gate.set()
            await blocker
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for _ in range(100):  # the start (or stop) job and its callbacks have run
            await asyncio.sleep(0.01)
            if started and not started[0].running:
                break

    asyncio.run(scenario())
    assert len(started) == 1
    assert _gone(started[0]), f"{started[0]!r} outlived its session"
