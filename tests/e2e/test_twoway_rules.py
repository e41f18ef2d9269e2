"""End-to-end: preserve-absent and ignore rules, push and pull modes, the conflict listing.

The remote root is a directory on this machine reached through the real sshd; the tests
edit it directly to play the remote coding agent.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.helpers import SyncProcess, wait_until
from tests.e2e.twoway_util import (
    DIR_MARK,
    Pair,
    assert_idle,
    conflict_lines,
    content_tree,
    kill9,
    make_tree,
    normalise_conflict,
    open_pair,
    wait_idle,
    wait_quiescent,
)
from tests.sshd import SshServer

PRESERVE = ("--preserve-absent", ".env", "--preserve-absent", ".claude/")


@pytest.fixture
def pair(sshd: SshServer, tmp_path: Path) -> Iterator[Pair]:
    yield from open_pair(sshd, tmp_path)

def _local_only(pair: Pair, what: str) -> None:
    """Wait until each tree is stable on its own (they may legitimately differ)."""
    wait_quiescent(pair.local, pair.remote, pair.sessions[-1], equal=False, timeout=20, what=what)


def _remote_deletes_directory(pair: Pair) -> SyncProcess:
    """Sync a directory holding preserved (and ignored) local entries, then delete it on the
    remote; return the running session once the deletion has settled."""
    make_tree(pair.local, {
        "proj/a.txt": "a\n", "proj/sub/b.txt": "b\n", "proj/sub/deeper/c.txt": "c\n",
        "proj/.claude/settings.json": '{"model": "x"}\n', "proj/.env": "TOKEN=1\n",
        "other/keep.txt": "keep\n", ".env": "ROOT=1\n",
    })
    s = pair.start(*PRESERVE, "--ignore", "build/")
    wait_quiescent(pair.local, pair.remote, s, what="initial push")
    # Preserve-absent is not ignore: the preserved files were synced like any other.
    assert (pair.remote / "proj" / ".claude" / "settings.json").exists()
    # An ignored build directory inside, on the local side only.
    (pair.local / "proj" / "build").mkdir()
    (pair.local / "proj" / "build" / "out.o").write_text("object\n")
    wait_quiescent(pair.local, pair.remote, s, keep=lambda p: "build" not in p, what="ignored build dir")
    assert not (pair.remote / "proj" / "build").exists()

    # The agent deletes the whole directory on the remote, and a preserved file at the top.
    shutil.rmtree(pair.remote / "proj")
    os.unlink(pair.remote / ".env")
    wait_until(lambda: not (pair.local / "proj" / "a.txt").exists()
               and not (pair.local / "proj" / "sub").exists(), 15, session=s,
               message=lambda: f"synced files deleted locally: {content_tree(pair.local)}")
    _local_only(pair, "deletion settled")
    return s


def test_remote_directory_deletion_keeps_preserved_and_ignored_local_entries(pair: Pair) -> None:
    s = _remote_deletes_directory(pair)
    local = content_tree(pair.local)
    assert local == {
        "proj": DIR_MARK, "proj/.claude": DIR_MARK, "proj/.claude/settings.json": '{"model": "x"}\n',
        "proj/.env": "TOKEN=1\n", "proj/build": DIR_MARK, "proj/build/out.o": "object\n",
        "other": DIR_MARK, "other/keep.txt": "keep\n", ".env": "ROOT=1\n",
    }, s.stdout()
    remote = content_tree(pair.remote)
    assert "proj/a.txt" not in remote and "proj/sub" not in remote
    assert remote.get("other/keep.txt") == "keep\n"
    # The directory that has to stay must not be deleted again and again (judged at the end).
    busy = ""
    try:
        wait_idle(s, timeout=3)
    except AssertionError as exc:
        busy = str(exc)[:500]

    # A restart does not delete the preserved files either.
    s.stop()
    s2 = pair.start(*PRESERVE, "--ignore", "build/")
    _local_only(pair, "restart settled")
    assert (pair.local / "proj" / ".claude" / "settings.json").read_text() == '{"model": "x"}\n'
    assert (pair.local / "proj" / ".env").read_text() == "TOKEN=1\n"
    assert (pair.local / "proj" / "build" / "out.o").exists()
    assert not (pair.local / "proj" / "a.txt").exists()
    assert (pair.local / ".env").read_text() == "ROOT=1\n"
    # ...nor send them back to the remote, which deleted them (they stay local-only).
    remote_after = content_tree(pair.remote)
    assert not any(p == ".env" or p.startswith("proj") for p in remote_after), remote_after
    wait_idle(s2)
    s2.stop()
    if busy:  # everything above is checked strictly; this one is a known bug
        pytest.xfail(f"{BUSY_NOT_EMPTY}\n{busy}")


BUSY_NOT_EMPTY = ("known bug: Session._settle re-dirties a directory whose deletion failed with 'not empty' "
                  "(it holds preserved/ignored entries) before returning, so every cycle plans the same "
                  "deletion again: a busy loop")


def _probe(pair: Pair, s: SyncProcess, name: str) -> None:
    """Create a file on the remote and wait until it arrives locally: every cycle before it,
    the first full scan of a (re)start included, has then been carried out."""
    (pair.remote / name).write_text(f"{name}\n")
    wait_until(lambda: (pair.local / name).exists(), 15, session=s, message=f"{name} to arrive")
    _local_only(pair, f"{name} settled")


def _sent(s: SyncProcess, path: str) -> list[str]:
    """The session's lines that wrote ``path`` on the remote."""
    return [ln for ln in s.stdout_lines() if re.match(rf"-> remote\s+\S+\s+{re.escape(path)}(?: \(|$)", ln)]


def test_preserved_file_deleted_on_remote_stays_local_across_restarts(pair: Pair) -> None:
    """The remote deletes a preserve-absent file: the local copy is kept and stays local, also
    after a restart (full scans of both sides, no agreed row) and after kill -9; a local edit
    made after the deletion is a new change and travels again."""
    make_tree(pair.local, {".env": "TOKEN=1\n", "a.txt": "a\n", "cfg/.env": "NESTED=1\n"})
    s1 = pair.start(*PRESERVE)
    wait_quiescent(pair.local, pair.remote, s1, what="initial push")
    assert (pair.remote / ".env").read_text() == "TOKEN=1\n"

    os.unlink(pair.remote / ".env")
    os.unlink(pair.remote / "cfg" / ".env")
    _probe(pair, s1, "probe1.txt")
    assert (pair.local / ".env").read_text() == "TOKEN=1\n"
    assert (pair.local / "cfg" / ".env").read_text() == "NESTED=1\n"
    assert not (pair.remote / ".env").exists() and not (pair.remote / "cfg" / ".env").exists()
    s1.stop()

    # A clean restart: the full scans see .env on the local side only.
    s2 = pair.start(*PRESERVE)
    _probe(pair, s2, "probe2.txt")
    assert not (pair.remote / ".env").exists(), s2.stdout()
    assert not (pair.remote / "cfg" / ".env").exists(), s2.stdout()
    assert _sent(s2, ".env") == [] and _sent(s2, "cfg/.env") == [], s2.stdout()
    kill9(s2)

    # Killed, then started again: the marker was in the base on disk.
    s3 = pair.start(*PRESERVE)
    _probe(pair, s3, "probe3.txt")
    assert not (pair.remote / ".env").exists() and not (pair.remote / "cfg" / ".env").exists(), s3.stdout()
    assert (pair.local / ".env").read_text() == "TOKEN=1\n"

    # Edited locally after the remote's deletion: a new local change, it is sent.
    (pair.local / ".env").write_text("TOKEN=2\n")
    wait_until(lambda: (pair.remote / ".env").exists(), 15, session=s3, message=".env edited locally to be sent")
    wait_quiescent(pair.local, pair.remote, s3, keep=lambda p: p != "cfg/.env", what="local edit sent")
    assert (pair.remote / ".env").read_text() == "TOKEN=2\n"
    # The file that was not edited stays local-only.
    assert not (pair.remote / "cfg" / ".env").exists()
    # Once sent again, .env is synced like any file: a remote edit comes back.
    (pair.remote / ".env").write_text("TOKEN=3\n")
    wait_until(lambda: (pair.local / ".env").read_text() == "TOKEN=3\n", 15, session=s3,
               message="remote edit of .env to arrive")
    assert_idle(s3)
    s3.stop()


def test_pull_mode_remote_is_the_truth_except_preserved(pair: Pair) -> None:
    make_tree(pair.remote, {"a.txt": "A\n", "src/b.txt": "B\n"})
    make_tree(pair.local, {".env": "SECRET=1\n", "junk.txt": "local only\n", "a.txt": "local a\n"})
    s = pair.start("--mode", "pull", *PRESERVE)
    keep = lambda p: p != ".env" and not p.startswith(".claude")  # noqa: E731
    wait_quiescent(pair.local, pair.remote, s, keep=keep, what="initial pull")
    assert content_tree(pair.local) == {".env": "SECRET=1\n", "a.txt": "A\n", "src": DIR_MARK, "src/b.txt": "B\n"}
    assert content_tree(pair.remote) == {"a.txt": "A\n", "src": DIR_MARK, "src/b.txt": "B\n"}

    # A local edit is overwritten by the remote's version; a local creation is removed.
    (pair.local / "a.txt").write_text("edited locally\n")
    (pair.local / "src" / "new-local.txt").write_text("x\n")
    # Preserved paths created locally stay local: neither sent nor deleted.
    (pair.local / ".claude").mkdir()
    (pair.local / ".claude" / "settings.json").write_text("{}\n")
    wait_until(lambda: (pair.local / "a.txt").read_text() == "A\n"
               and not (pair.local / "src" / "new-local.txt").exists(), 15, session=s,
               message=lambda: f"local edits reverted: {content_tree(pair.local)}")
    # Remote changes arrive as usual.
    (pair.remote / "src" / "b.txt").write_text("B2\n")
    (pair.remote / "c.txt").write_text("C\n")
    wait_quiescent(pair.local, pair.remote, s, keep=keep, what="remote edits pulled")
    assert content_tree(pair.local) == {".env": "SECRET=1\n", "a.txt": "A\n", "c.txt": "C\n", "src": DIR_MARK,
                                        "src/b.txt": "B2\n", ".claude": DIR_MARK, ".claude/settings.json": "{}\n"}
    assert not (pair.remote / ".env").exists() and not (pair.remote / ".claude").exists()
    # Nothing ever travelled towards the remote.
    assert [ln for ln in s.stdout_lines() if ln.startswith("->")] == []
    assert_idle(s)
    s.stop()


def test_push_mode_local_is_the_truth_except_ignored(pair: Pair) -> None:
    make_tree(pair.local, {"a.txt": "A\n", "src/b.txt": "B\n", "src/c.txt": "C\n"})
    make_tree(pair.remote, {"stale.txt": "remote only\n", "a.txt": "remote a\n"})
    s = pair.start("--mode", "push", "--ignore", "*.log")
    wait_quiescent(pair.local, pair.remote, s, what="initial push")
    assert content_tree(pair.remote) == content_tree(pair.local) == {
        "a.txt": "A\n", "src": DIR_MARK, "src/b.txt": "B\n", "src/c.txt": "C\n"}

    # The remote edits, creates, deletes: all of it is undone.
    (pair.remote / "a.txt").write_text("changed on the remote\n")
    (pair.remote / "new-remote.txt").write_text("n\n")
    (pair.remote / "src" / "b.txt").unlink()
    (pair.remote / "src" / "c.txt").unlink()
    # ...except ignored paths, which are neither sent nor deleted.
    (pair.remote / "agent.log").write_text("log\n")
    keep = lambda p: not p.endswith(".log")  # noqa: E731
    wait_quiescent(pair.local, pair.remote, s, keep=keep, what="remote edits undone")
    assert content_tree(pair.remote) == {"a.txt": "A\n", "src": DIR_MARK, "src/b.txt": "B\n",
                                         "src/c.txt": "C\n", "agent.log": "log\n"}
    # Local changes go out as usual.
    (pair.local / "a.txt").write_text("A2\n")
    wait_quiescent(pair.local, pair.remote, s, keep=keep, what="local edit pushed")
    assert (pair.remote / "a.txt").read_text() == "A2\n"
    assert not (pair.local / "agent.log").exists()
    assert [ln for ln in s.stdout_lines() if ln.startswith("<-")] == []
    assert_idle(s)
    s.stop()


def test_conflict_listing_on_stdout(pair: Pair) -> None:
    make_tree(pair.local, {"notes.md": "v0\n", "src/app.py": "x = 0\n", "same.txt": "s\n"})
    s = pair.start()
    wait_quiescent(pair.local, pair.remote, s, what="initial push")
    s.stop()
    (pair.local / "notes.md").write_text("local notes\n")
    (pair.remote / "notes.md").write_text("remote notes\n")
    (pair.local / "src" / "app.py").write_text("x = 'local'\n")
    (pair.remote / "src" / "app.py").write_text("x = 'remote'\n")
    (pair.local / "same.txt").write_text("same on both\n")
    (pair.remote / "same.txt").write_text("same on both\n")
    s2 = pair.start()
    wait_quiescent(pair.local, pair.remote, s2, what="conflicts settled")
    lines = sorted(normalise_conflict(ln) for ln in conflict_lines(s2))
    assert lines == [
        "!! conflict notes.md: remote wins, other version kept as notes.syncd-conflict-local-STAMP.md",
        "!! conflict src/app.py: remote wins, other version kept as src/app.syncd-conflict-local-STAMP.py",
    ], s2.stdout()
    # Each listed copy exists (on both sides by now) with the losing content.
    for line in conflict_lines(s2):
        copy = line.rsplit(" as ", 1)[1]
        for root in (pair.local, pair.remote):
            assert (root / copy).exists(), f"{copy} missing under {root}"
    tree = content_tree(pair.local)
    assert tree["notes.syncd-conflict-local-STAMP.md"] == "local notes\n"
    assert tree["src/app.syncd-conflict-local-STAMP.py"] == "x = 'local'\n"
    assert tree["notes.md"] == "remote notes\n" and tree["same.txt"] == "same on both\n"
    s2.stop()


@pytest.mark.parametrize("winner", ["remote", "local"])
def test_conflict_copy_name_already_taken_loses_nothing(pair: Pair, winner: str) -> None:
    """Conflict-copy names have one-second resolution: a path that conflicts twice within a
    second, or a file that happens to carry the name, makes the copy's name taken. The
    losing version must survive all the same (another name, or a retry), never be
    overwritten by the winner."""
    make_tree(pair.local, {"f.txt": "v0\n"})
    s = pair.start("--conflict-winner", winner)
    wait_quiescent(pair.local, pair.remote, s, what="initial push")
    s.stop()
    loser = "local" if winner == "remote" else "remote"
    (pair.local / "f.txt").write_text("L1\n")
    (pair.remote / "f.txt").write_text("R1\n")
    losing_root = pair.local if loser == "local" else pair.remote
    now = time.time()
    for dt in range(-2, 40):  # every name the next 40 s could give the conflict copy
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now + dt))
        (losing_root / f"f.syncd-conflict-{loser}-{stamp}.txt").write_text("an older conflict copy\n")
    s2 = pair.start("--conflict-winner", winner)
    wait_quiescent(pair.local, pair.remote, s2, timeout=15, what="conflict settled")
    lost = "L1\n" if loser == "local" else "R1\n"
    for root in (pair.local, pair.remote):
        assert lost in content_tree(root).values(), (
            f"the losing version {lost!r} is gone from {root.name}:\n{s2.stdout()}")
    s2.stop()


def test_remote_file_replacing_a_directory_that_holds_ignored_local_entries(pair: Pair) -> None:
    """The remote turns directory x into a file while x holds a local ignored file: the
    ignored file must survive, and syncd must neither spin nor litter the tree."""
    make_tree(pair.local, {"x/a.txt": "a\n", "keep.txt": "k\n"})
    s = pair.start("--ignore", "*.log")
    wait_quiescent(pair.local, pair.remote, s, what="initial push")
    (pair.local / "x" / "build.log").write_text("log\n")
    wait_quiescent(pair.local, pair.remote, s, keep=lambda p: not p.endswith(".log"), what="ignored file")
    shutil.rmtree(pair.remote / "x")
    (pair.remote / "x").write_text("now a file\n")
    time.sleep(1.0)
    assert (pair.local / "x" / "build.log").read_text() == "log\n"
    busy = ""
    try:
        wait_idle(s, timeout=3)
    except AssertionError as exc:
        busy = str(exc)[:300]
    litter = [p for p in content_tree(pair.local) if ".syncd-tmp" in p]
    assert litter == [], f"{len(litter)} temp files left in the local tree, e.g. {litter[:3]}"
    assert not busy, busy
    s.stop()
