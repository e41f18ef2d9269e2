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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import SyncProcess
from tests.e2e.twoway_util import (
    DIR_MARK,
    Pair,
    Tree,
    assert_idle,
    change_lines,
    conflict_lines,
    content_tree,
    make_tree,
    normalise_conflict,
    open_pair,
    remove,
    wait_idle,
    wait_quiescent,
)
from tests.sshd import SshServer


@pytest.fixture
def pair(sshd: SshServer, tmp_path: Path) -> Iterator[Pair]:
    yield from open_pair(sshd, tmp_path)


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
    # A known syncd bug (the row is then xfail and runs in a pair of its own, so that a
    # session that cannot converge does not hold up the other rows).
    bug: str = ""
    group: str = ""  # known-bug rows that may share one run (default: a run per row)


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
    # a directory renamed on one side while the other changed something inside it (regression:
    # the replaying side's observations inside the moved directory used to be dropped)
    *[Row(f"dir-renamed-{a}-file-{what}-{b}", {**K, "d": DIR_MARK, "d/a.txt": "a\n", "d/b.txt": "b\n"},
          ((("rename", "d", "e"),) if a == "local" else ops),
          ((("rename", "d", "e"),) if a == "remote" else ops),
          {**K, "e": DIR_MARK, **expect})
      for a, b in (("local", "remote"), ("remote", "local"))
      for what, ops, expect in (
          ("deleted", (("rm", "d/a.txt"),), {"e/b.txt": "b\n"}),
          ("modified", (("write", "d/a.txt", "X1\n"),), {"e/a.txt": "X1\n", "e/b.txt": "b\n"}),
          ("added", (("write", "d/new.txt", "N\n"),), {"e/a.txt": "a\n", "e/b.txt": "b\n", "e/new.txt": "N\n"}),
      )],
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
    idle: str = ""  # why syncd did not go idle once converged


def _groups(winner: str) -> dict[str, list[Row]]:
    """Rows of a policy by run: "main" for the healthy ones, one run per known-bug row."""
    out: dict[str, list[Row]] = {}
    for row in ROWS:
        if winner in row.winners:
            out.setdefault(_group_of(row), []).append(row)
    return out


def _group_of(row: Row) -> str:
    return (row.group or row.id) if row.bug else "main"


def _run_matrix(server: SshServer, base: Path, winner: str, rows: list[Row]) -> MatrixRun:
    p = Pair(server, base)
    timeout = 5.0 if any(r.bug for r in rows) else 30.0
    try:
        (p.local / "top.txt").write_text("top\n")
        for row in rows:
            make_tree(p.local / row.id, row.initial)
        s1 = p.start("--conflict-winner", winner)
        wait_quiescent(p.local, p.remote, s1, what="initial sync")
        s1.stop()
        for row in rows:
            apply_ops(p.local / row.id, row.local)
            apply_ops(p.remote / row.id, row.remote)
        s2 = p.start("--conflict-winner", winner)
        diff = ""
        try:
            wait_quiescent(p.local, p.remote, s2, timeout=timeout, what="reconcile after restart")
        except AssertionError as exc:  # judged row by row below
            diff = str(exc)[:3000]
        idle = ""
        if not diff:
            try:
                wait_idle(s2)
            except AssertionError as exc:
                idle = str(exc)[:2000]
            s2.stop()
    finally:
        p.kill_all()
    a, b = content_tree(p.local, normalise=False), content_tree(p.remote, normalise=False)
    if a != b and not diff:
        diff = f"{a}\n!=\n{b}"
    return MatrixRun(p.local, p.remote, s2, a == b and not diff, diff, rows, idle)


@pytest.fixture(scope="module")
def matrix(sshd: SshServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str, str], MatrixRun]]:
    """``matrix(winner, group)``: one run of the rows of that policy and group, made once."""
    runs: dict[tuple[str, str], MatrixRun | BaseException] = {}

    def get(winner: str, group: str) -> MatrixRun:
        key = (winner, group)
        if key not in runs:
            try:
                runs[key] = _run_matrix(sshd, tmp_path_factory.mktemp(f"matrix-{winner}"), winner,
                                        _groups(winner)[group])
            except BaseException as exc:  # every row of the run fails the same way, once
                runs[key] = exc
        found = runs[key]
        if isinstance(found, BaseException):
            raise AssertionError(f"the matrix run {key} failed: {found}")
        return found

    yield get


def _param(winner: str, row: Row) -> Any:
    marks = [pytest.mark.xfail(reason=row.bug, strict=False)] if row.bug else []
    return pytest.param(winner, row, id=f"{winner}:{row.id}", marks=marks)


CASES = [_param(w, row) for w in WINNERS for row in ROWS if w in row.winners]


@pytest.mark.parametrize(("winner", "row"), CASES)
def test_change_matrix(matrix: Callable[[str, str], MatrixRun], winner: str, row: Row) -> None:
    run = matrix(winner, _group_of(row))
    local = content_tree(run.local / row.id)
    remote = content_tree(run.remote / row.id)
    out = run.session.stdout()[-3000:] + (f"\n{run.diff}" if run.diff else "")
    if row.contains:
        for side, tree in (("local", local), ("remote", remote)):
            for text in row.contains:
                assert text in tree.values(), f"{text!r} lost on the {side} side of {row.id}: {tree}\n{out}"
        assert local == remote, f"{row.id}: sides differ\n{local}\n{remote}\n{out}"
        assert not run.diff, out
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
def test_matrix_trees_identical(matrix: Callable[[str, str], MatrixRun], winner: str) -> None:
    """The healthy rows of each policy converge: both whole trees are identical."""
    run = matrix(winner, "main")
    assert run.trees_equal, run.diff
    assert not run.idle, run.idle
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


@pytest.mark.parametrize(("side", "delay"), [
    pytest.param("remote", 0.0, id="remote-at-once"),
    pytest.param("local", 0.0, id="local-at-once"),
    pytest.param("remote", 0.4, id="remote-later"),
    pytest.param("local", 0.4, id="local-later"),
])
def test_live_directory_renamed_then_recreated(pair: Pair, side: str, delay: float) -> None:
    """``mv d12 d23; mkdir d12; echo > d12/new.txt``: old files follow the rename, the new
    one stays at the old name, on both sides. (Regression: a directory replaced before the
    scan looked unchanged to a shallow scan; a cached descriptor of the renamed directory
    was used for the re-created one.)"""
    make_tree(pair.local, {"d12/f0.txt": "0\n", "d12/f1.txt": "1\n", "top.txt": "t\n"})
    s = pair.start()
    wait_quiescent(pair.local, pair.remote, s, what="initial push")
    root = pair.local if side == "local" else pair.remote
    os.rename(root / "d12", root / "d23")
    time.sleep(delay)
    (root / "d12").mkdir()
    (root / "d12" / "new.txt").write_text("new\n")
    want = {"d12": DIR_MARK, "d12/new.txt": "new\n", "d23": DIR_MARK, "d23/f0.txt": "0\n",
            "d23/f1.txt": "1\n", "top.txt": "t\n"}
    wait_quiescent(pair.local, pair.remote, s, timeout=4, what="rename and re-create")
    assert content_tree(pair.local) == want
    assert_idle(s)
    s.stop()


def test_live_pull_into_recreated_local_directory(pair: Pair) -> None:
    """Regression: a stale cached descriptor of the renamed directory made a pulled file
    land in the renamed directory instead of the re-created one."""
    make_tree(pair.local, {"d12/f0.txt": "0\n", "d12/f1.txt": "1\n"})
    s = pair.start()
    wait_quiescent(pair.local, pair.remote, s, what="initial push")
    os.rename(pair.local / "d12", pair.local / "d23")
    time.sleep(0.4)
    (pair.local / "d12").mkdir()
    wait_quiescent(pair.local, pair.remote, s, what="local rename and mkdir")
    (pair.remote / "d12" / "new.txt").write_text("from the agent\n")
    wait_quiescent(pair.local, pair.remote, s, timeout=4, what="pull into the re-created directory")
    assert (pair.local / "d12" / "new.txt").read_text() == "from the agent\n"
    assert not (pair.local / "d23" / "new.txt").exists()
    s.stop()


@pytest.mark.parametrize("order", ["move-first", "delete-first"])
@pytest.mark.parametrize("moved_by", ["remote", "local"])
def test_live_directory_moved_on_one_side_while_the_other_deletes_inside(pair: Pair, moved_by: str,
                                                                         order: str) -> None:
    """One side renames d17 to d25 while the other deletes d17/f1.txt at the same moment
    (before syncd has seen that deletion): the deletion must reach the moved directory.

    Regressions: the side that moved d17 was looked at because the other side reported
    d17/f1.txt, before its own events had arrived; lacking d17/f1.txt (moved away) it was
    taken for a deletion there too - the path forgotten (move first), or after a failed
    delete, d17 taken for deleted and removed on the other side (delete first) - and the
    move, seen next, brought d25/f1.txt back as a new file."""
    make_tree(pair.local, {"d17/f1.txt": "1\n", "d17/f2.txt": "2\n", "top.txt": "t\n"})
    s = pair.start()
    wait_quiescent(pair.local, pair.remote, s, what="initial push")
    mover, deleter = (pair.remote, pair.local) if moved_by == "remote" else (pair.local, pair.remote)
    if order == "move-first":
        os.rename(mover / "d17", mover / "d25")
        os.unlink(deleter / "d17" / "f1.txt")
    else:
        os.unlink(deleter / "d17" / "f1.txt")
        time.sleep(0.02)  # the deletion reaches syncd first; the move lands while it is applied
        os.rename(mover / "d17", mover / "d25")
    wait_quiescent(pair.local, pair.remote, s, timeout=10, what="move and delete")
    assert content_tree(pair.local) == {"d25": DIR_MARK, "d25/f2.txt": "2\n", "top.txt": "t\n"}
    s.stop()
