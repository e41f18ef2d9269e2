"""Each resync request is answered by the session started for it, and only once.

A resync is answered as soon as its tree is in place; the session then records the base
and may still report its summary when the stream returns. A second resync requested in
that window must get its own summary, not the first one's. The session here is a fake:
what is tested is the runner's bookkeeping and the session's answer-once rule.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Callable

import pytest

from syncd.daemon import runner as runner_mod
from syncd.endpoint import parse_remote
from syncd.session.config import SessionConfig
from syncd.session.resync import ResyncSummary
from syncd.session.session import Session, SessionError
from syncd.session.spec import SessionSpec

RECORDING = 0.05  # seconds the fake session spends "recording the base" after answering


def _summary(direction: str, files: int = 1) -> ResyncSummary:
    return ResyncSummary(direction, files=files, bytes=1, seconds=0.0, deleted=0, skipped=[])


class FakeSession:
    """Answers at placement and again when its stream returns, as a careless session
    would; fails instead when its direction is listed in ``failing``."""

    failing: set[str] = set()
    started = 0  # sessions made so far: each one's summary counts that many files

    def __init__(self, cfg: Any, report: Any, on_connected: Any, resync: str | None,
                 on_resync: Callable[[ResyncSummary], None] | None, resync_force: bool) -> None:
        self.resync = resync
        self.on_resync = on_resync
        self.force_next = False
        self.connected = True
        self.stats = type("Stats", (), {"cycles": 1, "sent_files": 0, "sent_bytes": 0, "received_files": 0,
                                        "received_bytes": 0, "deleted": 0})()
        self._stop = asyncio.Event()
        FakeSession.started += 1
        self.number = FakeSession.started

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        if self.resync is not None:
            if self.resync in self.failing:
                await asyncio.sleep(RECORDING)
                raise SessionError(f"resync --{self.resync} failed: test")
            assert self.on_resync is not None
            self.on_resync(_summary(self.resync, self.number))  # placed
            await asyncio.sleep(RECORDING)  # the base is written, unstoppable
            self.on_resync(_summary(self.resync, self.number))  # the stream returned
        await self._stop.wait()


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> runner_mod.SessionRunner:
    monkeypatch.setattr(runner_mod, "Session", FakeSession)
    monkeypatch.setattr(FakeSession, "failing", set())
    monkeypatch.setattr(FakeSession, "started", 0)
    spec = SessionSpec("s", str(tmp_path / "local"), f"local:{tmp_path / 'remote'}")
    return runner_mod.SessionRunner(spec, str(tmp_path / "state"))


@pytest.mark.parametrize(("first", "second"), [("push", "pull"), ("pull", "push"), ("push", "push")])
def test_a_resync_requested_while_the_last_one_records_gets_its_own_summary(
        runner: runner_mod.SessionRunner, first: str, second: str) -> None:
    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        runner.start()
        try:
            one = await runner.resync(first, timeout=5.0)
            two = await runner.resync(second, timeout=5.0)  # the first session still records
            return one, two
        finally:
            await runner.stop()

    one, two = asyncio.run(scenario())
    assert (one["direction"], one["files"]) == (first, 1)
    assert (two["direction"], two["files"]) == (second, 2)  # from the second session


def test_a_failed_earlier_session_does_not_fail_a_later_request(runner: runner_mod.SessionRunner) -> None:
    FakeSession.failing = {"push"}

    async def scenario() -> dict[str, Any]:
        runner.start()
        try:
            with pytest.raises(SessionError, match="resync --push failed"):
                await runner.resync("push", timeout=5.0)
            return await runner.resync("pull", timeout=5.0)
        finally:
            await runner.stop()

    assert asyncio.run(scenario())["direction"] == "pull"


def test_the_session_answers_a_resync_once(tmp_path: Path) -> None:
    answers: list[str] = []
    cfg = SessionConfig("s", str(tmp_path), parse_remote(f"local:{tmp_path}"), state_dir=str(tmp_path / "st"))
    session = Session(cfg, resync="pull", on_resync=lambda s: answers.append(s.direction))
    session.placed(_summary("pull"))
    session._answer_resync(_summary("pull"))
    assert answers == ["pull"]
