"""Three-way reconcile: (base, local, remote, policy) -> Plan. Pure, no I/O.

Observed maps hold what a scan saw: ``path -> Entry`` or ``path -> None`` (absent). A path
a side did not observe is assumed to still hold its base state. The decision ladder, per
path, is:

1. Neither side changed: nothing (the base may learn new inode numbers).
2. One side changed: propagate it (create, update, metadata, delete).
3. Both changed to the same content: record it; differing metadata goes to the winner.
4. One deleted, the other modified: modify wins, the content is restored.
5. Both changed differently: a conflict. The winner's version lands on both sides; the
   loser's is kept beside it on the losing side as a conflict copy. Inside a ``.git``
   directory the newer version wins and no copy is kept (see ``is_git_internal``).

A preserve-absent path the remote deleted is kept locally under a local-only marker: it
stays local until the local side changes it again (see ``Agreed.local_only``).

Push and pull modes skip the ladder: one side is the truth.
"""

from __future__ import annotations

import posixpath
from collections.abc import Collection, Mapping

from syncd.engine.index import BaseIndex
from syncd.engine.model import (
    ASIDE,
    COPY,
    DELETE,
    DELETED,
    DIR,
    FILE,
    META,
    META_ONLY,
    MOVE,
    SIDES,
    UNCHANGED,
    Action,
    Agreed,
    Conflict,
    Entry,
    Plan,
    Policy,
    Side,
    agreed_from,
    classify,
    content_equal,
    kept_local,
    meta_equal,
    other,
    stat_matches,
    with_base_digest,
)

Observed = Mapping[str, Entry | None]


def is_git_internal(path: str) -> bool:
    """True for paths inside a ``.git`` directory (at the root or in a nested repository).

    Git rewrites its own files wholesale (index, HEAD, refs, logs) and names objects by
    content, so a conflict copy there is only litter that git itself may trip over.
    """
    return path.startswith(".git/") or "/.git/" in path


def conflict_name(path: str, side: Side, stamp: str) -> str:
    """``dir/name.ext`` -> ``dir/name.syncd-conflict-<side>-<stamp>.ext``."""
    head, name = posixpath.split(path)
    stem, ext = posixpath.splitext(name)
    if not stem:  # dotfile such as ".env": no extension to keep
        stem, ext = name, ""
    new = "%s.syncd-conflict-%s-%s%s" % (stem, side, stamp, ext)
    return posixpath.join(head, new) if head else new


def free_conflict_name(path: str, side: Side, stamp: str, base: BaseIndex, observed: Observed) -> str:
    """conflict_name(), with "-2", "-3"... after the stamp when that name is in use."""
    name = conflict_name(path, side, stamp)
    n = 2
    while observed.get(name) is not None or (name not in observed and name in base):
        name = conflict_name(path, side, "%s-%d" % (stamp, n))
        n += 1
    return name


def ancestors(path: str) -> list[str]:
    out = []
    cut = path.rfind("/")
    while cut > 0:
        path = path[:cut]
        out.append(path)
        cut = path.rfind("/")
    return out


def expand_absent(base: BaseIndex, observed: Observed) -> dict[str, Entry | None]:
    """A path seen absent, or seen as a non-directory, has no base descendants left."""
    out = dict(observed)
    for path, entry in observed.items():
        if entry is None or entry.kind != DIR:
            agreed = base.get(path)
            if agreed is None or agreed.kind != DIR:
                continue  # only a directory can have had descendants
            for child in base.under(path):
                if child not in observed:
                    out[child] = None
    return out


def needs_digest(base: BaseIndex, observed: Observed, side: Side) -> list[str]:
    """Files seen without a digest whose stat does not prove them unchanged."""
    out = []
    for path, entry in observed.items():
        if entry is None or entry.kind != FILE or entry.digest is not None:
            continue
        agreed = base.get(path)
        if agreed is None or not stat_matches(entry, agreed, side):
            out.append(path)
    return out


def _row(base: BaseIndex, path: str, side: Side) -> Agreed | None:
    """The base row describing what ``side`` holds at ``path``: the agreed row, or for the
    local side a local-only marker (the remote holds nothing there)."""
    agreed = base.get(path)
    if agreed is None and side == "local":
        return base.kept(path)
    return agreed


def _view(path: str, observed: Observed, agreed: Agreed | None, side: Side) -> Entry | None:
    if path in observed:
        entry = observed[path]
        return None if entry is None else with_base_digest(entry, agreed, side)
    return None if agreed is None else agreed.as_entry(side)


def _refreshed(agreed: Agreed, local: Entry, remote: Entry) -> Agreed | None:
    """The base row with current inode numbers, or None when nothing moved."""
    if (local.ino, remote.ino) == (agreed.local_ino, agreed.remote_ino):
        return None
    return Agreed(agreed.path, agreed.kind, agreed.mode, agreed.size, agreed.mtime_ns, agreed.digest,
                  agreed.target, local.ino, remote.ino)


class _Planner:
    def __init__(self, policy: Policy, base: BaseIndex | None = None,
                 observed: dict[Side, Observed] | None = None,
                 unconfirmed: Mapping[Side, Collection[str]] | None = None) -> None:
        self.policy = policy
        self.plan = Plan()
        self.base = base if base is not None else BaseIndex()
        self.observed: dict[Side, Observed] = observed or {"local": {}, "remote": {}}
        self.unconfirmed: Mapping[Side, Collection[str]] = unconfirmed or {}
        # Losing directories of conflicts: their subtree goes with them to the conflict copy.
        self.moved_aside: set[str] = set()

    def aside_name(self, path: str, side: Side) -> str:
        """A conflict-copy name not taken on that side (names have one-second resolution)."""
        return free_conflict_name(path, side, self.policy.stamp, self.base, self.observed[side])

    def copy(self, to: Side, source: Entry, current: Entry | None) -> None:
        self.plan.actions.append(Action(to, COPY, source.path, source, current))

    def delete(self, side: Side, current: Entry, path: str) -> None:
        if side == "local" and self.policy.is_preserved(path, current.kind == DIR):
            # Preserve-absent: the local path stays, marked local-only so that it is not
            # taken for a local creation and sent back (e.g. by the full scan of a restart).
            self.plan.records[path] = kept_local(current)
            return
        self.plan.actions.append(Action(side, DELETE, path, None, current))

    def in_doubt(self, path: str) -> bool:
        """True when ``path``, or a directory above it, is gone from a side that has not
        reported it: that may be a directory move on that side whose events have not
        arrived yet. Taken for a deletion, it would delete or forget what the move
        carried along, and the move, seen next, would bring it back as new."""
        for side in SIDES:
            doubtful = self.unconfirmed.get(side)
            if doubtful and (path in doubtful or any(a in doubtful for a in ancestors(path))):
                return True
        return False

    def propagate(self, frm: Side, change: str, source: Entry | None, current: Entry | None,
                  path: str) -> None:
        to = other(frm)
        if change == DELETED:
            if current is not None:
                self.delete(to, current, path)
            else:
                self.plan.records[path] = None
        elif change == META and current is not None and source is not None:
            self.plan.actions.append(Action(to, META_ONLY, path, source, current))
        elif source is not None:
            self.copy(to, source, current)

    def make_equal(self, truth: Side, src: Entry | None, dst: Entry | None, path: str) -> None:
        """Push/pull: make the other side hold what ``truth`` holds."""
        to = other(truth)
        if src is None:
            if dst is not None:
                self.delete(to, dst, path)
            else:
                self.plan.records[path] = None
        elif dst is None or not content_equal(src, dst):
            self.copy(to, src, dst)
        elif not meta_equal(src, dst):
            self.plan.actions.append(Action(to, META_ONLY, path, src, dst))
        else:
            local, remote = (src, dst) if truth == "local" else (dst, src)
            self.plan.records[path] = agreed_from(src, local.ino, remote.ino)

    def winner(self, local: Entry, remote: Entry) -> Side:
        if self.policy.winner == "local":
            return "local"
        if self.policy.winner == "newer" and local.mtime_ns > remote.mtime_ns:
            return "local"
        return "remote"

    def git_conflict(self, path: str, local: Entry, remote: Entry) -> None:
        """Both sides changed a file inside ``.git``: the newer version wins (a directory
        beats a file) and the other is replaced, with no conflict copy. The conflict is
        still recorded so that it shows in the listing."""
        if (local.kind == DIR) != (remote.kind == DIR):
            win: Side = "local" if local.kind == DIR else "remote"
        elif local.mtime_ns != remote.mtime_ns:
            win = "local" if local.mtime_ns > remote.mtime_ns else "remote"
        else:
            win = self.winner(local, remote)
        loser, source = (remote, local) if win == "local" else (local, remote)
        self.copy(other(win), source, loser)
        self.plan.conflicts.append(Conflict(path, win, "", local, remote, self.policy.stamp))

    def conflict(self, path: str, local: Entry, remote: Entry) -> None:
        if is_git_internal(path):
            self.git_conflict(path, local, remote)
            return
        win = self.winner(local, remote)
        lose = other(win)
        loser = local if lose == "local" else remote
        source = remote if win == "remote" else local
        aside = self.aside_name(path, lose)
        self.plan.actions.append(Action(lose, ASIDE, path, None, loser, aside))
        # After a directory is moved aside the path is free; a file copy leaves it in place.
        self.copy(lose, source, None if loser.kind == DIR else loser)
        if loser.kind == DIR:
            self.moved_aside.add(path)
        self.plan.conflicts.append(Conflict(path, win, aside, local, remote, self.policy.stamp))

    def decide_kept(self, path: str, kept: Agreed, local: Entry | None, remote: Entry | None) -> bool:
        """Two-way, a local-only marker and no agreed row: True when settled here."""
        if remote is not None:
            return False  # the remote holds the path again: decided as if nothing was agreed
        change = classify(local, kept, "local")
        if change == UNCHANGED:
            assert local is not None
            if local.ino != kept.local_ino:
                self.plan.records[path] = kept._replace(local_ino=local.ino)
        elif local is None:
            self.plan.records[path] = None
        else:
            # Changed locally after the remote deleted it: a new local change, it travels.
            self.copy("remote", local, None)
        return True

    def decide(self, path: str, agreed: Agreed | None, local: Entry | None, remote: Entry | None,
               kept: Agreed | None = None) -> None:
        if self.moved_aside and any(a in self.moved_aside for a in ancestors(path)):
            # Under a directory that lost a conflict (decided first: parents sort first). The
            # winner holds a non-directory there; the loser's entries travel with the conflict
            # copy and are synced under its name in a later cycle.
            if agreed is not None:
                self.plan.records[path] = None
            return
        mode = self.policy.mode
        if mode == "push":
            self.make_equal("local", local, remote, path)
            return
        if mode == "pull":
            self.make_equal("remote", remote, local, path)
            return
        if self.unconfirmed and self.in_doubt(path):
            self.plan.deferred.append(path)
            return
        if kept is not None and agreed is None and self.decide_kept(path, kept, local, remote):
            return
        lc = classify(local, agreed, "local")
        rc = classify(remote, agreed, "remote")
        if lc == UNCHANGED and rc == UNCHANGED:
            if agreed is not None and local is not None and remote is not None:
                fresh = _refreshed(agreed, local, remote)
                if fresh is not None:
                    self.plan.records[path] = fresh
            return
        if rc == UNCHANGED:
            self.propagate("local", lc, local, remote, path)
            return
        if lc == UNCHANGED:
            self.propagate("remote", rc, remote, local, path)
            return
        # Both sides changed.
        if local is None and remote is None:
            self.plan.records[path] = None
        elif local is None:
            assert remote is not None
            self.copy("local", remote, None)  # modify beats delete
        elif remote is None:
            self.copy("remote", local, None)
        elif content_equal(local, remote):
            if meta_equal(local, remote):
                self.plan.records[path] = agreed_from(local, local.ino, remote.ino)
            else:
                win = self.winner(local, remote)
                source, current = (local, remote) if win == "local" else (remote, local)
                self.plan.actions.append(Action(other(win), META_ONLY, path, source, current))
        else:
            self.conflict(path, local, remote)


_ORDER = {ASIDE: 0, DELETE: 1, COPY: 2, META_ONLY: 3}


def _sort_key(action: Action) -> tuple[int, int, int, str]:
    depth = action.path.count("/")
    if action.kind == DELETE:
        return (1, -depth, 0, action.path)  # children before their directory
    if action.kind == COPY:
        is_dir = action.source is not None and action.source.kind == DIR
        return (2, 0 if is_dir else 1, depth, action.path)  # directories first, parents first
    return (_ORDER[action.kind], 0, depth, action.path)


def _keep_parents(plan: Plan, base: BaseIndex, views: dict[Side, dict[str, Entry | None]], policy: Policy) -> None:
    """Whatever is written on a side needs its parent directories there: cancel their
    deletion and re-create them where they were deleted (modify beats delete). A parent
    replaced by a file on that side is a conflict the directory wins: the file is kept
    aside as a conflict copy."""
    deleting = {(a.side, a.path): a for a in plan.actions if a.kind == DELETE}
    copying = {(a.side, a.path) for a in plan.actions if a.kind == COPY}
    for action in list(plan.actions):
        if action.kind not in (COPY, META_ONLY):
            continue
        side = action.side
        for parent in ancestors(action.path):
            here = views[side].get(parent)
            there = views[other(side)].get(parent)
            if (here is not None and here.kind != DIR and there is not None and there.kind == DIR
                    and (side, parent) not in copying):
                for doomed_copy in [a for a in plan.actions if a.path == parent and a.side == other(side)]:
                    plan.actions.remove(doomed_copy)
                aside = ""
                if not is_git_internal(parent):  # inside .git the file is just replaced
                    aside = free_conflict_name(parent, side, policy.stamp, base, views[side])
                    plan.actions.append(Action(side, ASIDE, parent, None, here, aside))
                plan.actions.append(Action(side, COPY, parent, there, here))
                copying.add((side, parent))
                plan.conflicts.append(Conflict(parent, other(side), aside, views["local"].get(parent),
                                               views["remote"].get(parent), policy.stamp))
                continue
            doomed = deleting.pop((side, parent), None)
            if doomed is not None:
                plan.actions.remove(doomed)
            if (side, parent) in copying:
                continue
            if views[side].get(parent) is None:
                # Absent on this side: bring the directory back from the other side.
                source = views[other(side)].get(parent)
                if source is not None and source.kind == DIR:
                    twin = deleting.pop((other(side), parent), None)
                    if twin is not None:
                        plan.actions.remove(twin)
                    plan.actions.append(Action(side, COPY, parent, source, None))
                    copying.add((side, parent))
            elif (other(side), parent) in deleting:
                # It exists here; the other side deleted it and must get it back.
                twin = deleting.pop((other(side), parent))
                plan.actions.remove(twin)
                here = views[side][parent]
                assert here is not None
                plan.actions.append(Action(other(side), COPY, parent, here, None))
                copying.add((other(side), parent))


def reconcile(base: BaseIndex, local: Observed, remote: Observed, policy: Policy,
              unconfirmed: Mapping[Side, Collection[str]] | None = None) -> Plan:
    """Decide, for every observed path, what each side must do to agree.

    ``unconfirmed`` (two-way): per side, paths the base says that side holds, seen absent
    there although the side did not report them (nor a directory above them). Nothing is
    decided at or below them: they are listed in ``Plan.deferred``, to be looked at again
    once that side reports them or is scanned in full.
    """
    local = expand_absent(base, local)
    remote = expand_absent(base, remote)
    planner = _Planner(policy, base, {"local": local, "remote": remote}, unconfirmed)
    views: dict[Side, dict[str, Entry | None]] = {"local": {}, "remote": {}}
    for path in sorted(set(local) | set(remote)):
        agreed = base.get(path)
        kept = None if agreed is not None else base.kept(path)
        lv = _view(path, local, agreed or kept, "local")
        rv = _view(path, remote, agreed, "remote")
        views["local"][path] = lv
        views["remote"][path] = rv
        planner.decide(path, agreed, lv, rv, kept)
    plan = planner.plan
    for view_side in SIDES:
        for action in plan.actions:
            for parent in ancestors(action.path):
                if parent not in views[view_side]:
                    row = _row(base, parent, view_side)
                    views[view_side][parent] = None if row is None else row.as_entry(view_side)
    _keep_parents(plan, base, views, policy)
    plan.actions.sort(key=_sort_key)
    return plan


# ---- renames ------------------------------------------------------------------------------


def detect_moves(base: BaseIndex, local: Observed, remote: Observed) -> list[Action]:
    """Renames done on one side that the other can repeat instead of re-sending content.

    A move is a path gone on side S whose inode reappears at a new path on S, with the
    same content for files. It is replayed on the other side only if that side still holds
    the old path unchanged and has nothing at the new one.
    """
    moves: list[Action] = []
    for side in ("local", "remote"):
        seen: Observed = local if side == "local" else remote
        theirs: Observed = remote if side == "local" else local
        gone = {}
        for path, entry in seen.items():
            agreed = base.get(path)
            if entry is None and agreed is not None:
                gone[agreed.ino(side)] = agreed  # type: ignore[arg-type]
        if not gone:
            continue
        covered: list[str] = []
        created = sorted(
            ((p, e) for p, e in seen.items() if e is not None and p not in base),
            key=lambda item: (item[1].kind != DIR, item[0].count("/"), item[0]),
        )
        for path, entry in created:
            assert entry is not None
            if any(path.startswith(c + "/") for c in covered):
                continue
            old = gone.get(entry.ino)
            if old is None or old.kind != entry.kind or old.path == path:
                continue
            if entry.kind == FILE and (entry.digest is None or entry.digest != old.digest):
                continue
            if any(old.path.startswith(c + "/") for c in covered):
                continue
            other_side = other(side)  # type: ignore[arg-type]
            there = _view(old.path, theirs, old, other_side)
            if there is None or classify(there, old, other_side) != UNCHANGED:
                continue
            if _view(path, theirs, base.get(path), other_side) is not None:
                continue
            moves.append(Action(other_side, MOVE, old.path, entry, there, path))
            covered.append(old.path)
            covered.append(path)
            del gone[entry.ino]
    return moves


def rekey(base: BaseIndex, old: str, new: str) -> None:
    """Record a completed move of ``old`` (and its subtree) to ``new`` in the base.
    Local-only markers inside follow: the move carried those local files along."""
    for path in [old, *base.under(old), *base.kept_under(old)]:
        agreed = base.get(path) or base.kept(path)
        if agreed is None:
            continue
        base.discard(path)
        base.set(agreed._replace(path=new + path[len(old):]))
