"""Shared helpers for the two-way end-to-end tests (``tests/e2e/test_twoway_*.py``).

- :class:`Pair`: one local root, one remote root (reached through the real sshd; it is a
  plain directory on this machine, so tests edit it directly to play the remote coding
  agent) and one state directory, plus the sessions started on them.
- :func:`wait_quiescent`: poll until both trees are equal and stay so (and the session
  prints nothing new) for a while.
- :func:`content_tree`: a tree as ``{relpath: content str | DIR_MARK | ("link", target)}``,
  conflict-copy stamps normalised, for table-driven expectations.
- :class:`Churner`: seeded random edits on one side, made with atomic renames from a
  staging directory outside the root so that it knows exactly which version each of its
  operations replaced or removed (``renameat2(RENAME_EXCHANGE)``); from that it keeps the
  set of versions nobody superseded, which must all survive somewhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import pytest

from syncd.engine.model import Intent
from syncd.store import Store, record_intents
from tests.e2e.helpers import (
    FILE,
    Snapshot,
    SyncProcess,
    bytes_digest,
    snapshot_diff,
    start_session,
    tree_snapshot,
    wait_until,
)
from tests.sshd import SshServer

# A conflict copy: NAME.syncd-conflict-<local|remote>-<UTC yyyymmddTHHMMSSZ>[.ext]
CONFLICT_RE = re.compile(r"\.syncd-conflict-(local|remote)-(\d{8}T\d{6}Z)")
DIR_MARK = "<dir>"
QUIET = 0.5  # seconds both trees must stay equal and unchanged to count as quiescent


def normalise_conflict(path: str) -> str:
    """``a.syncd-conflict-local-20250101T000000Z.txt`` -> ``a.syncd-conflict-local-STAMP.txt``."""
    return CONFLICT_RE.sub(lambda mt: f".syncd-conflict-{mt.group(1)}-STAMP", path)


def is_conflict_copy(path: str) -> bool:
    return CONFLICT_RE.search(path) is not None


# ---------------------------------------------------------------------------------------
# sessions on a pair of roots
# ---------------------------------------------------------------------------------------


@dataclass
class Pair:
    server: SshServer
    base: Path
    local: Path = field(init=False)
    remote: Path = field(init=False)
    state: Path = field(init=False)
    sessions: list[SyncProcess] = field(default_factory=list)
    extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.local = self.base / "local"
        self.remote = self.base / "remote"
        self.state = self.base / "state"
        self.local.mkdir(parents=True, exist_ok=True)
        self.remote.mkdir(parents=True, exist_ok=True)

    def start(self, *extra: str, verbose: bool = True) -> SyncProcess:
        """Start a session (same state dir every time); output in ``base/sessionN.out``."""
        name = f"session{len(self.sessions)}"
        proc = start_session(self.server, self.local, self.remote, self.state, *self.extra, *extra,
                             log_dir=self.base, verbose=verbose, name=name)
        self.sessions.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.sessions:
            proc.kill()


def open_pair(server: SshServer, base: Path) -> Iterator[Pair]:
    """For a test module's ``pair`` fixture: a Pair whose sessions are killed at teardown."""
    p = Pair(server, base)
    try:
        yield p
    finally:
        p.kill_all()


def wait_exit(session: SyncProcess, timeout: float = 30.0) -> int:
    try:
        return session.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        session.kill()
        raise AssertionError(f"syncd still running after {timeout:.0f} s\n" + session.describe()) from None


def kill9(session: SyncProcess) -> None:
    if session.proc.poll() is None:
        os.kill(session.proc.pid, signal.SIGKILL)
        session.proc.wait()


# ---------------------------------------------------------------------------------------
# waiting
# ---------------------------------------------------------------------------------------

Filter = Callable[[str], bool]


def snapshot(root: Path, keep: Optional[Filter] = None) -> Snapshot:
    snap = tree_snapshot(root)
    if keep is not None:
        snap = {k: v for k, v in snap.items() if keep(k)}
    return snap


class Diverged(AssertionError):
    """The trees differ, nothing changes any more and syncd is idle: they will not converge
    (short of the periodic full rescan)."""

    def __init__(self, message: str, paths: list[str]) -> None:
        super().__init__(message)
        self.paths = paths


STUCK = 2.5  # seconds of unequal but unchanging trees, with syncd idle, that count as stuck
PLATEAU = 6.0  # seconds of unequal but unchanging trees that count as stuck, busy or not


def wait_quiescent(
    local: Path,
    remote: Path,
    session: Optional[SyncProcess] = None,
    *,
    timeout: float = 30.0,
    quiet: float = QUIET,
    keep: Optional[Filter] = None,
    equal: bool = True,
    what: str = "quiescence",
) -> Snapshot:
    """Poll until both trees are equal (if *equal*) and stable for *quiet* seconds.

    Snapshots hold kind, permission bits and file digests (no directory mtimes). With a
    *session*, its stdout must not grow during the quiet period either, and its early exit
    fails at once; and when the trees differ but have not changed for ``STUCK`` seconds
    while syncd used no CPU, or for ``PLATEAU`` seconds whatever syncd does (a retry loop),
    :class:`Diverged` is raised without waiting for *timeout*.
    Returns the local snapshot.
    """
    deadline = time.monotonic() + timeout
    if session is not None and "-v" in session.argv:
        wait_connected(session, timeout)  # before that, "stable" means nothing
    last: Any = None
    since = time.monotonic()
    trees: Any = None
    trees_since = since
    cpu_at_since = cpu_seconds(session.proc.pid) if session is not None and session.alive() else 0.0
    a: Snapshot = {}
    b: Snapshot = {}
    while True:
        a, b = snapshot(local, keep), snapshot(remote, keep)
        out_len = session.stdout_path.stat().st_size if session is not None else 0
        complete = all(v[2] is not None for s in (a, b) for v in s.values() if v[0] == FILE)
        ok = complete and (a == b or not equal)
        state = (a, b, out_len)
        now = time.monotonic()
        if session is not None and not session.alive():
            raise AssertionError(f"syncd exited while waiting for {what}\n" + session.describe())
        if (a, b) != trees:
            trees, trees_since = (a, b), now
        if state != last:
            last, since = state, now
            cpu_at_since = cpu_seconds(session.proc.pid) if session is not None else 0.0
        elif ok and now - since >= quiet:
            return a
        elif (not ok and complete and session is not None and now - since >= STUCK
              and cpu_seconds(session.proc.pid) - cpu_at_since < 0.05 * (now - since)):
            paths = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise Diverged(f"the trees stopped changing while different ({what}), syncd idle: "
                           f"{snapshot_diff(a, b)}\n{session.describe()}", paths)
        if equal and not ok and complete and session is not None and now - trees_since >= PLATEAU:
            paths = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise Diverged(f"the trees have not changed for {PLATEAU:.0f} s while different ({what}): "
                           f"{snapshot_diff(a, b)}\n{session.describe()}", paths)
        if now >= deadline:
            detail = snapshot_diff(a, b) if equal else "trees kept changing"
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}: {detail}"
                                 + (f"\n{session.describe()}" if session is not None else ""))
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------
# describing and building trees
# ---------------------------------------------------------------------------------------

Tree = dict[str, Any]  # relpath -> str (file content) | DIR_MARK | ("link", target)


def content_tree(root: Path, *, normalise: bool = True) -> Tree:
    """Every entry under *root*: file content (text), ``DIR_MARK``, or ``("link", target)``."""
    out: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            key = normalise_conflict(rel) if normalise else rel
            if stat.S_ISLNK(st.st_mode):
                out[key] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[key] = DIR_MARK
            else:
                with open(full, "rb") as fh:
                    out[key] = fh.read().decode(errors="replace")
    return out


def make_tree(root: Path, tree: Tree) -> None:
    for rel, value in sorted(tree.items()):
        path = root / rel
        if value == DIR_MARK:
            path.mkdir(parents=True, exist_ok=True)
        elif isinstance(value, tuple):
            path.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(value[1], path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(value)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def change_lines(session: SyncProcess, since: int = 0) -> list[str]:
    return [ln for ln in session.stdout_lines()[since:] if ln.startswith(("->", "<-"))]


def conflict_lines(session: SyncProcess) -> list[str]:
    return [ln for ln in session.stdout_lines() if ln.startswith("!! conflict")]


# ---------------------------------------------------------------------------------------
# churn with exact knowledge of what each operation replaced
# ---------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def rename2(src: Union[str, Path], dst: Union[str, Path], flags: int) -> None:
    if _renameat2 is None:  # pragma: no cover - glibc < 2.28
        raise OSError(errno.ENOSYS, "renameat2 unavailable")
    rc = _renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(dst))


def renameat2_works(tmp: Path) -> bool:
    a, b = tmp / ".probe-a", tmp / ".probe-b"
    a.write_text("a")
    b.write_text("b")
    try:
        rename2(a, b, RENAME_EXCHANGE)
        return a.read_text() == "b"
    except OSError:
        return False
    finally:
        for p in (a, b):
            with contextlib.suppress(OSError):
                p.unlink()


class Ledger:
    """Versions (unique contents, by digest) that must survive somewhere.

    A version is added when written. It is legitimately gone only when a side replaced or
    removed it *while holding it* (the operation captured it), i.e. the edit was informed.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: dict[str, str] = {}  # digest -> description
        self.written = 0
        self.superseded = 0
        # side -> path -> "write" | "gone": the last thing that side's churner did there.
        self.last: dict[str, dict[str, str]] = {"local": {}, "remote": {}}
        # Directories some side renamed into place: files can legitimately appear under
        # them without a write by either side there (the other side's files travel along
        # when syncd replays the rename).
        self.dir_dests: set[str] = set()

    def mark(self, side: str, rel: str, what: str) -> None:
        with self.lock:
            self.last[side][rel] = what

    def resurrected(self, snap: Snapshot) -> list[str]:
        """Files present although the last operation of *both* sides there removed them
        (outside directories renamed into place, see ``dir_dests``)."""
        local, remote = self.last["local"], self.last["remote"]
        return sorted(p for p, v in snap.items()
                      if v[0] == FILE and local.get(p) == "gone" and remote.get(p) == "gone"
                      and not any(p.startswith(d + "/") for d in self.dir_dests))

    def wrote(self, data: bytes, what: str) -> None:
        with self.lock:
            self.live[bytes_digest(data)] = what
            self.written += 1

    def gone(self, data: bytes) -> None:
        with self.lock:
            if self.live.pop(bytes_digest(data), None) is not None:
                self.superseded += 1

    def missing(self, trees: list[Path]) -> dict[str, str]:
        """Live versions found in none of *trees*."""
        present: set[str] = set()
        for root in trees:
            for value in tree_snapshot(root).values():
                if value[0] == FILE and value[2] is not None:
                    present.add(value[2])
        return {d: w for d, w in self.live.items() if d not in present}


class Churner:
    """Seeded random edits on one root: create, modify, delete, rename files (and now and
    then a directory), across ``dirs`` directories. Each write or removal goes through an
    atomic rename against a staging directory outside the root, so that what it replaced
    is known exactly and recorded in the shared :class:`Ledger`.
    """

    def __init__(self, side: str, root: Path, stage: Path, ledger: Ledger, seed: int,
                 dirs: int = 30, names: int = 8, dir_ops: bool = True) -> None:
        self.side = side
        self.root = root
        self.stage = stage
        self.ledger = ledger
        self.rng = random.Random(seed)
        self.dirs = [f"d{i:02d}" for i in range(dirs)]
        self.names = [f"f{i}.txt" for i in range(names)]
        self.counter = 0
        self.ops = 0
        self.errors = 0
        self.dir_ops = dir_ops
        self.log: list[str] = []
        stage.mkdir(parents=True, exist_ok=True)

    # -- primitives --------------------------------------------------------------------------

    def _tmp(self) -> Path:
        self.counter += 1
        return self.stage / f"t{self.counter}"

    def _content(self, rel: str) -> bytes:
        self.counter += 1
        pad = self.rng.randbytes(self.rng.choice((0, 10, 200, 3000))).hex()
        return f"{self.side} #{self.counter} {rel} {time.time_ns()}\n{pad}\n".encode()

    def _forget(self, path: Path, rel: str = "") -> None:
        """Everything in *path* (moved out of the root by us, from *rel*) is superseded."""
        if path.is_symlink() or not path.is_dir():
            with contextlib.suppress(OSError):
                self.ledger.gone(path.read_bytes())
            with contextlib.suppress(OSError):
                path.unlink()
            return
        for dirpath, _dirs, files in os.walk(path):
            for name in files:
                full = Path(dirpath, name)
                with contextlib.suppress(OSError):
                    self.ledger.gone(full.read_bytes())
                if rel:
                    self.ledger.mark(self.side, f"{rel}/{full.relative_to(path)}", "gone")
        shutil.rmtree(path, ignore_errors=True)

    def write(self, rel: str, data: Optional[bytes] = None) -> bool:
        data = self._content(rel) if data is None else data
        tmp = self._tmp()
        tmp.write_bytes(data)
        dst = self.root / rel
        for _attempt in range(3):
            try:
                if dst.is_symlink() or dst.exists():
                    if dst.is_dir() and not dst.is_symlink():
                        break
                    rename2(tmp, dst, RENAME_EXCHANGE)
                    self.ledger.wrote(data, f"{self.side}:{rel}")
                    self._forget(tmp)  # what the write replaced: seen, superseded
                else:
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    rename2(tmp, dst, RENAME_NOREPLACE)
                    self.ledger.wrote(data, f"{self.side}:{rel}")
                self.ledger.mark(self.side, rel, "write")
                self.log.append(f"write {rel}")
                return True
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.EEXIST, errno.ENOTDIR):
                    raise
        self.errors += 1
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False

    def delete(self, rel: str) -> bool:
        dst = self.root / rel
        tmp = self._tmp()
        try:
            os.rename(dst, tmp)  # atomic: what we removed is exactly what we hold now
        except OSError:
            self.errors += 1
            return False
        self.ledger.mark(self.side, rel, "gone")
        self._forget(tmp, rel)
        self.log.append(f"delete {rel}")
        return True

    def rename(self, rel: str, new: str) -> bool:
        src, dst = self.root / rel, self.root / new
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            rename2(src, dst, RENAME_NOREPLACE)
        except OSError:
            self.errors += 1
            return False
        self.ledger.mark(self.side, rel, "gone")
        self.ledger.mark(self.side, new, "write")
        if dst.is_dir() and not dst.is_symlink():
            with self.ledger.lock:
                self.ledger.dir_dests.add(new)
            for dirpath, _dirs, files in os.walk(dst):
                for name in files:
                    sub = Path(dirpath, name).relative_to(dst)
                    self.ledger.mark(self.side, f"{rel}/{sub}", "gone")
                    self.ledger.mark(self.side, f"{new}/{sub}", "write")
        self.log.append(f"rename {rel} -> {new}")
        return True

    # -- random operations -------------------------------------------------------------------

    def existing_files(self) -> list[str]:
        out: list[str] = []
        for d in self.dirs:
            try:
                names = os.listdir(self.root / d)
            except OSError:
                continue
            out.extend(f"{d}/{n}" for n in names if not n.startswith(".syncd"))
        return out

    def step(self) -> None:
        rng = self.rng
        roll = rng.random()
        files = self.existing_files()
        self.ops += 1
        if roll < 0.35 or not files:
            self.write(f"{rng.choice(self.dirs)}/{rng.choice(self.names)}")  # create or modify
        elif roll < 0.6:
            self.write(rng.choice(files))  # modify an existing file
        elif roll < 0.78:
            self.delete(rng.choice(files))
        elif roll < 0.95 or not self.dir_ops:
            self.rename(rng.choice(files), f"{rng.choice(self.dirs)}/r{self.counter}-{rng.choice(self.names)}")
            self.counter += 1
        elif roll < 0.975:
            # Rename a directory (with its files) to a directory name not in use.
            present = [d for d in self.dirs if (self.root / d).is_dir()]
            free = [d for d in self.dirs if not (self.root / d).exists()]
            if present and free:
                self.rename(rng.choice(present), rng.choice(free))
        else:
            d = rng.choice(self.dirs)
            if (self.root / d).is_dir():
                self.delete(d)

    def run_for(self, seconds: float, rate: float, stop: Optional[threading.Event] = None) -> None:
        """About *rate* operations per second for *seconds* (or until *stop* is set)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and not (stop is not None and stop.is_set()):
            self.step()
            time.sleep(self.rng.uniform(0, 2.0 / rate))


def churn_both(local: Churner, remote: Churner, seconds: float, rate: float,
               during: Optional[Callable[[float], None]] = None) -> None:
    """Run both churners in threads for *seconds*; call ``during(elapsed)`` every 50 ms."""
    errors: list[BaseException] = []

    def run(ch: Churner) -> None:
        try:
            ch.run_for(seconds, rate)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(ch,), daemon=True) for ch in (local, remote)]
    start = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if during is not None:
            during(time.monotonic() - start)
        time.sleep(0.05)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# ---------------------------------------------------------------------------------------
# idleness: a converged session must not spin
# ---------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of *pid* so far (from /proc)."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        data = fh.read()
    fields = data[data.rfind(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


CONNECTED = "agent on python"  # the INFO line (-v) logged once the agent answered


def wait_connected(session: SyncProcess, timeout: float = 30.0) -> None:
    """Wait for the session (started with -v) to have its agent running."""
    wait_until(lambda: CONNECTED in session.stderr(), timeout, session=session,
               message="the agent to start")


def wait_idle(session: SyncProcess, timeout: float = 10.0, window: float = 0.5, limit: float = 0.1) -> None:
    """Wait until the session uses (almost) no CPU over *window* s: its work is done, and it
    is not retrying something in a loop. Fails if that does not happen within *timeout* s."""
    deadline = time.monotonic() + timeout
    used = 0.0
    while time.monotonic() < deadline:
        session.assert_alive()
        before = cpu_seconds(session.proc.pid)
        time.sleep(window)
        used = cpu_seconds(session.proc.pid) - before
        if used <= limit:
            return
    lines = session.stdout_lines()
    raise AssertionError(
        f"syncd still used {used:.2f} s of CPU per {window:.1f} s after {timeout:.0f} s although nothing "
        f"changes (a retry loop?); last output:\n" + "\n".join(lines[-15:]) + "\n" + session.stderr()[-2000:]
    )


def assert_idle(session: SyncProcess) -> None:
    """Both trees are quiescent: the session must settle to ~0 CPU soon, not spin."""
    wait_idle(session)


# ---------------------------------------------------------------------------------------
# known bugs the churn tests can run into (each also described in the report that added it)
# ---------------------------------------------------------------------------------------

MISSING_PARENT_LOOP = (
    "known bug: a directory deleted on one side while the other changed a file inside it, when the "
    "cycle that deletes the directory's contents on the other side fails for that file (CHANGED) and "
    "for the directory ('not empty'), leaves the directory's base row although it is gone; later "
    "cycles observe only the file, reconcile() takes the unobserved parent from the base (present), "
    "_keep_parents() does not re-create it, and 'copy DIR/FILE: No such file or directory' repeats "
    "in a hot loop")


def _missing_parent_loop(session: SyncProcess, paths: list[str]) -> bool:
    lines = session.stdout_lines()[-200:]
    return any(sum(1 for ln in lines if ln.startswith(f"!! copy {p} on ") and "No such file" in ln) > 20
               for p in paths)


MOVE_RACE = (
    "known bug (test_twoway_matrix.py::test_live_directory_moved_on_one_side_while_the_other_deletes_"
    "inside): a change made inside a directory on the side where syncd then replays the directory's "
    "move is reported under the old name afterwards and lost")
MOVE_LINE = re.compile(r"^(?:->|<-) (?:remote|local)\s+move\s+(.+) -> (.+)$")


def _under_replayed_moves(sessions: list[SyncProcess], paths: list[str]) -> bool:
    dests = [found.group(2) for s in sessions for ln in s.stdout_lines() if (found := MOVE_LINE.match(ln))]
    return bool(paths) and all(any(p.startswith(d + "/") for d in dests) for p in paths)


def converge_or_known_bug(local: Path, remote: Path, session: SyncProcess, *, timeout: float,
                          what: str, sessions: Optional[list[SyncProcess]] = None) -> Snapshot:
    """:func:`wait_quiescent`; a divergence with the signature of a known syncd bug marks
    the test xfail (with the bug), any other one fails it. *sessions*: all the sessions
    that ran on these trees (default: *session*)."""
    try:
        return wait_quiescent(local, remote, session, timeout=timeout, what=what)
    except Diverged as exc:
        if _missing_parent_loop(session, exc.paths):
            pytest.xfail(f"{MISSING_PARENT_LOOP}: {exc.paths[:4]}")
        if _under_replayed_moves(sessions or [session], exc.paths):
            pytest.xfail(f"{MOVE_RACE}: {exc.paths[:4]}")
        raise


def add_intent(state: Path, intent: Intent) -> None:
    """Record ``intent`` in the session index under ``state`` (a state dir holding one
    session), as a run killed before confirming that operation leaves it."""
    [index] = (state / "sessions").glob("*.sqlite")
    store = Store(str(index))
    try:
        record_intents(store, [intent])
    finally:
        store.close()
