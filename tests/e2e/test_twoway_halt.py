"""End-to-end: safety halts. A cycle that would delete most of a side, an emptied or vanished
remote root: the session stops with exit status 5 ("syncd: error: halted: ...") and
propagates nothing.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.helpers import SyncProcess
from tests.e2e.twoway_util import (
    Pair,
    Tree,
    content_tree,
    make_tree,
    open_pair,
    wait_exit,
    wait_quiescent,
)
from tests.sshd import SshServer

EXIT_HALTED = 5


@pytest.fixture
def pair(sshd: SshServer, tmp_path: Path) -> Iterator[Pair]:
    yield from open_pair(sshd, tmp_path / "pair")


def _tree(files: int, dirs: int) -> Tree:
    return {f"dir{i % dirs:02d}/file{i:04d}.txt": f"content {i}\n" for i in range(files)}


def _assert_halted(session: SyncProcess, timeout: float = 30.0) -> str:
    code = wait_exit(session, timeout)
    err = session.stderr()
    assert code == EXIT_HALTED, f"expected exit {EXIT_HALTED} (halted), got {code}\n" + session.describe()
    halted = [ln for ln in err.splitlines() if ln.startswith("syncd: error: halted:")]
    assert len(halted) == 1, err[-3000:]
    return halted[0]


def test_mass_delete_on_restart_halts_and_propagates_nothing(pair: Pair) -> None:
    tree = _tree(300, 10)
    make_tree(pair.local, tree)
    s = pair.start()
    wait_quiescent(pair.local, pair.remote, s, what="initial push")
    s.stop()
    before = content_tree(pair.local)

    doomed = random.Random(7).sample(sorted(tree), 200)
    for rel in doomed:
        os.unlink(pair.remote / rel)
    remote_before = content_tree(pair.remote)

    line = _assert_halted(pair.start())
    assert "delete" in line, line
    assert content_tree(pair.local) == before, "local files were deleted although the session halted"
    assert sum(1 for k in content_tree(pair.local) if k.endswith(".txt")) == 300
    assert content_tree(pair.remote) == remote_before
    # The halt holds on the next start too: nothing is propagated until a resync or a forced resume.
    _assert_halted(pair.start())
    assert content_tree(pair.local) == before


def test_deleting_a_minority_is_not_a_halt(pair: Pair) -> None:
    """The threshold is "over 50% and over 100 entries": 150 of 300 files go through."""
    tree = _tree(300, 10)
    make_tree(pair.local, tree)
    s = pair.start()
    wait_quiescent(pair.local, pair.remote, s, what="initial push")
    s.stop()
    for rel in random.Random(8).sample(sorted(tree), 150):
        os.unlink(pair.remote / rel)
    s2 = pair.start()
    wait_quiescent(pair.local, pair.remote, s2, what="150 deletions propagated")
    assert sum(1 for k in content_tree(pair.local) if k.endswith(".txt")) == 150
    s2.stop()


@pytest.mark.parametrize("files", [
    pytest.param(30, id="small-tree"),
    pytest.param(300, id="large-tree"),
])
def test_remote_root_emptied_live_halts(pair: Pair, tmp_path: Path, files: int) -> None:
    """Everything inside the remote root goes away while the session runs (moved out in a
    few renames, as fast as ``rm -rf`` of the top-level entries would look to a watcher)."""
    tree = _tree(files, 3)
    tree["top.txt"] = "top\n"
    make_tree(pair.local, tree)
    s = pair.start()
    wait_quiescent(pair.local, pair.remote, s, what="initial push")
    before = content_tree(pair.local)

    trash = tmp_path / "trash"
    trash.mkdir()
    for child in sorted(pair.remote.iterdir()):
        os.rename(child, trash / child.name)
    assert os.listdir(pair.remote) == []

    try:
        line = _assert_halted(s, timeout=4)
    finally:
        assert content_tree(pair.local) == before, "the emptied remote root was propagated"
    assert "empty" in line or "delete" in line, line


def test_remote_root_vanished_live_halts(pair: Pair, tmp_path: Path) -> None:
    make_tree(pair.local, _tree(20, 2))
    s = pair.start()
    wait_quiescent(pair.local, pair.remote, s, what="initial push")
    before = content_tree(pair.local)
    os.rename(pair.remote, tmp_path / "remote-moved-away")
    code = wait_exit(s, 30)
    assert code == EXIT_HALTED, s.describe()
    assert content_tree(pair.local) == before
    # What the agent saw on the remote is in syncd's own log, not lost with its stderr.
    assert "agent: syncd-agent: WARNING watch: root" in s.stderr(), s.describe()
    shutil.rmtree(tmp_path / "remote-moved-away")
