"""A rename whose two watcher events arrive in separate batches still travels as a move.

The local watcher here is the real one, wrapped so that every batch is cut in two: what
no longer exists is delivered at once, what exists 20 ms later: a rename's departure and
arrival on either side of a batch boundary, as a loaded machine produces now and then
(without the hold, this test fails every time).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from syncd.endpoint import parse_remote
from syncd.engine.model import Agreed
from syncd.protocol import messages as m
from syncd.session import session as session_mod
from syncd.session.config import SessionConfig
from syncd.session.session import MOVE_GRACE, Session

ARRIVAL_DELAY = 0.02  # seconds: well under MOVE_GRACE, as a split batch is in practice
assert ARRIVAL_DELAY < MOVE_GRACE


def _split_arrivals(monkeypatch: pytest.MonkeyPatch) -> None:
    real = session_mod.start_watcher

    def start(root: str, on_batch: Any, *args: Any, **kwargs: Any) -> Any:
        def split(paths: set[str], overflow: bool) -> None:
            arrived = {p for p in paths if p and os.path.lexists(os.path.join(root, p))}
            on_batch(paths - arrived, overflow)
            if arrived:
                threading.Timer(ARRIVAL_DELAY, on_batch, (arrived, False)).start()

        return real(root, split, *args, **kwargs)

    monkeypatch.setattr(session_mod, "start_watcher", start)


async def _until(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)


def test_a_rename_split_across_two_batches_is_replayed_as_a_move(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _split_arrivals(monkeypatch)
    local, remote = tmp_path / "local", tmp_path / "remote"
    (local / "pkg" / "mod").mkdir(parents=True)
    (local / "other").mkdir()
    for i in range(20):
        (local / "pkg" / "mod" / f"f{i:02}.txt").write_text(f"content {i}\n")
    (local / "single.txt").write_text("alone\n")
    remote.mkdir()
    lines: list[str] = []
    cfg = SessionConfig("moves", str(local), parse_remote(f"local:{remote}"), state_dir=str(tmp_path / "state"))
    session = Session(cfg, report=lines.append)

    async def scenario() -> None:
        task = asyncio.create_task(session.run())
        try:
            await _until(lambda: (remote / "pkg" / "mod" / "f19.txt").exists())
            await session.flush()
            first = len(lines)
            os.rename(local / "pkg" / "mod", local / "other" / "moved")
            await _until(lambda: (remote / "other" / "moved" / "f00.txt").exists())
            os.rename(local / "single.txt", local / "other" / "single-renamed.txt")
            await _until(lambda: (remote / "other" / "single-renamed.txt").exists())
            await session.flush()
            changes = lines[first:]
            assert any("move   pkg/mod -> other/moved" in line for line in changes), changes
            assert any("move   single.txt -> other/single-renamed.txt" in line for line in changes), changes
            assert not [line for line in changes if "f0" in line or " delete " in line], changes
            assert sorted(os.listdir(remote / "other" / "moved")) == [f"f{i:02}.txt" for i in range(20)]
            assert not (remote / "pkg" / "mod").exists()
            assert not (remote / "single.txt").exists()
        finally:
            session.stop()
            await task

    asyncio.run(scenario())


def test_a_deletion_still_lands_after_the_grace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Held once, not forever: a plain deletion reaches the other side."""
    _split_arrivals(monkeypatch)
    local, remote = tmp_path / "local", tmp_path / "remote"
    (local / "d").mkdir(parents=True)
    (local / "d" / "x.txt").write_text("x\n")
    (local / "y.txt").write_text("y\n")
    (local / "stays.txt").write_text("stays\n")  # an emptied root is a halt, not deletions
    remote.mkdir()
    cfg = SessionConfig("gone", str(local), parse_remote(f"local:{remote}"), state_dir=str(tmp_path / "state"))
    session = Session(cfg)

    async def scenario() -> None:
        task = asyncio.create_task(session.run())
        try:
            await _until(lambda: (remote / "y.txt").exists() and (remote / "d" / "x.txt").exists())
            await session.flush()
            os.unlink(local / "d" / "x.txt")
            os.rmdir(local / "d")
            os.unlink(local / "y.txt")
            await _until(lambda: not (remote / "d").exists() and not (remote / "y.txt").exists())
        finally:
            session.stop()
            await task

    asyncio.run(scenario())


def _row(path: str, kind: int = m.FILE) -> Agreed:
    return Agreed(path, kind, 0o644, 1, 1, b"d" if kind == m.FILE else None, None, 1, 2)


BASE_ROWS = [_row("d", m.DIR), _row("d/a"), _row("d/b"), _row("f"), _row("g")]

# (case, side, observed (path -> present?), reported by that side, full scan, held last cycle,
#  paths held now)
HOLDS = [
    ("a file its side reported gone", "remote", {"f": False}, {"f"}, False, set(), {"f"}),
    ("a directory: only its top", "local", {"d": False, "d/a": False, "d/b": False}, {"d"}, False, set(), {"d"}),
    ("gone under a reported directory", "remote", {"d/a": False}, {"d"}, False, set(), {"d/a"}),
    ("looked at for the other side", "local", {"f": False}, set(), False, set(), set()),
    ("present", "local", {"f": True}, {"f"}, False, set(), set()),
    ("held last cycle: not again", "remote", {"f": False, "g": False}, {"f", "g"}, False, {"f"}, {"g"}),
    ("below a path held last cycle", "local", {"d": False, "d/a": False}, {"d"}, False, {"d"}, set()),
    ("a full scan holds nothing", "remote", {"f": False}, {"f"}, True, set(), set()),
    ("untracked", "local", {"new": False}, {"new"}, False, set(), set()),
]


@pytest.mark.parametrize(("case", "side", "seen", "reported", "full", "before", "held"), HOLDS,
                         ids=[h[0] for h in HOLDS])
def test_which_departures_are_held(tmp_path: Path, case: str, side: str, seen: dict[str, bool], reported: set[str],
                                   full: bool, before: set[str], held: set[str]) -> None:
    cfg = SessionConfig("h", str(tmp_path), parse_remote(f"local:{tmp_path / 'r'}"), state_dir=str(tmp_path / "s"))
    session = Session(cfg)
    for row in BASE_ROWS:
        session.base.set(row)
    session._held[side] = set(before)  # type: ignore[index]
    observed: dict[str, m.Entry | None] = {
        p: (m.Entry(p, m.FILE, 0o644, 1, 1, 1, b"d", None) if present else None) for p, present in seen.items()}
    session._hold_departures(side, observed, full, reported)  # type: ignore[arg-type]
    assert session._held[side] == held  # type: ignore[index]
    dirty = session.local_dirty if side == "local" else session.remote_dirty
    assert dirty == held
    assert not [p for p in observed if any(p == h or p.startswith(h + "/") for h in held)], observed
    assert (session._hold_until > time.monotonic()) == bool(held)
