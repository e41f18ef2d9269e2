"""End-to-end: a git repository synced live (``.git`` included). Commits, a branch checkout
and a rebase on the remote, then a commit on the local side: after each step, once both
trees are quiescent, the other side has the same HEAD and refs, ``git fsck`` is clean, and
``git status --porcelain`` agrees.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.store import Store, list_conflicts
from tests.e2e.twoway_util import Pair, conflict_lines, content_tree, normalise_conflict, open_pair, wait_quiescent
from tests.sshd import SshServer

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


@pytest.fixture
def pair(sshd: SshServer, tmp_path: Path) -> Iterator[Pair]:
    yield from open_pair(sshd, tmp_path / "pair")


def git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update({"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "HOME": str(cwd.parent),
                "GIT_AUTHOR_DATE": "", "GIT_COMMITTER_DATE": ""})
    env = {k: v for k, v in env.items() if v != ""}
    result = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false",
         "-c", "init.defaultBranch=main", "-c", "gc.auto=0", "-c", "core.fsmonitor=false", *args],
        cwd=cwd, capture_output=True, text=True, env=env, check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} in {cwd} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def _state(repo: Path, refresh: bool = False) -> dict[str, str]:
    """HEAD, refs, fsck and status. Without *refresh* nothing is written (``git status``
    otherwise rewrites the index whenever its stat data is stale, as it is on the side
    that received the files)."""
    quiet = () if refresh else ("--no-optional-locks",)
    fsck = git(repo, "fsck", "--no-progress", "--full", check=False)
    bad = [ln for ln in (fsck.stdout + fsck.stderr).splitlines()
           if ln and not ln.startswith(("dangling", "notice"))]
    return {
        "HEAD": git(repo, "rev-parse", "HEAD").stdout.strip(),
        "symbolic": git(repo, "symbolic-ref", "-q", "HEAD", check=False).stdout.strip(),
        "refs": git(repo, "for-each-ref", "--format=%(refname) %(objectname)").stdout,
        "fsck": f"exit {fsck.returncode}; " + "\n".join(bad),
        "status": git(repo, *quiet, "status", "--porcelain", "--untracked-files=all").stdout,
    }


def _agree(pair: Pair, what: str, expect_head: str | None = None) -> dict[str, str]:
    s = pair.sessions[-1]
    wait_quiescent(pair.local, pair.remote, s, timeout=30, what=what)
    # A plain `git status` on each side, as a user would run it: it refreshes the index.
    # Let that settle too (were the next step to start meanwhile, its index write and the
    # refresh would be a genuine both-sides conflict), then compare without writing.
    _state(pair.local, refresh=True)
    _state(pair.remote, refresh=True)
    wait_quiescent(pair.local, pair.remote, s, timeout=30, what=f"{what} (index refresh)")
    local, remote = _state(pair.local), _state(pair.remote)
    assert local["fsck"] == "exit 0; ", f"{what}: local fsck\n{local['fsck']}"
    assert remote["fsck"] == "exit 0; ", f"{what}: remote fsck\n{remote['fsck']}"
    assert local == remote, f"{what}: the repositories differ\nlocal={local}\nremote={remote}"
    assert local["status"] == "", f"{what}: not clean: {local['status']}"
    if expect_head is not None:
        assert local["HEAD"] == expect_head
    return local


def _commit(repo: Path, name: str, text: str, message: str) -> str:
    (repo / name).parent.mkdir(parents=True, exist_ok=True)
    (repo / name).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD").stdout.strip()


def test_git_repository_survives_commits_checkout_and_rebase(pair: Pair) -> None:
    repo_l, repo_r = pair.local, pair.remote
    git(repo_l, "init", "-q")
    (repo_l / ".gitignore").write_text("*.pyc\n")
    _commit(repo_l, "src/app.py", "print('v1')\n", "initial")
    _commit(repo_l, "README.md", "# project\n", "readme")
    pair.start()
    _agree(pair, "initial push")

    # The agent commits on the remote.
    head = _commit(repo_r, "src/app.py", "print('v2')\n", "remote: v2")
    _agree(pair, "remote commit", head)

    # The agent works on a branch, then goes back to main.
    git(repo_r, "checkout", "-q", "-b", "other")
    other = _commit(repo_r, "src/feature.py", "feature = 1\n", "remote: feature on other")
    git(repo_r, "checkout", "-q", "main")
    state = _agree(pair, "branch, commit, checkout main", head)
    assert f"refs/heads/other {other}" in state["refs"]
    assert not (repo_l / "src" / "feature.py").exists()

    # main moves on; the branch is rebased onto it (the agent stays on the branch).
    main2 = _commit(repo_r, "docs/notes.md", "notes\n", "remote: notes on main")
    git(repo_r, "checkout", "-q", "other")
    git(repo_r, "rebase", "-q", "main")
    rebased = git(repo_r, "rev-parse", "HEAD").stdout.strip()
    assert rebased != other
    state = _agree(pair, "rebase", rebased)
    assert state["symbolic"] == "refs/heads/other"
    assert f"refs/heads/main {main2}" in state["refs"]
    assert (repo_l / "src" / "feature.py").read_text() == "feature = 1\n"

    # The user commits on the local side.
    mine = _commit(repo_l, "src/app.py", "print('v3 local')\n", "local: v3")
    _agree(pair, "local commit", mine)
    assert git(repo_r, "log", "-1", "--format=%s").stdout.strip() == "local: v3"
    # A file ignored by the repository's .gitignore stays on its side (syncd honours it too).
    (repo_r / "src" / "cache.pyc").write_bytes(b"\0junk")
    wait_quiescent(repo_l, repo_r, pair.sessions[-1], keep=lambda p: not p.endswith(".pyc"), what="ignored file")
    assert not (repo_l / "src" / "cache.pyc").exists()
    assert git(repo_r, "status", "--porcelain").stdout == ""
    pair.sessions[-1].stop()


@pytest.mark.parametrize("newer", ["local", "remote"])
def test_git_internal_conflict_newer_wins_without_conflict_copies(pair: Pair, newer: str) -> None:
    """Both sides stage different files while syncd is stopped: ``.git/index`` (and the
    ORIG_HEAD-like churn files) conflict. The newer version wins and nothing is left inside
    ``.git`` but git's own files; the conflict is still listed. A conflict outside ``.git``
    keeps its conflict copy as before."""
    repo_l, repo_r = pair.local, pair.remote
    git(repo_l, "init", "-q")
    _commit(repo_l, "README.md", "# project\n", "initial")
    pair.start()
    _agree(pair, "initial push")
    pair.sessions[-1].stop()

    (repo_l / "local.txt").write_text("staged locally\n")
    git(repo_l, "add", "local.txt")
    (repo_l / "README.md").write_text("# local readme\n")
    (repo_r / "remote.txt").write_text("staged remotely\n")
    git(repo_r, "add", "remote.txt")
    (repo_r / "README.md").write_text("# remote readme\n")
    winner, loser = (repo_l, repo_r) if newer == "local" else (repo_r, repo_l)
    now = time.time()
    os.utime(loser / ".git" / "index", (now - 60, now - 60))
    os.utime(winner / ".git" / "index", (now, now))
    index = (winner / ".git" / "index").read_bytes()

    s = pair.start()
    wait_quiescent(repo_l, repo_r, s, timeout=30, what="conflicts settled")
    for root in (repo_l, repo_r):
        litter = [p for p in _all_paths(root / ".git") if ".syncd-conflict" in p]
        assert litter == [], f"conflict copies inside .git on {root.name}: {litter}\n{s.stdout()}"
        assert (root / ".git" / "index").read_bytes() == index
    lines = [normalise_conflict(ln) for ln in conflict_lines(s)]
    assert f"!! conflict .git/index: {newer} wins, other version replaced (inside .git: no conflict copy)" \
        in lines, s.stdout()
    # Outside .git nothing changed: the losing README is kept as a conflict copy (remote wins).
    assert "!! conflict README.md: remote wins, other version kept as README.syncd-conflict-local-STAMP.md" \
        in lines, s.stdout()
    assert content_tree(repo_l)["README.syncd-conflict-local-STAMP.md"] == "# local readme\n"
    # Both object files are there (content-addressed: they never conflict); the repository is sound.
    staged = "local.txt" if newer == "local" else "remote.txt"
    for root in (repo_l, repo_r):
        fsck = git(root, "fsck", "--no-progress", "--full", check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        assert git(root, "--no-optional-locks", "diff", "--cached", "--name-only").stdout.split() == [staged]
        for name, text in (("local.txt", "staged locally\n"), ("remote.txt", "staged remotely\n")):
            blob = git(root, "hash-object", name).stdout.strip()
            assert git(root, "cat-file", "-p", blob).stdout == text
    s.stop()
    # The conflict list (what `syncd conflicts` shows) has it, with no copy.
    (index_db,) = (pair.state / "sessions").glob("*.sqlite")
    store = Store(str(index_db))
    try:
        listed = {(c.path, c.winner, c.copy) for c in list_conflicts(store)}
    finally:
        store.close()
    assert (".git/index", newer, "") in listed, listed


def _all_paths(root: Path) -> list[str]:
    return [os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files]
