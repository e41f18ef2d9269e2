"""Table-driven tests of the pure engine: reconcile, detect_moves, rekey, conflict_name.

No filesystem, no network. Entries carry per-side inode numbers: each path has one inode
on the local side and another on the remote side, as in real life.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import pytest

from syncd.engine.index import BaseIndex
from syncd.engine.model import (
    ASIDE,
    COPY,
    DELETE,
    META_ONLY,
    MOVE,
    Action,
    Agreed,
    Plan,
    Policy,
    agreed_from,
    kept_local,
)
from syncd.engine.reconcile import (
    conflict_name,
    detect_moves,
    expand_absent,
    is_git_internal,
    needs_digest,
    reconcile,
    rekey,
)
from syncd.protocol.messages import DIR, FILE, SYMLINK, Entry
from syncd.rules import Rules
from syncd.scan import digest_bytes

STAMP = "20240102T030405Z"
T0 = 1_700_000_000_000_000_000
T1 = T0 + 1_000_000_000
T2 = T0 + 2_000_000_000


def ino(path: str, side: str) -> int:
    return zlib.crc32(path.encode("utf-8", "surrogateescape")) * 2 + (1 if side == "local" else 2)


def f(path: str, content: str = "v0", mode: int = 0o644, mtime: int = T0, side: str = "local",
      inode: int | None = None, digest: Any = "auto") -> Entry:
    data = content.encode()
    return Entry(path, FILE, mode, len(data), mtime, ino(path, side) if inode is None else inode,
                 digest_bytes(data) if digest == "auto" else digest, None)


def d(path: str, mode: int = 0o755, mtime: int = T0, side: str = "local", inode: int | None = None) -> Entry:
    return Entry(path, DIR, mode, 0, mtime, ino(path, side) if inode is None else inode, None, None)


def ln(path: str, target: str, side: str = "local", inode: int | None = None) -> Entry:
    return Entry(path, SYMLINK, 0o777, 0, T0, ino(path, side) if inode is None else inode, None, target)


def on(side: str, entry: Entry) -> Entry:
    """The same entry as held by ``side`` (its inode there)."""
    return entry._replace(ino=ino(entry.path, side))


def agreed(entry: Entry) -> Agreed:
    return agreed_from(entry, ino(entry.path, "local"), ino(entry.path, "remote"))


def base_of(*entries: Entry, kept: tuple[Entry, ...] = ()) -> BaseIndex:
    """Agreed rows for ``entries``; local-only markers for the local entries ``kept``."""
    return BaseIndex([*(agreed(e) for e in entries), *(kept_local(e) for e in kept)])


def policy(mode: str = "two-way", winner: str = "remote", preserve: tuple[str, ...] = ()) -> Policy:
    return Policy(mode, winner, Rules(preserve_absent=preserve).is_preserved, STAMP)


def summary(plan: Plan) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for a in plan.actions:
        out.append((a.side, a.kind, a.path, a.dest) if a.dest else (a.side, a.kind, a.path))
    return out


def cname(path: str, side: str) -> str:
    return conflict_name(path, side, STAMP)


BASE_TREE = (f("a.txt", "v0"), d("dir"), f("dir/b.txt", "b0"), f("run.sh", "echo", 0o644), ln("l", "a.txt"))
GIT_TREE = (*BASE_TREE, d(".git"), f(".git/index", "i0"), f(".git/HEAD", "ref: main"), d(".git/refs"),
            d(".git/refs/heads"), f(".git/refs/heads/main", "c1"), f(".git/refs/heads/x", "c1"))
ENV = f(".env", "secret")  # a preserved local file the remote deleted (kept local-only)
PRESERVE_ENV = policy(preserve=(".env",))


@dataclass
class Case:
    name: str
    local: dict[str, Entry | None]
    remote: dict[str, Entry | None]
    actions: list[tuple[str, ...]]
    records: dict[str, str | None] = field(default_factory=dict)  # path -> "row" | "kept" | None
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # (path, winner)
    base: tuple[Entry, ...] = BASE_TREE
    policy: Policy = field(default_factory=policy)
    kept: tuple[Entry, ...] = ()  # local entries under a local-only marker in the base
    unconfirmed: dict[str, tuple[str, ...]] = field(default_factory=dict)  # side -> absences not reported
    deferred: tuple[str, ...] = ()


CASES = [
    # -- nothing changed ---------------------------------------------------------------------
    Case("unchanged", {"a.txt": f("a.txt")}, {"a.txt": on("remote", f("a.txt"))}, []),
    Case("unobserved", {}, {}, []),
    Case("unchanged-dir", {"dir": d("dir")}, {}, []),
    # -- one side changed ----------------------------------------------------------------------
    Case("local-created", {"new.txt": f("new.txt", "n")}, {}, [("remote", COPY, "new.txt")]),
    Case("remote-created", {}, {"new.txt": f("new.txt", "n", side="remote")}, [("local", COPY, "new.txt")]),
    Case("local-modified", {"a.txt": f("a.txt", "v1", mtime=T1)}, {}, [("remote", COPY, "a.txt")]),
    Case("remote-modified", {}, {"a.txt": f("a.txt", "v1", mtime=T1, side="remote")},
         [("local", COPY, "a.txt")]),
    Case("local-deleted", {"a.txt": None}, {}, [("remote", DELETE, "a.txt")]),
    Case("remote-deleted", {}, {"a.txt": None}, [("local", DELETE, "a.txt")]),
    Case("local-created-dir", {"nd": d("nd")}, {}, [("remote", COPY, "nd")]),
    Case("local-created-link", {"nl": ln("nl", "x")}, {}, [("remote", COPY, "nl")]),
    Case("local-retargeted-link", {"l": ln("l", "dir")}, {}, [("remote", COPY, "l")]),
    Case("remote-deleted-link", {}, {"l": None}, [("local", DELETE, "l")]),
    # -- metadata only ---------------------------------------------------------------------------
    Case("local-chmod-x", {"run.sh": f("run.sh", "echo", 0o755)}, {}, [("remote", META_ONLY, "run.sh")]),
    Case("remote-touch", {}, {"run.sh": f("run.sh", "echo", mtime=T1, side="remote")},
         [("local", META_ONLY, "run.sh")]),
    Case("remote-dir-chmod", {}, {"dir": d("dir", 0o700, side="remote")}, [("local", META_ONLY, "dir")]),
    # -- both changed ----------------------------------------------------------------------------
    Case("both-created-identical", {"n": f("n", "same")}, {"n": f("n", "same", side="remote")}, [],
         records={"n": "row"}),
    Case("both-modified-identical", {"a.txt": f("a.txt", "v1", mtime=T1)},
         {"a.txt": f("a.txt", "v1", mtime=T1, side="remote")}, [], records={"a.txt": "row"}),
    Case("both-created-same-content-other-mode", {"n": f("n", "same", 0o755)},
         {"n": f("n", "same", 0o644, side="remote")}, [("local", META_ONLY, "n")]),
    Case("both-created-dirs", {"nd": d("nd")}, {"nd": d("nd", side="remote")}, [], records={"nd": "row"}),
    Case("both-deleted", {"a.txt": None}, {"a.txt": None}, [], records={"a.txt": None}),
    Case("both-modified-remote-wins", {"a.txt": f("a.txt", "mine", mtime=T2)},
         {"a.txt": f("a.txt", "theirs", mtime=T1, side="remote")},
         [("local", ASIDE, "a.txt", cname("a.txt", "local")), ("local", COPY, "a.txt")],
         conflicts=[("a.txt", "remote")]),
    Case("both-modified-local-wins", {"a.txt": f("a.txt", "mine", mtime=T1)},
         {"a.txt": f("a.txt", "theirs", mtime=T2, side="remote")},
         [("remote", ASIDE, "a.txt", cname("a.txt", "remote")), ("remote", COPY, "a.txt")],
         conflicts=[("a.txt", "local")], policy=policy(winner="local")),
    Case("both-modified-newer-local", {"a.txt": f("a.txt", "mine", mtime=T2)},
         {"a.txt": f("a.txt", "theirs", mtime=T1, side="remote")},
         [("remote", ASIDE, "a.txt", cname("a.txt", "remote")), ("remote", COPY, "a.txt")],
         conflicts=[("a.txt", "local")], policy=policy(winner="newer")),
    Case("both-modified-newer-remote", {"a.txt": f("a.txt", "mine", mtime=T1)},
         {"a.txt": f("a.txt", "theirs", mtime=T2, side="remote")},
         [("local", ASIDE, "a.txt", cname("a.txt", "local")), ("local", COPY, "a.txt")],
         conflicts=[("a.txt", "remote")], policy=policy(winner="newer")),
    Case("both-modified-newer-tie-remote", {"a.txt": f("a.txt", "mine", mtime=T1)},
         {"a.txt": f("a.txt", "theirs", mtime=T1, side="remote")},
         [("local", ASIDE, "a.txt", cname("a.txt", "local")), ("local", COPY, "a.txt")],
         conflicts=[("a.txt", "remote")], policy=policy(winner="newer")),
    Case("both-created-differently", {"n.md": f("n.md", "mine")}, {"n.md": f("n.md", "theirs", side="remote")},
         [("local", ASIDE, "n.md", cname("n.md", "local")), ("local", COPY, "n.md")],
         conflicts=[("n.md", "remote")]),
    Case("both-retargeted-link", {"l": ln("l", "x")}, {"l": ln("l", "y", side="remote")},
         [("local", ASIDE, "l", cname("l", "local")), ("local", COPY, "l")], conflicts=[("l", "remote")]),
    Case("file-vs-dir-created-dir-loses", {"n": d("n")}, {"n": f("n", "theirs", side="remote")},
         [("local", ASIDE, "n", cname("n", "local")), ("local", COPY, "n")], conflicts=[("n", "remote")]),
    Case("losing-dir-takes-its-children-along", {"n": d("n"), "n/x": f("n/x")}, {"n": f("n", "t", side="remote")},
         [("local", ASIDE, "n", cname("n", "local")), ("local", COPY, "n")], conflicts=[("n", "remote")]),
    Case("winning-dir-brings-its-children", {"n": d("n"), "n/x": f("n/x")}, {"n": f("n", "t", side="remote")},
         [("remote", ASIDE, "n", cname("n", "remote")), ("remote", COPY, "n"), ("remote", COPY, "n/x")],
         conflicts=[("n", "local")], policy=policy(winner="local")),
    Case("file-became-dir-vs-modified-dir-loses",
         {"a.txt": d("a.txt"), "a.txt/x": f("a.txt/x")}, {"a.txt": f("a.txt", "v9", side="remote")},
         [("local", ASIDE, "a.txt", cname("a.txt", "local")), ("local", COPY, "a.txt")],
         conflicts=[("a.txt", "remote")]),
    Case("chmod-dir-vs-dir-became-file", {"dir": d("dir", 0o700)}, {"dir": f("dir", "t", side="remote")},
         [("local", ASIDE, "dir", cname("dir", "local")), ("local", COPY, "dir")],
         records={"dir/b.txt": None}, conflicts=[("dir", "remote")]),
    # -- modify beats delete -------------------------------------------------------------------------
    Case("modified-local-deleted-remote", {"a.txt": f("a.txt", "v1", mtime=T1)}, {"a.txt": None},
         [("remote", COPY, "a.txt")]),
    Case("deleted-local-modified-remote", {"a.txt": None}, {"a.txt": f("a.txt", "v1", side="remote")},
         [("local", COPY, "a.txt")]),
    Case("chmod-local-deleted-remote", {"run.sh": f("run.sh", "echo", 0o755)}, {"run.sh": None},
         [("remote", COPY, "run.sh")]),
    # -- type changes ----------------------------------------------------------------------------------
    Case("local-file-became-dir", {"a.txt": d("a.txt"), "a.txt/x": f("a.txt/x", "x")}, {},
         [("remote", COPY, "a.txt"), ("remote", COPY, "a.txt/x")]),
    Case("remote-dir-became-file", {}, {"dir": f("dir", "now a file", side="remote")},
         [("local", DELETE, "dir/b.txt"), ("local", COPY, "dir")]),
    Case("local-file-became-link", {"a.txt": ln("a.txt", "run.sh")}, {}, [("remote", COPY, "a.txt")]),
    # -- directories ----------------------------------------------------------------------------------
    Case("local-deleted-dir", {"dir": None}, {},
         [("remote", DELETE, "dir/b.txt"), ("remote", DELETE, "dir")]),
    Case("dir-deleted-local-file-added-remote", {"dir": None}, {"dir/new.txt": f("dir/new.txt", "n", side="remote")},
         [("remote", DELETE, "dir/b.txt"), ("local", COPY, "dir"), ("local", COPY, "dir/new.txt")]),
    Case("dir-deleted-remote-file-added-local", {"dir/new.txt": f("dir/new.txt", "n")}, {"dir": None},
         [("local", DELETE, "dir/b.txt"), ("remote", COPY, "dir"), ("remote", COPY, "dir/new.txt")]),
    Case("dir-deleted-local-file-modified-remote", {"dir": None},
         {"dir/b.txt": f("dir/b.txt", "b1", side="remote")},
         [("local", COPY, "dir"), ("local", COPY, "dir/b.txt")]),
    Case("dir-deleted-local-dir-chmod-remote", {"dir": None}, {"dir": d("dir", 0o700, side="remote")},
         [("remote", DELETE, "dir/b.txt"), ("local", COPY, "dir")]),
    Case("new-tree-parents-first", {"x": d("x"), "x/y": d("x/y"), "x/y/z.txt": f("x/y/z.txt"), "b.txt": f("b.txt"),
                                    "x/a.txt": f("x/a.txt")}, {},
         [("remote", COPY, "x"), ("remote", COPY, "x/y"), ("remote", COPY, "b.txt"), ("remote", COPY, "x/a.txt"),
          ("remote", COPY, "x/y/z.txt")]),
    Case("deep-delete-children-first",
         {"t": None}, {},
         [("remote", DELETE, "t/u/v/w.txt"), ("remote", DELETE, "t/u/v"), ("remote", DELETE, "t/u/x.txt"),
          ("remote", DELETE, "t/u"), ("remote", DELETE, "t")],
         base=(d("t"), d("t/u"), d("t/u/v"), f("t/u/v/w.txt"), f("t/u/x.txt"))),
    Case("aside-delete-copy-meta-order",
         {"a.txt": f("a.txt", "mine"), "gone.txt": None, "new.txt": f("new.txt", "n"), "run.sh": None},
         {"a.txt": f("a.txt", "theirs", side="remote"), "run.sh": f("run.sh", "echo", 0o755, side="remote"),
          "dir": d("dir", 0o711, side="remote")},
         [("local", ASIDE, "a.txt", cname("a.txt", "local")), ("remote", DELETE, "gone.txt"),
          ("local", COPY, "a.txt"), ("remote", COPY, "new.txt"), ("local", COPY, "run.sh"),
          ("local", META_ONLY, "dir")],
         conflicts=[("a.txt", "remote")],
         base=(*BASE_TREE, f("gone.txt"))),
    # -- preserve-absent ----------------------------------------------------------------------------
    Case("two-way-preserved-not-deleted", {}, {".env": None}, [], records={".env": "kept"},
         base=(*BASE_TREE, f(".env", "secret")), policy=policy(preserve=(".env",))),
    Case("two-way-preserved-dir-content-not-deleted", {}, {".claude": None},
         [],
         records={".claude": "kept", ".claude/settings.json": "kept"},
         base=(*BASE_TREE, d(".claude"), f(".claude/settings.json")), policy=policy(preserve=(".claude/",))),
    Case("two-way-unpreserved-deleted", {}, {".env": None}, [("local", DELETE, ".env")],
         base=(*BASE_TREE, f(".env", "secret")), policy=policy(preserve=("*.key",))),
    Case("preserved-remote-side-is-deleted", {".env": None}, {}, [("remote", DELETE, ".env")],
         base=(*BASE_TREE, f(".env", "secret")), policy=policy(preserve=(".env",))),
    # -- pull: the remote is the truth ----------------------------------------------------------
    Case("pull-remote-modified", {}, {"a.txt": f("a.txt", "v1", side="remote")}, [("local", COPY, "a.txt")],
         policy=policy("pull")),
    Case("pull-local-modified-is-reverted", {"a.txt": f("a.txt", "v1")}, {}, [("local", COPY, "a.txt")],
         policy=policy("pull")),
    Case("pull-local-created-is-deleted", {"new.txt": f("new.txt")}, {}, [("local", DELETE, "new.txt")],
         policy=policy("pull")),
    Case("pull-local-created-preserved", {".env": f(".env")}, {}, [], records={".env": "kept"},
         policy=policy("pull", preserve=(".env",))),
    Case("pull-remote-deleted-preserved", {}, {".env": None}, [], records={".env": "kept"},
         base=(*BASE_TREE, f(".env", "secret")), policy=policy("pull", preserve=(".env",))),
    Case("pull-local-deleted-is-restored", {"a.txt": None}, {}, [("local", COPY, "a.txt")], policy=policy("pull")),
    Case("pull-local-chmod-reverted", {"run.sh": f("run.sh", "echo", 0o755)}, {},
         [("local", META_ONLY, "run.sh")], policy=policy("pull")),
    Case("pull-equal", {"n": f("n", "s")}, {"n": f("n", "s", side="remote")}, [], records={"n": "row"},
         policy=policy("pull")),
    # -- push: the local side is the truth -----------------------------------------------------------
    Case("push-local-created", {"new.txt": f("new.txt")}, {}, [("remote", COPY, "new.txt")],
         policy=policy("push")),
    Case("push-remote-created-is-deleted", {}, {"r.txt": f("r.txt", side="remote")},
         [("remote", DELETE, "r.txt")], policy=policy("push")),
    Case("push-remote-modified-is-reverted", {}, {"a.txt": f("a.txt", "v1", side="remote")},
         [("remote", COPY, "a.txt")], policy=policy("push")),
    Case("push-local-deleted", {"a.txt": None}, {}, [("remote", DELETE, "a.txt")], policy=policy("push")),
    Case("push-remote-deleted-preserved-pattern-irrelevant", {}, {".env": None}, [("remote", COPY, ".env")],
         base=(*BASE_TREE, f(".env", "secret")), policy=policy("push", preserve=(".env",))),
    # -- kept local-only after the remote deleted a preserved path --------------------------------
    Case("kept-unchanged-is-not-sent-again", {".env": ENV}, {}, [], kept=(ENV,), policy=PRESERVE_ENV),
    Case("kept-unchanged-remote-seen-absent", {".env": ENV}, {".env": None}, [], kept=(ENV,),
         policy=PRESERVE_ENV),
    Case("kept-unobserved", {}, {}, [], kept=(ENV,), policy=PRESERVE_ENV),
    Case("kept-modified-locally-is-sent", {".env": f(".env", "secret2", mtime=T1)}, {},
         [("remote", COPY, ".env")], kept=(ENV,), policy=PRESERVE_ENV),
    Case("kept-chmod-locally-is-sent", {".env": f(".env", "secret", 0o600)}, {}, [("remote", COPY, ".env")],
         kept=(ENV,), policy=PRESERVE_ENV),
    Case("kept-new-inode-same-file-refreshed", {".env": f(".env", "secret", inode=99)}, {}, [],
         records={".env": "kept"}, kept=(ENV,), policy=PRESERVE_ENV),
    Case("kept-deleted-locally-is-forgotten", {".env": None}, {}, [], records={".env": None}, kept=(ENV,),
         policy=PRESERVE_ENV),
    Case("kept-remote-recreated-same", {}, {".env": f(".env", "secret", side="remote")}, [],
         records={".env": "row"}, kept=(ENV,), policy=PRESERVE_ENV),
    Case("kept-remote-recreated-differently-is-a-conflict", {},
         {".env": f(".env", "theirs", side="remote")},
         [("local", ASIDE, ".env", cname(".env", "local")), ("local", COPY, ".env")],
         conflicts=[(".env", "remote")], kept=(ENV,), policy=PRESERVE_ENV),
    Case("kept-deleted-locally-remote-recreated", {".env": None}, {".env": f(".env", "theirs", side="remote")},
         [("local", COPY, ".env")], kept=(ENV,), policy=PRESERVE_ENV),
    Case("kept-pull-stays", {".env": f(".env", "secret2", mtime=T1)}, {}, [], records={".env": "kept"},
         kept=(ENV,), policy=policy("pull", preserve=(".env",))),
    Case("kept-push-is-sent", {".env": ENV}, {}, [("remote", COPY, ".env")], kept=(ENV,),
         policy=policy("push", preserve=(".env",))),
    Case("kept-dir-goes-along-with-a-new-file", {".claude/new.json": f(".claude/new.json", "{}")}, {},
         [("remote", COPY, ".claude"), ("remote", COPY, ".claude/new.json")],
         kept=(d(".claude"), f(".claude/settings.json")), policy=policy(preserve=(".claude/",))),
    Case("kept-local-absence-unconfirmed-waits", {".env": None}, {}, [], kept=(ENV,), policy=PRESERVE_ENV,
         unconfirmed={"local": (".env",)}, deferred=(".env",)),
    # -- inside .git: the newer version wins, no conflict copy --------------------------------------
    Case("git-index-newer-local-wins", {".git/index": f(".git/index", "L", mtime=T2)},
         {".git/index": f(".git/index", "R", mtime=T1, side="remote")}, [("remote", COPY, ".git/index")],
         conflicts=[(".git/index", "local")], base=GIT_TREE),
    Case("git-index-newer-remote-wins", {".git/index": f(".git/index", "L", mtime=T1)},
         {".git/index": f(".git/index", "R", mtime=T2, side="remote")}, [("local", COPY, ".git/index")],
         conflicts=[(".git/index", "remote")], base=GIT_TREE),
    Case("git-index-newer-wins-whatever-the-policy", {".git/index": f(".git/index", "L", mtime=T1)},
         {".git/index": f(".git/index", "R", mtime=T2, side="remote")}, [("local", COPY, ".git/index")],
         conflicts=[(".git/index", "remote")], base=GIT_TREE, policy=policy(winner="local")),
    Case("git-same-mtime-policy-decides", {".git/HEAD": f(".git/HEAD", "L")},
         {".git/HEAD": f(".git/HEAD", "R", side="remote")}, [("remote", COPY, ".git/HEAD")],
         conflicts=[(".git/HEAD", "local")], base=GIT_TREE, policy=policy(winner="local")),
    Case("git-both-created", {".git/ORIG_HEAD": f(".git/ORIG_HEAD", "L", mtime=T2)},
         {".git/ORIG_HEAD": f(".git/ORIG_HEAD", "R", mtime=T1, side="remote")},
         [("remote", COPY, ".git/ORIG_HEAD")], conflicts=[(".git/ORIG_HEAD", "local")], base=GIT_TREE),
    Case("git-nested-repository", {"sub/.git/index": f("sub/.git/index", "L", mtime=T1)},
         {"sub/.git/index": f("sub/.git/index", "R", mtime=T2, side="remote")},
         [("local", COPY, "sub/.git/index")], conflicts=[("sub/.git/index", "remote")],
         base=(*GIT_TREE, d("sub"), d("sub/.git"), f("sub/.git/index", "i0"))),
    Case("git-dir-beats-newer-file", {".git/refs/heads/x": d(".git/refs/heads/x"),
                                      ".git/refs/heads/x/y": f(".git/refs/heads/x/y", "c1")},
         {".git/refs/heads/x": f(".git/refs/heads/x", "c2", mtime=T2, side="remote")},
         [("remote", COPY, ".git/refs/heads/x"), ("remote", COPY, ".git/refs/heads/x/y")],
         conflicts=[(".git/refs/heads/x", "local")], base=GIT_TREE),
    Case("git-parent-replaced-by-file", {".git/refs/heads/main": f(".git/refs/heads/main", "c2", mtime=T1)},
         {".git/refs/heads": f(".git/refs/heads", "junk", side="remote")},
         [("local", DELETE, ".git/refs/heads/x"), ("remote", COPY, ".git/refs/heads"),
          ("remote", COPY, ".git/refs/heads/main")],
         conflicts=[(".git/refs/heads", "local")], base=GIT_TREE),
    Case("gitignore-is-not-inside-git", {".gitignore": f(".gitignore", "L", mtime=T2)},
         {".gitignore": f(".gitignore", "R", mtime=T1, side="remote")},
         [("local", ASIDE, ".gitignore", cname(".gitignore", "local")), ("local", COPY, ".gitignore")],
         conflicts=[(".gitignore", "remote")], base=(*GIT_TREE, f(".gitignore", "g0"))),
    Case("github-dir-is-not-inside-git", {".github/ci.yml": f(".github/ci.yml", "L", mtime=T2)},
         {".github/ci.yml": f(".github/ci.yml", "R", mtime=T1, side="remote")},
         [("local", ASIDE, ".github/ci.yml", cname(".github/ci.yml", "local")), ("local", COPY, ".github/ci.yml")],
         conflicts=[(".github/ci.yml", "remote")]),
    # -- absences a side did not report itself (a directory move there may be under way) ----------
    Case("both-absent-one-unconfirmed-waits", {"a.txt": None}, {"a.txt": None}, [],
         unconfirmed={"local": ("a.txt",)}, deferred=("a.txt",)),
    Case("both-absent-under-unconfirmed-dir-waits", {"dir": None}, {"dir": None}, [],
         unconfirmed={"remote": ("dir",)}, deferred=("dir", "dir/b.txt")),
    Case("both-absent-others-unconfirmed-forgets", {"a.txt": None}, {"a.txt": None}, [],
         records={"a.txt": None}, unconfirmed={"local": ("dir/b.txt",), "remote": ("a.txt.bak",)}),
    Case("unconfirmed-deletion-waits", {"a.txt": None}, {}, [], unconfirmed={"local": ("a.txt",)},
         deferred=("a.txt",)),
    Case("unconfirmed-deletion-vs-modified-waits", {"a.txt": None},
         {"a.txt": f("a.txt", "v1", mtime=T1, side="remote")}, [], unconfirmed={"local": ("a.txt",)},
         deferred=("a.txt",)),
    Case("created-under-unconfirmed-dir-waits", {"dir": None}, {"dir/new.txt": f("dir/new.txt", side="remote")},
         [], unconfirmed={"local": ("dir",)}, deferred=("dir", "dir/b.txt", "dir/new.txt")),
    Case("unconfirmed-elsewhere-holds-nothing-else", {"a.txt": None, "dir": None}, {},
         [("remote", DELETE, "a.txt")], unconfirmed={"local": ("dir",)}, deferred=("dir", "dir/b.txt")),
    Case("unconfirmed-ignored-in-pull-mode", {"a.txt": None}, {}, [("local", COPY, "a.txt")],
         unconfirmed={"local": ("a.txt",)}, policy=policy("pull")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_reconcile_table(case: Case) -> None:
    base = base_of(*case.base, kept=case.kept)
    plan = reconcile(base, case.local, case.remote, case.policy, case.unconfirmed)  # type: ignore[arg-type]
    assert summary(plan) == case.actions
    got_records = {p: (None if a is None else "kept" if a.local_only else "row") for p, a in plan.records.items()}
    assert got_records == case.records
    assert tuple(plan.deferred) == case.deferred
    assert [(c.path, c.winner) for c in plan.conflicts] == case.conflicts
    for c in plan.conflicts:
        if is_git_internal(c.path):
            assert c.loser_copy == ""  # git rewrites its own files: no copy inside .git
        else:
            assert c.loser_copy == cname(c.path, "local" if c.winner == "remote" else "remote")
        assert c.stamp == STAMP


def test_reconcile_is_pure() -> None:
    base = base_of(*BASE_TREE)
    before = dict(base.mapping())
    local: dict[str, Entry | None] = {"dir": None}
    remote: dict[str, Entry | None] = {"a.txt": f("a.txt", "v1", side="remote")}
    reconcile(base, local, remote, policy())
    assert base.mapping() == before
    assert local == {"dir": None}


# ---- details of the actions ----------------------------------------------------------------------


def test_copy_carries_source_and_current() -> None:
    base = base_of(*BASE_TREE)
    new = f("a.txt", "v1", mtime=T1)
    (action,) = reconcile(base, {"a.txt": new}, {}, policy()).actions
    assert action.source == new
    # The remote was not observed: its current state is the base, with the remote inode.
    assert action.current == Entry("a.txt", FILE, 0o644, 2, T0, ino("a.txt", "remote"), digest_bytes(b"v0"))


def test_conflict_actions_in_detail() -> None:
    base = base_of(*BASE_TREE)
    mine = f("a.txt", "mine", mtime=T1)
    theirs = f("a.txt", "theirs", mtime=T2, side="remote")
    plan = reconcile(base, {"a.txt": mine}, {"a.txt": theirs}, policy())
    aside, copy = plan.actions
    assert aside == Action("local", ASIDE, "a.txt", None, mine, "a.syncd-conflict-local-%s.txt" % STAMP)
    assert copy == Action("local", COPY, "a.txt", theirs, mine)
    (conflict,) = plan.conflicts
    assert (conflict.local, conflict.remote, conflict.loser_copy) == (mine, theirs, aside.dest)


def test_conflict_on_directory_loser_frees_the_path() -> None:
    plan = reconcile(base_of(), {"n": d("n")}, {"n": f("n", "theirs", side="remote")}, policy())
    aside, copy = plan.actions
    assert aside.current == d("n")
    assert copy.current is None  # the directory was moved aside: nothing is in the way


def test_modify_beats_delete_restores_with_no_expectation() -> None:
    base = base_of(*BASE_TREE)
    new = f("a.txt", "v1", mtime=T1)
    (action,) = reconcile(base, {"a.txt": new}, {"a.txt": None}, policy()).actions
    assert action == Action("remote", COPY, "a.txt", new, None)


def test_delete_expects_what_the_side_holds() -> None:
    base = base_of(*BASE_TREE)
    (action,) = reconcile(base, {}, {"a.txt": None}, policy()).actions
    assert action.current == f("a.txt", "v0")  # local inode: the Expect is precise


def test_recreated_dir_comes_from_the_other_side() -> None:
    base = base_of(*BASE_TREE)
    remote_dir = d("dir", 0o750, side="remote")
    plan = reconcile(base, {"dir": None}, {"dir": remote_dir, "dir/new.txt": f("dir/new.txt", side="remote")},
                     policy())
    copies = [a for a in plan.actions if a.kind == COPY and a.path == "dir"]
    assert len(copies) == 1 and copies[0].side == "local"
    assert copies[0].source is not None and copies[0].source.mode == 0o750


def test_unchanged_with_new_inodes_refreshes_base_row() -> None:
    base = base_of(*BASE_TREE)
    moved_ino = f("a.txt")._replace(ino=12345)  # e.g. restored from a backup with the same stat
    plan = reconcile(base, {"a.txt": moved_ino}, {}, policy())
    assert plan.actions == []
    row = plan.records["a.txt"]
    assert row is not None and (row.local_ino, row.remote_ino) == (12345, ino("a.txt", "remote"))
    assert row.digest == digest_bytes(b"v0")


def test_digest_carried_over_when_stat_matches() -> None:
    base = base_of(*BASE_TREE)
    no_digest = f("a.txt", digest=None)
    plan = reconcile(base, {"a.txt": no_digest}, {"a.txt": on("remote", no_digest)}, policy())
    assert plan.is_empty()
    assert needs_digest(base, {"a.txt": no_digest}, "local") == []


def test_missing_digest_for_changed_file_is_an_error() -> None:
    base = base_of(*BASE_TREE)
    changed = f("a.txt", "v1", mtime=T1, digest=None)
    assert needs_digest(base, {"a.txt": changed, "new": f("new", digest=None)}, "local") == ["a.txt", "new"]
    with pytest.raises(ValueError):
        reconcile(base, {"a.txt": changed}, {}, policy())


def test_expand_absent() -> None:
    base = base_of(*BASE_TREE, d("dir/sub"), f("dir/sub/c"), f("dir2"))
    got = expand_absent(base, {"dir": None})
    assert got == {"dir": None, "dir/b.txt": None, "dir/sub": None, "dir/sub/c": None}
    # A path seen as a file has no base descendants either; observed children are kept.
    got = expand_absent(base, {"dir": f("dir"), "dir/b.txt": f("dir/b.txt")})
    assert got["dir/sub"] is None and got["dir/sub/c"] is None and got["dir/b.txt"] is not None
    assert expand_absent(base, {"dir": d("dir")}) == {"dir": d("dir")}


def test_safety_counts_deletions() -> None:
    base = base_of(*BASE_TREE)
    plan = reconcile(base, {"dir": None, "a.txt": None}, {}, policy())
    assert plan.deletions("remote") == 3 and plan.deletions("local") == 0


def test_preserved_child_of_deleted_dir_is_kept() -> None:
    base = base_of(*BASE_TREE, f("dir/.env", "secret"))
    plan = reconcile(base, {}, {"dir": None}, policy(preserve=(".env",)))
    assert ("local", DELETE, "dir/b.txt") in summary(plan)
    assert ("local", DELETE, "dir/.env") not in summary(plan)
    assert plan.records == {"dir/.env": kept_local(f("dir/.env", "secret"))}


def test_preserved_child_keeps_its_dir_in_pull_mode() -> None:
    """The directory's Remove is planned but fails as "not empty" (never recursive), which
    the session treats as "kept": the preserved file survives either way."""
    base = base_of(*BASE_TREE, f("dir/.env", "secret"))
    plan = reconcile(base, {}, {"dir": None}, policy("pull", preserve=(".env",)))
    assert summary(plan) == [("local", DELETE, "dir/b.txt"), ("local", DELETE, "dir")]
    assert plan.records == {"dir/.env": kept_local(f("dir/.env", "secret"))}


def test_dir_replaced_by_file_vs_modified_child_is_a_conflict() -> None:
    """The directory keeps the content changed inside it (modify beats delete); the file
    that replaced it is kept aside on its side, and the directory comes back there."""
    base = base_of(*BASE_TREE)
    plan = reconcile(base, {"dir/b.txt": f("dir/b.txt", "b1")}, {"dir": f("dir", "t", side="remote")}, policy())
    assert summary(plan) == [("remote", ASIDE, "dir", cname("dir", "remote")), ("remote", COPY, "dir"),
                             ("remote", COPY, "dir/b.txt")]
    (conflict,) = plan.conflicts
    assert (conflict.path, conflict.winner, conflict.loser_copy) == ("dir", "local", cname("dir", "remote"))


def test_git_conflict_replaces_the_older_version_in_place() -> None:
    base = base_of(*GIT_TREE)
    mine = f(".git/index", "L", mtime=T1)
    theirs = f(".git/index", "R", mtime=T2, side="remote")
    plan = reconcile(base, {".git/index": mine}, {".git/index": theirs}, policy())
    (action,) = plan.actions
    assert (action.side, action.kind, action.source, action.current) == ("local", COPY, theirs, mine)
    (conflict,) = plan.conflicts
    assert (conflict.path, conflict.winner, conflict.loser_copy) == (".git/index", "remote", "")
    assert (conflict.local, conflict.remote) == (mine, theirs)


@pytest.mark.parametrize(("path", "inside"), [
    (".git/index", True), (".git/objects/ab/cdef", True), ("sub/.git/HEAD", True), ("a/b/.git/refs/x", True),
    (".git", False), ("sub/.git", False), (".gitignore", False), (".github/x.yml", False), ("x.git/y", False),
    ("a/.gitmodules", False),
])
def test_is_git_internal(path: str, inside: bool) -> None:
    assert is_git_internal(path) is inside


# ---- local-only markers -----------------------------------------------------------------------------


def test_remote_deletion_of_preserved_file_leaves_a_marker_of_the_local_copy() -> None:
    base = base_of(*BASE_TREE, f(".env", "secret"))
    local_env = f(".env", "secret")
    plan = reconcile(base, {".env": local_env}, {".env": None}, PRESERVE_ENV)
    assert plan.actions == []
    row = plan.records[".env"]
    assert row is not None and row.local_only
    assert row == kept_local(local_env)
    assert (row.local_ino, row.remote_ino, row.digest) == (local_env.ino, 0, local_env.digest)


def test_index_keeps_markers_apart() -> None:
    """Markers never count as tracked rows (halts, walks, scans), and a path is either."""
    base = base_of(*BASE_TREE, kept=(ENV, d("keep"), f("keep/x")))
    assert ".env" not in base and len(base) == len(BASE_TREE) and base.get(".env") is None
    assert base.kept(".env") == kept_local(ENV)
    assert base.kept_under("keep") == ["keep/x"] and base.under("keep") == []
    base.set(agreed(ENV))  # sent again: an agreed row replaces the marker
    assert base.kept(".env") is None and base.get(".env") == agreed(ENV)
    assert base.under("").count(".env") == 1
    base.set(kept_local(ENV))  # deleted on the remote again
    assert base.get(".env") is None and base.kept(".env") is not None and ".env" not in base.under("")
    base.discard(".env")
    assert base.kept(".env") is None
    assert sorted(r.path for r in base.kept_rows()) == ["keep", "keep/x"]


def test_rekey_carries_markers_along() -> None:
    base = base_of(d("dir"), f("dir/a"), kept=(f("dir/.env", "s"), f("dir2/.env", "t")))
    rekey(base, "dir", "moved")
    assert base.kept("dir/.env") is None
    assert base.kept("moved/.env") == kept_local(f("dir/.env", "s"))._replace(path="moved/.env")
    assert base.kept("dir2/.env") is not None
    assert sorted(base) == ["moved", "moved/a"]


# ---- detect_moves and rekey --------------------------------------------------------------------------


def test_detect_file_rename() -> None:
    base = base_of(*BASE_TREE)
    renamed = f("b.txt", "v0")._replace(ino=ino("a.txt", "local"))
    moves = detect_moves(base, {"a.txt": None, "b.txt": renamed}, {})
    assert len(moves) == 1
    (move,) = moves
    assert (move.side, move.kind, move.path, move.dest) == ("remote", MOVE, "a.txt", "b.txt")
    assert move.source == renamed
    assert move.current == on("remote", f("a.txt"))


def test_detect_remote_rename_replayed_locally() -> None:
    base = base_of(*BASE_TREE)
    renamed = f("c.txt", "v0")._replace(ino=ino("a.txt", "remote"))
    (move,) = detect_moves(base, {}, {"a.txt": None, "c.txt": renamed})
    assert (move.side, move.path, move.dest) == ("local", "a.txt", "c.txt")


def test_detect_dir_rename_is_one_move() -> None:
    base = base_of(*BASE_TREE, d("dir/sub"), f("dir/sub/c"))
    local = {
        "dir": None, "dir/b.txt": None, "dir/sub": None, "dir/sub/c": None,
        "moved": d("moved")._replace(ino=ino("dir", "local")),
        "moved/b.txt": f("moved/b.txt", "b0")._replace(ino=ino("dir/b.txt", "local")),
        "moved/sub": d("moved/sub")._replace(ino=ino("dir/sub", "local")),
        "moved/sub/c": f("moved/sub/c")._replace(ino=ino("dir/sub/c", "local")),
    }
    moves = detect_moves(base, local, {})
    assert [(mv.side, mv.kind, mv.path, mv.dest) for mv in moves] == [("remote", MOVE, "dir", "moved")]


def test_detect_dir_rename_from_watcher_hints() -> None:
    """A watcher reports the old name gone and the new one created; children are not listed
    as absent, only found under the new name by a recursive scan."""
    base = base_of(*BASE_TREE)
    local = {
        "dir": None,
        "moved": d("moved")._replace(ino=ino("dir", "local")),
        "moved/b.txt": f("moved/b.txt", "b0")._replace(ino=ino("dir/b.txt", "local")),
    }
    (move,) = detect_moves(base, local, {})
    assert (move.side, move.path, move.dest) == ("remote", "dir", "moved")


@pytest.mark.parametrize(
    "local,remote",
    [
        # renamed and edited: the content must travel
        ({"a.txt": None, "b.txt": f("b.txt", "v1")._replace(ino=ino("a.txt", "local"))}, {}),
        # same content, other inode: a copy then a delete, not a rename we can prove
        ({"a.txt": None, "b.txt": f("b.txt", "v0")}, {}),
        # the other side changed the old path meanwhile
        ({"a.txt": None, "b.txt": f("b.txt", "v0")._replace(ino=ino("a.txt", "local"))},
         {"a.txt": f("a.txt", "edited", side="remote")}),
        # the other side already deleted the old path
        ({"a.txt": None, "b.txt": f("b.txt", "v0")._replace(ino=ino("a.txt", "local"))}, {"a.txt": None}),
        # the other side has something at the new path
        ({"a.txt": None, "b.txt": f("b.txt", "v0")._replace(ino=ino("a.txt", "local"))},
         {"b.txt": f("b.txt", "other", side="remote")}),
        # no digest yet: cannot prove the content is the same
        ({"a.txt": None, "b.txt": f("b.txt", "v0", digest=None)._replace(ino=ino("a.txt", "local"))}, {}),
        # a file turned into a directory with the same inode number (reused inode)
        ({"a.txt": None, "b": d("b")._replace(ino=ino("a.txt", "local"))}, {}),
    ],
    ids=["edited", "other-inode", "theirs-changed", "theirs-deleted", "dest-taken", "no-digest", "kind"],
)
def test_no_move(local: dict[str, Entry | None], remote: dict[str, Entry | None]) -> None:
    assert detect_moves(base_of(*BASE_TREE), local, remote) == []


def test_rename_then_reconcile_after_rekey_is_quiet() -> None:
    base = base_of(*BASE_TREE)
    renamed = f("b.txt", "v0")._replace(ino=ino("a.txt", "local"))
    local: dict[str, Entry | None] = {"a.txt": None, "b.txt": renamed}
    (move,) = detect_moves(base, local, {})
    rekey(base, move.path, move.dest)
    # The remote now holds b.txt with its old remote inode.
    plan = reconcile(base, local, {"b.txt": on("remote", f("b.txt", "v0"))._replace(ino=ino("a.txt", "remote"))},
                     policy())
    assert plan.actions == [] and plan.conflicts == []


def test_rekey_moves_subtree_only() -> None:
    base = base_of(d("dir"), f("dir/b.txt"), d("dir/sub"), f("dir/sub/c"), f("dir.txt"), d("dir2"), f("dir2/x"))
    old_row = base.get("dir/sub/c")
    rekey(base, "dir", "new/place")
    assert sorted(base) == ["dir.txt", "dir2", "dir2/x", "new/place", "new/place/b.txt", "new/place/sub",
                            "new/place/sub/c"]
    row = base.get("new/place/sub/c")
    assert old_row is not None and row is not None
    assert row == old_row._replace(path="new/place/sub/c")
    assert base.under("new/place") == ["new/place/b.txt", "new/place/sub", "new/place/sub/c"]
    assert base.under("dir") == []


def test_rekey_single_file() -> None:
    base = base_of(f("a"), f("ab"))
    rekey(base, "a", "z")
    assert sorted(base) == ["ab", "z"]


# ---- conflict names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,side,expected",
    [
        ("a/b.txt", "local", "a/b.syncd-conflict-local-STAMP.txt"),
        ("b.txt", "remote", "b.syncd-conflict-remote-STAMP.txt"),
        (".env", "local", ".env.syncd-conflict-local-STAMP"),
        ("dir/.env", "remote", "dir/.env.syncd-conflict-remote-STAMP"),
        ("Makefile", "local", "Makefile.syncd-conflict-local-STAMP"),
        ("a/archive.tar.gz", "local", "a/archive.tar.syncd-conflict-local-STAMP.gz"),
        ("x.d/noext", "local", "x.d/noext.syncd-conflict-local-STAMP"),
    ],
)
def test_conflict_name(path: str, side: str, expected: str) -> None:
    assert conflict_name(path, side, "STAMP") == expected  # type: ignore[arg-type]
