"""End-to-end: the two-way change matrix against the real ``syncd run`` over a real sshd.

Every row lives in its own directory of one shared tree. A session syncs the initial
tree, is stopped (SIGTERM), each row's local and remote edits are made while nothing
runs, and a restart with the same ``--state-dir`` reconciles both sides against the base
index. Each row is then checked on both sides. Running all rows in one pair of sessions
keeps the matrix fast; the rows are independent paths, so they do not interact.

The live tests at the end edit the remote tree while the session runs (the remote root is
a directory on this machine, reached through sshd).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import SyncProcess
from tests.e2e.twoway_util import (
    DIR_MARK,
    Pair,
    Tree,
    change_lines,
    conflict_lines,
    content_tree,
    make_tree,
    normalise_conflict,
    pair,  # noqa: F401  (fixture)
    remove,
    wait_quiescent,
)
from tests.sshd import SshServer

# Operations on one side: ("write", path, text) | ("rm", path) | ("mkdir", path)
# | ("mtime", path, seconds) | ("link", path, target)
Op = tuple[Any, ...]


@dataclass(frozen=True)
class Row:
    id: str
    initial: Tree
    local: tuple[Op, ...]
    remote: tuple[Op, ...]
    expect: Tree  # what both sides hold afterwards (conflict stamps normalised)
    conflict: tuple[str, str, str] | None = None  # (path, winner, loser copy) reported
    winners: tuple[str, ...] = ("remote",)  # policies this row runs under
    # Rows whose exact outcome is a matter of taste: instead of ``expect`` (left empty),
    # these file contents must each be somewhere in the row on both sides.
    contains: tuple[str, ...] = ()


def apply_ops(root: Path, ops: tuple[Op, ...]) -> None:
    for op in ops:
        kind, rel = op[0], op[1]
        path = root / rel
        if kind == "write":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(op[2])
        elif kind == "rm":
            remove(path)
        elif kind == "mkdir":
            path.mkdir(parents=True)
        elif kind == "mtime":
            os.utime(path, (op[2], op[2]))
        elif kind == "rename":
            os.rename(path, root / op[2])
        elif kind == "link":
            path.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(op[2], path)
        else:  # pragma: no cover
            raise ValueError(op)


K = {"keep.txt": "untouched\n"}  # every row has a file nobody edits
OLD, NEW = 1_700_000_000, 1_800_000_000  # mtimes for the "newer" policy

ROWS: list[Row] = [
    # one side changed
    Row("created-local", K, (("write", "new.txt", "L\n"),), (), {**K, "new.txt": "L\n"}),
    Row("created-remote", K, (), (("write", "new.txt", "R\n"),), {**K, "new.txt": "R\n"}),
    Row("created-nested-remote", K, (), (("write", "a/b/c.txt", "R\n"),),
        {**K, "a": DIR_MARK, "a/b": DIR_MARK, "a/b/c.txt": "R\n"}),
    Row("created-emptydir-remote", K, (), (("mkdir", "empty"),), {**K, "empty": DIR_MARK}),
    Row("created-symlink-remote", K, (), (("link", "ln", "keep.txt"),), {**K, "ln": ("link", "keep.txt")}),
    Row("modified-local", {**K, "f.txt": "v0\n"}, (("write", "f.txt", "L1\n"),), (), {**K, "f.txt": "L1\n"}),
    Row("modified-remote", {**K, "f.txt": "v0\n"}, (), (("write", "f.txt", "R1\n"),), {**K, "f.txt": "R1\n"}),
    Row("deleted-local", {**K, "f.txt": "v0\n"}, (("rm", "f.txt"),), (), K),
    Row("deleted-remote", {**K, "f.txt": "v0\n"}, (), (("rm", "f.txt"),), K),
    # both changed the same way: no conflict
    Row("both-created-same", K, (("write", "new.txt", "same\n"),), (("write", "new.txt", "same\n"),),
        {**K, "new.txt": "same\n"}),
    Row("both-modified-same", {**K, "f.txt": "v0\n"}, (("write", "f.txt", "same\n"),),
        (("write", "f.txt", "same\n"),), {**K, "f.txt": "same\n"}),
    Row("both-deleted", {**K, "f.txt": "v0\n"}, (("rm", "f.txt"),), (("rm", "f.txt"),), K),
    # both changed differently: a conflict, winner per policy, loser kept on the losing side
    Row("both-modified-remote-wins", {**K, "f.txt": "v0\n"}, (("write", "f.txt", "L1\n"),),
        (("write", "f.txt", "R1\n"),),
        {**K, "f.txt": "R1\n", "f.syncd-conflict-local-STAMP.txt": "L1\n"},
        conflict=("f.txt", "remote", "f.syncd-conflict-local-STAMP.txt")),
    Row("both-created-remote-wins", K, (("write", "n.txt", "L1\n"),), (("write", "n.txt", "R1\n"),),
        {**K, "n.txt": "R1\n", "n.syncd-conflict-local-STAMP.txt": "L1\n"},
        conflict=("n.txt", "remote", "n.syncd-conflict-local-STAMP.txt")),
    Row("both-modified-dotfile", {**K, ".env": "A=0\n"}, (("write", ".env", "A=L\n"),),
        (("write", ".env", "A=R\n"),),
        {**K, ".env": "A=R\n", ".env.syncd-conflict-local-STAMP": "A=L\n"},
        conflict=(".env", "remote", ".env.syncd-conflict-local-STAMP")),
    Row("both-modified-local-wins", {**K, "f.txt": "v0\n"}, (("write", "f.txt", "L1\n"),),
        (("write", "f.txt", "R1\n"),),
        {**K, "f.txt": "L1\n", "f.syncd-conflict-remote-STAMP.txt": "R1\n"},
        conflict=("f.txt", "local", "f.syncd-conflict-remote-STAMP.txt"), winners=("local",)),
    Row("both-created-local-wins", K, (("write", "n.txt", "L1\n"),), (("write", "n.txt", "R1\n"),),
        {**K, "n.txt": "L1\n", "n.syncd-conflict-remote-STAMP.txt": "R1\n"},
        conflict=("n.txt", "local", "n.syncd-conflict-remote-STAMP.txt"), winners=("local",)),
    Row("newer-local-wins", {**K, "f.txt": "v0\n"}, (("write", "f.txt", "L1\n"), ("mtime", "f.txt", NEW)),
        (("write", "f.txt", "R1\n"), ("mtime", "f.txt", OLD)),
        {**K, "f.txt": "L1\n", "f.syncd-conflict-remote-STAMP.txt": "R1\n"},
        conflict=("f.txt", "local", "f.syncd-conflict-remote-STAMP.txt"), winners=("newer",)),
    Row("newer-remote-wins", {**K, "f.txt": "v0\n"}, (("write", "f.txt", "L1\n"), ("mtime", "f.txt", OLD)),
        (("write", "f.txt", "R1\n"), ("mtime", "f.txt", NEW)),
        {**K, "f.txt": "R1\n", "f.syncd-conflict-local-STAMP.txt": "L1\n"},
        conflict=("f.txt", "remote", "f.syncd-conflict-local-STAMP.txt"), winners=("newer",)),
    # modify beats delete, both ways
    Row("modified-local-deleted-remote", {**K, "f.txt": "v0\n"}, (("write", "f.txt", "L1\n"),),
        (("rm", "f.txt"),), {**K, "f.txt": "L1\n"}),
    Row("deleted-local-modified-remote", {**K, "f.txt": "v0\n"}, (("rm", "f.txt"),),
        (("write", "f.txt", "R1\n"),), {**K, "f.txt": "R1\n"}),
    # type changes on one side
    Row("file-to-dir-local", {**K, "x": "was a file\n"}, (("rm", "x"), ("write", "x/inside.txt", "L\n")), (),
        {**K, "x": DIR_MARK, "x/inside.txt": "L\n"}),
    Row("file-to-dir-remote", {**K, "x": "was a file\n"}, (), (("rm", "x"), ("write", "x/inside.txt", "R\n")),
        {**K, "x": DIR_MARK, "x/inside.txt": "R\n"}),
    Row("dir-to-file-remote", {**K, "x": DIR_MARK, "x/a.txt": "a\n"}, (), (("rm", "x"), ("write", "x", "R\n")),
        {**K, "x": "R\n"}),
    # a directory deleted on one side while the other added or changed something inside
    Row("dir-deleted-local-added-remote", {**K, "d": DIR_MARK, "d/a.txt": "a\n", "d/b.txt": "b\n"},
        (("rm", "d"),), (("write", "d/new.txt", "R\n"),), {**K, "d": DIR_MARK, "d/new.txt": "R\n"}),
    Row("dir-deleted-remote-added-local", {**K, "d": DIR_MARK, "d/a.txt": "a\n", "d/b.txt": "b\n"},
        (("write", "d/new.txt", "L\n"),), (("rm", "d"),), {**K, "d": DIR_MARK, "d/new.txt": "L\n"}),
    Row("dir-deleted-remote-modified-local", {**K, "d": DIR_MARK, "d/a.txt": "a\n", "d/b.txt": "b\n"},
        (("write", "d/a.txt", "L1\n"),), (("rm", "d"),), {**K, "d": DIR_MARK, "d/a.txt": "L1\n"}),
    Row("both-created-dir-merged", K, (("write", "d/a.txt", "L\n"),), (("write", "d/b.txt", "R\n"),),
        {**K, "d": DIR_MARK, "d/a.txt": "L\n", "d/b.txt": "R\n"}),
    Row("both-created-file-vs-dir", K, (("write", "x/inside.txt", "L\n"),), (("write", "x", "R\n"),),
        {**K, "x": "R\n", "x.syncd-conflict-local-STAMP": DIR_MARK,
         "x.syncd-conflict-local-STAMP/inside.txt": "L\n"},
        conflict=("x", "remote", "x.syncd-conflict-local-STAMP")),
    Row("both-created-link-vs-file", K, (("link", "ln", "keep.txt"),), (("write", "ln", "R\n"),),
        {**K, "ln": "R\n", "ln.syncd-conflict-local-STAMP": ("link", "keep.txt")},
        conflict=("ln", "remote", "ln.syncd-conflict-local-STAMP")),
    Row("renamed-local-modified-remote", {**K, "f.txt": "v0\n"}, (("rename", "f.txt", "g.txt"),),
        (("write", "f.txt", "R1\n"),), {**K, "f.txt": "R1\n", "g.txt": "v0\n"}),
    Row("renamed-differently-both", {**K, "f.txt": "v0\n"}, (("rename", "f.txt", "g.txt"),),
        (("rename", "f.txt", "h.txt"),), {**K, "g.txt": "v0\n", "h.txt": "v0\n"}),
    Row("dir-to-file-remote-modified-inside-local", {**K, "d": DIR_MARK, "d/a.txt": "a\n"},
        (("write", "d/a.txt", "L1\n"),), (("rm", "d"), ("write", "d", "R\n")), {},
        contains=("L1\n", "R\n")),
    Row("nested-dir-deleted-local-added-remote",
        {**K, "d": DIR_MARK, "d/e": DIR_MARK, "d/e/a.txt": "a\n", "d/z.txt": "z\n"},
        (("rm", "d"),), (("write", "d/e/new.txt", "R\n"),),
        {**K, "d": DIR_MARK, "d/e": DIR_MARK, "d/e/new.txt": "R\n"}),
]

WINNERS = ("remote", "local", "newer")


@dataclass
class MatrixRun:
    local: Path
    remote: Path
    session: SyncProcess
    trees_equal: bool
    diff: str
    rows: list[Row] = field(default_factory=list)


def _rows_for(winner: str) -> list[Row]:
    return [r for r in ROWS if winner in r.winners]


def _run_matrix(server: SshServer, base: Path, winner: str, started: list[SyncProcess]) -> MatrixRun:
    p = Pair(server, base)
    rows = _rows_for(winner)
    (p.local / "top.txt").write_text("top\n")
    for row in rows:
        make_tree(p.local / row.id, row.initial)
    s1 = p.start("--conflict-winner", winner)
    started.append(s1)
    wait_quiescent(p.local, p.remote, s1, what="initial sync")
    s1.stop()
    for row in rows:
        apply_ops(p.local / row.id, row.local)
        apply_ops(p.remote / row.id, row.remote)
    s2 = p.start("--conflict-winner", winner)
    started.append(s2)
    wait_quiescent(p.local, p.remote, s2, what="reconcile after restart")
    s2.stop()
    a, b = content_tree(p.local, normalise=False), content_tree(p.remote, normalise=False)
    return MatrixRun(p.local, p.remote, s2, a == b, "" if a == b else f"{a}\n!=\n{b}", rows)


@pytest.fixture(scope="module")
def matrix(sshd: SshServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, MatrixRun]]:
    """``matrix[winner]``: one run of every row of that policy, made on first use."""
    runs: dict[str, MatrixRun] = {}
    started: list[SyncProcess] = []

    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, winner: str) -> MatrixRun:
            run = _run_matrix(sshd, tmp_path_factory.mktemp(f"matrix-{winner}"), winner, started)
            self[winner] = run
            return run

    lazy = Lazy(runs)
    yield lazy
    for proc in started:
        proc.kill()


CASES = [pytest.param(w, row, id=f"{w}:{row.id}") for w in WINNERS for row in _rows_for(w)]


@pytest.mark.parametrize(("winner", "row"), CASES)
def test_change_matrix(matrix: dict[str, MatrixRun], winner: str, row: Row) -> None:
    run = matrix[winner]
    local = content_tree(run.local / row.id)
    remote = content_tree(run.remote / row.id)
    out = run.session.stdout()
    if row.contains:
        for side, tree in (("local", local), ("remote", remote)):
            for text in row.contains:
                assert text in tree.values(), f"{text!r} lost on the {side} side of {row.id}: {tree}\n{out}"
        assert local == remote, f"{row.id}: sides differ\n{local}\n{remote}\n{out}"
        return
    assert local == row.expect, f"local side of {row.id}\nsyncd stdout:\n{out}"
    assert remote == row.expect, f"remote side of {row.id}\nsyncd stdout:\n{out}"
    mine = [normalise_conflict(line) for line in conflict_lines(run.session) if f" {row.id}/" in line]
    if row.conflict is None:
        assert mine == [], f"unexpected conflict for {row.id}: {mine}"
        return
    path, win, copy = row.conflict
    want = f"!! conflict {row.id}/{path}: {win} wins, other version kept as {row.id}/{copy}"
    assert mine == [want], f"conflict listing for {row.id}\nsyncd stdout:\n{out}"
    # The loser was kept on the losing side (then synced like any file).
    loser = "local" if win == "remote" else "remote"
    arrow = "<-" if loser == "local" else "->"
    kept = [normalise_conflict(ln) for ln in change_lines(run.session) if " keep " in ln]
    assert f"{arrow} {loser:6} keep   {row.id}/{path} as {row.id}/{copy}" in kept, out


@pytest.mark.parametrize("winner", WINNERS)
def test_matrix_trees_identical(matrix: dict[str, MatrixRun], winner: str) -> None:
    run = matrix[winner]
    assert run.trees_equal, run.diff
    assert (run.local / "top.txt").read_text() == "top\n"


# ---------------------------------------------------------------------------------------
# live: the session runs while the remote (the coding agent) edits
# ---------------------------------------------------------------------------------------


def test_live_remote_changes_arrive(pair: Pair) -> None:
    make_tree(pair.local, {"src": DIR_MARK, "src/a.py": "a = 1\n", "src/b.py": "b = 1\n",
                           "pkg": DIR_MARK, "pkg/m1.py": "m1\n", "pkg/m2.py": "m2\n", "README": "r\n"})
    s = pair.start()
    wait_quiescent(pair.local, pair.remote, s, what="initial push")
    L, R = pair.local, pair.remote

    def step(what: str) -> Tree:
        wait_quiescent(L, R, s, timeout=15, what=what)
        return content_tree(L)

    (R / "src" / "new.py").write_text("new = 1\n")
    assert step("remote create")["src/new.py"] == "new = 1\n"

    (R / "deep" / "er").mkdir(parents=True)
    (R / "deep" / "er" / "x.txt").write_text("x\n")
    tree = step("remote create in new directories")
    assert tree["deep/er/x.txt"] == "x\n"

    (R / "src" / "a.py").write_text("a = 2\n")
    assert step("remote modify")["src/a.py"] == "a = 2\n"

    os.unlink(R / "src" / "b.py")
    assert "src/b.py" not in step("remote delete")

    mark = len(s.stdout_lines())
    os.rename(R / "src" / "a.py", R / "src" / "renamed.py")
    tree = step("remote rename file")
    assert tree["src/renamed.py"] == "a = 2\n" and "src/a.py" not in tree
    assert any(" move " in ln and "src/a.py" in ln for ln in change_lines(s, mark)), \
        f"a rename should travel as a move, not as delete + put:\n{change_lines(s, mark)}"

    os.rename(R / "pkg", R / "pkg2")
    tree = step("remote rename directory")
    assert tree["pkg2/m1.py"] == "m1\n" and "pkg" not in tree

    (R / "empty").mkdir()
    assert step("remote mkdir")["empty"] == DIR_MARK

    remove(R / "deep")
    assert "deep" not in step("remote rmtree")

    os.chmod(R / "README", 0o755)
    step("remote chmod")
    assert os.stat(L / "README").st_mode & 0o777 == 0o755

    s.stop()


def test_live_local_and_remote_interleaved(pair: Pair) -> None:
    """Edits on both sides while the session runs, each waited for: nothing conflicts."""
    s = pair.start()
    L, R = pair.local, pair.remote
    for i in range(6):
        side, other = (L, R) if i % 2 == 0 else (R, L)
        (side / f"f{i}.txt").write_text(f"v{i}\n")
        wait_quiescent(L, R, s, timeout=15, what=f"edit {i}")
        assert (other / f"f{i}.txt").read_text() == f"v{i}\n"
    # Modify on the other side what the first side created.
    (R / "f0.txt").write_text("changed by remote\n")
    wait_quiescent(L, R, s, timeout=15, what="modify back")
    assert (L / "f0.txt").read_text() == "changed by remote\n"
    assert conflict_lines(s) == []
    s.stop()
