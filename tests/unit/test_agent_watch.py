"""Tests for syncd.agent.watch on real temporary directories, for every backend.

Must also run on Python 3.8 (the agent's floor).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
from typing import Callable, Iterator, List, Optional, Set, Tuple

import pytest

from syncd.agent import watch
from syncd.agent.watch import (
    IN_CREATE,
    IN_ISDIR,
    IN_Q_OVERFLOW,
    Watcher,
    start_watcher,
)

BACKENDS = ["inotify", "poll", "watchfiles"]
WAIT = 5.0  # generous upper bound; tests normally finish far sooner


class Collector:
    """on_batch callback that records batches and lets a test wait for paths."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.batches: List[Tuple[Set[str], bool]] = []

    def __call__(self, paths: Set[str], overflow: bool) -> None:
        with self.cond:
            self.batches.append((set(paths), overflow))
            self.cond.notify_all()

    def paths(self) -> Set[str]:
        with self.cond:
            out: Set[str] = set()
            for batch, _ in self.batches:
                out |= batch
            return out

    def overflowed(self) -> bool:
        with self.cond:
            return any(ov for _, ov in self.batches)

    def clear(self) -> None:
        with self.cond:
            self.batches.clear()

    def wait_for(self, pred: Callable[[], bool], timeout: float = WAIT) -> bool:
        with self.cond:
            return self.cond.wait_for(pred, timeout)

    def wait_paths(self, wanted: Set[str], timeout: float = WAIT) -> bool:
        return self.wait_for(lambda: wanted <= self._paths_locked(), timeout)

    def _paths_locked(self) -> Set[str]:
        out: Set[str] = set()
        for batch, _ in self.batches:
            out |= batch
        return out


def _skip_unless_available(backend: str) -> None:
    if backend == "watchfiles":
        pytest.importorskip("watchfiles")
    if backend == "inotify" and watch._load_inotify() is None:
        pytest.skip("inotify is not available here")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    _skip_unless_available(name)
    return name


class Env:
    def __init__(self, root: str, backend: str) -> None:
        self.root = root
        self.backend = backend
        self.col = Collector()
        self.watchers: List[Watcher] = []

    def start(self, is_ignored: Optional[Callable[[str, bool], bool]] = None) -> Watcher:
        w = start_watcher(
            self.root,
            self.col,
            is_ignored=is_ignored,
            prefer=self.backend,
            step_ms=20,
            poll_interval=0.1,
        )
        self.watchers.append(w)
        assert w.backend == self.backend
        return w

    def p(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def write(self, rel: str, data: bytes = b"x") -> None:
        with open(self.p(rel), "wb") as f:
            f.write(data)


@pytest.fixture
def env(tmp_path: object, backend: str) -> Iterator[Env]:
    root = os.path.realpath(str(tmp_path))
    e = Env(os.path.join(root, "root"), backend)
    os.mkdir(e.root)
    yield e
    for w in e.watchers:
        w.stop()


def _node_modules(rel: str, is_dir: bool) -> bool:
    return rel.split("/")[-1] == "node_modules"


# --------------------------------------------------------------------------- behaviour


def test_create_modify_delete(env: Env) -> None:
    env.start()
    env.write("f.txt", b"1")
    assert env.col.wait_paths({"f.txt"}), env.col.batches
    env.col.clear()
    env.write("f.txt", b"22")  # another size, so polling sees it whatever the clock
    assert env.col.wait_paths({"f.txt"}), env.col.batches
    env.col.clear()
    os.unlink(env.p("f.txt"))
    assert env.col.wait_paths({"f.txt"}), env.col.batches


def test_paths_are_relative_in_subdirectories(env: Env) -> None:
    os.makedirs(env.p("sub/dir"))
    env.start()
    env.write("sub/dir/g.txt")
    assert env.col.wait_paths({"sub/dir/g.txt"}), env.col.batches
    assert all(not p.startswith("/") for p in env.col.paths())


def test_rename_reports_old_and_new(env: Env) -> None:
    env.write("a.txt")
    env.start()
    os.rename(env.p("a.txt"), env.p("b.txt"))
    assert env.col.wait_paths({"a.txt", "b.txt"}), env.col.batches


def test_directory_rename_reports_and_keeps_watching(env: Env) -> None:
    os.makedirs(env.p("d1/inner"))
    env.write("d1/inner/x.txt")
    env.start()
    os.rename(env.p("d1"), env.p("d2"))
    assert env.col.wait_paths({"d1", "d2"}), env.col.batches
    env.col.clear()
    env.write("d2/inner/y.txt")
    assert env.col.wait_paths({"d2/inner/y.txt"}), env.col.batches
    assert not any(p.startswith("d1/") for p in env.col.paths())


def test_directory_moved_in_reports_contents(env: Env, tmp_path: object) -> None:
    outside = os.path.join(os.path.realpath(str(tmp_path)), "outside")
    os.makedirs(os.path.join(outside, "deep"))
    with open(os.path.join(outside, "deep", "in.txt"), "wb") as f:
        f.write(b"x")
    env.start()
    os.rename(outside, env.p("moved"))
    assert env.col.wait_paths({"moved", "moved/deep", "moved/deep/in.txt"}), env.col.batches
    env.col.clear()
    env.write("moved/deep/more.txt")
    assert env.col.wait_paths({"moved/deep/more.txt"}), env.col.batches


def test_mkdir_then_create_race(env: Env) -> None:
    env.start()
    os.makedirs(env.p("a/b/c"))
    env.write("a/b/c/f.txt")
    assert env.col.wait_paths({"a/b/c/f.txt"}), env.col.batches
    env.col.clear()
    env.write("a/b/c/g.txt")  # and the new directories are watched from now on
    assert env.col.wait_paths({"a/b/c/g.txt"}), env.col.batches


def test_ignored_directories_not_reported(env: Env) -> None:
    os.makedirs(env.p("node_modules/pkg"))
    env.start(is_ignored=_node_modules)
    env.write("node_modules/pkg/index.js")
    os.makedirs(env.p("sub/node_modules/deep"))
    env.write("sub/node_modules/deep/x.js")
    env.write("sub/node_modules/y.js")
    env.write("marker.txt")
    assert env.col.wait_paths({"marker.txt", "sub"}), env.col.batches
    if env.backend == "poll":  # let a few more walks happen
        time.sleep(0.3)
    else:
        time.sleep(0.1)
    bad = [p for p in env.col.paths() if "node_modules" in p.split("/")]
    assert not bad, bad


def test_stop_is_prompt_and_idempotent(env: Env) -> None:
    w = env.start()
    assert w.running
    t0 = time.monotonic()
    w.stop()
    assert time.monotonic() - t0 < 1.0
    assert not w.running
    w.stop()  # idempotent
    w.start()  # a stopped watcher does not restart
    assert not w.running


def test_no_batches_after_stop(env: Env) -> None:
    w = env.start()
    w.stop()
    env.col.clear()
    env.write("late.txt")
    time.sleep(0.3)
    assert "late.txt" not in env.col.paths()


def test_burst_arrives_in_few_batches(env: Env) -> None:
    os.mkdir(env.p("burst"))
    env.start()
    wanted = set()
    for i in range(2000):
        rel = "burst/f%04d.txt" % i
        env.write(rel)
        wanted.add(rel)
    assert env.col.wait_paths(wanted, timeout=15.0), len(wanted - env.col.paths())
    if env.backend == "inotify":
        assert len(env.col.batches) < 50, len(env.col.batches)


def test_non_utf8_name(env: Env) -> None:
    if env.backend == "watchfiles":
        pytest.skip("watchfiles cannot represent names that are not UTF-8 (it falls back)")
    env.start()
    raw = os.path.join(os.fsencode(env.root), b"caf\xe9.txt")
    with open(raw, "wb") as f:
        f.write(b"x")
    assert env.col.wait_paths({os.fsdecode(b"caf\xe9.txt")}), env.col.batches


def test_root_deleted_reports_overflow(env: Env) -> None:
    env.start()
    os.rmdir(env.root)
    assert env.col.wait_for(env.col.overflowed), env.col.batches


def test_symlinked_directory_not_followed(env: Env, tmp_path: object) -> None:
    outside = os.path.join(os.path.realpath(str(tmp_path)), "outside")
    os.mkdir(outside)
    os.symlink(outside, env.p("link"))
    env.start()
    with open(os.path.join(outside, "o.txt"), "wb") as f:
        f.write(b"x")
    env.write("marker.txt")
    assert env.col.wait_paths({"marker.txt"}), env.col.batches
    time.sleep(0.25)
    assert "link/o.txt" not in env.col.paths()


# --------------------------------------------------------------------------- batching


def test_batcher_caps_batch_size() -> None:
    col = Collector()
    b = watch._Batcher(col, step_ms=20, max_paths=100)
    for i in range(250):
        b.add("f%d" % i)
    b.flush()
    assert [len(p) for p, _ in col.batches] == [100, 100, 50]


def test_batcher_deadline_bounded_under_churn() -> None:
    b = watch._Batcher(Collector(), step_ms=20)
    assert b.deadline() is None
    b.add("a")
    first_due = b.deadline()
    assert first_due is not None
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.3:
        b.add("a")
        due = b.deadline()
        assert due is not None
        assert due <= t0 + watch.MAX_LATENCY + 0.05


def test_on_batch_exception_does_not_kill_watcher(tmp_path: object) -> None:
    _skip_unless_available("inotify")
    root = os.path.realpath(str(tmp_path))
    col = Collector()
    calls = []

    def on_batch(paths: Set[str], overflow: bool) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("consumer bug")
        col(paths, overflow)

    w = start_watcher(root, on_batch, prefer="inotify")
    try:
        with open(os.path.join(root, "one"), "wb"):
            pass
        deadline = time.monotonic() + WAIT
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        with open(os.path.join(root, "two"), "wb"):
            pass
        assert col.wait_paths({"two"}), col.batches
    finally:
        w.stop()


def test_settle_delivers_what_happened_before_it(tmp_path: object) -> None:
    """settle() returns only once everything done before the call went through on_batch,
    a batch still inside its quiet period included (step_ms here is a minute)."""
    _skip_unless_available("inotify")
    root = os.path.realpath(str(tmp_path))
    col = Collector()
    w = start_watcher(root, col, prefer="inotify", step_ms=60_000)
    try:
        for round_ in range(3):
            names = {f"r{round_}-{i}" for i in range(200)}
            for name in names:
                with open(os.path.join(root, name), "wb"):
                    pass
            os.mkdir(os.path.join(root, f"d{round_}"))
            assert w.settle()
            assert names | {f"d{round_}"} <= col.paths()
    finally:
        w.stop()
    assert not w.settle()  # stopped: nothing to wait for


def _outside_tree(tmp_path: object) -> str:
    outside = os.path.join(os.path.realpath(str(tmp_path)), "outside")
    os.makedirs(os.path.join(outside, "deep"))
    with open(os.path.join(outside, "deep", "in.txt"), "wb") as f:
        f.write(b"x")
    return outside


def _watch_beside_a_tree(tmp_path: object) -> Tuple[str, str, Collector, Watcher]:
    """An inotify watcher of an empty root, and a tree outside it to move in."""
    _skip_unless_available("inotify")
    root = os.path.join(os.path.realpath(str(tmp_path)), "root")
    os.mkdir(root)
    outside = _outside_tree(tmp_path)
    col = Collector()
    return root, outside, col, start_watcher(root, col, prefer="inotify", step_ms=10)


def test_directories_placed_are_watched_without_reporting_their_content(tmp_path: object) -> None:
    """While placing(), a directory moved in is reported and watched, with everything
    below it, but its content is not reported entry by entry."""
    root, outside, col, w = _watch_beside_a_tree(tmp_path)
    try:
        with w.placing():
            os.rename(outside, os.path.join(root, "placed"))
            assert w.settle()
        assert col.paths() == {"placed"}, col.batches
        assert not col.overflowed()
        col.clear()
        with open(os.path.join(root, "placed", "deep", "later.txt"), "wb"):
            pass
        assert col.wait_paths({"placed/deep/later.txt"}), col.batches
    finally:
        w.stop()


def test_placing_cut_short_reports_the_whole_tree(tmp_path: object) -> None:
    root, outside, col, w = _watch_beside_a_tree(tmp_path)
    try:
        with pytest.raises(OSError), w.placing():
            os.rename(outside, os.path.join(root, "placed"))
            raise OSError("the placement failed")
        assert col.wait_for(lambda: any(ov and "" in paths for paths, ov in col.batches)), col.batches
        col.clear()
        os.rename(os.path.join(root, "placed"), os.path.join(root, "again"))
        assert col.wait_paths({"again", "again/deep", "again/deep/in.txt"}), col.batches  # reports again
    finally:
        w.stop()


def test_settle_is_unsupported_when_polling(tmp_path: object) -> None:
    w = start_watcher(os.path.realpath(str(tmp_path)), Collector(), prefer="poll")
    try:
        assert not w.settle()
    finally:
        w.stop()


# --------------------------------------------------------------------------- inotify internals


def _event(wd: int, mask: int, name: bytes = b"") -> bytes:
    if name:
        name = name + b"\0" * (16 - len(name) % 16)
    return struct.pack("iIII", wd, mask, 0, len(name)) + name


def _unstarted(tmp_path: object) -> Tuple[Collector, watch._InotifyBackend]:
    col = Collector()
    w = Watcher(os.path.realpath(str(tmp_path)), col, backend="inotify")
    return col, watch._InotifyBackend(w)


def test_inotify_queue_overflow_reports_overflow(tmp_path: object) -> None:
    col, be = _unstarted(tmp_path)
    be.handle_events(_event(-1, IN_Q_OVERFLOW))
    be._w._batcher.flush()
    assert col.batches == [(set(), True)]


def test_inotify_event_parsing(tmp_path: object) -> None:
    col, be = _unstarted(tmp_path)
    be._map(1, "")
    be._map(2, "sub")
    buf = _event(1, IN_CREATE, b"x.txt") + _event(2, IN_CREATE, b"y\xff") + _event(9, IN_CREATE, b"z")
    be.handle_events(buf)
    be._w._batcher.flush()
    assert col.batches == [({"x.txt", "sub/" + os.fsdecode(b"y\xff")}, False)]


def test_inotify_overflow_in_running_watcher(tmp_path: object) -> None:
    """An overflow event handled by a running inotify watcher reaches on_batch."""
    _skip_unless_available("inotify")
    root = os.path.realpath(str(tmp_path))
    col = Collector()
    w = start_watcher(root, col, prefer="inotify")
    try:
        engine = w._engine
        assert isinstance(engine, watch._InotifyBackend)
        # for an overflow event the handler touches only the (thread-safe) batcher
        engine.handle_events(_event(-1, IN_Q_OVERFLOW))
        w._wake()  # do not wait for the idle timeout of the loop
        assert col.wait_for(col.overflowed), col.batches
        assert w.running and w.backend == "inotify"
    finally:
        w.stop()


def test_inotify_enospc_falls_back_to_polling(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _skip_unless_available("inotify")
    root = os.path.realpath(str(tmp_path))
    os.mkdir(os.path.join(root, "sub"))

    def full(self: object, path: str, follow: bool = False) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(watch._InotifyBackend, "_add_watch", full)
    col = Collector()
    with caplog.at_level(logging.WARNING, logger="syncd.agent.watch"):
        w = start_watcher(root, col, prefer="inotify", poll_interval=0.1)
    try:
        assert w.backend == "poll"
        assert col.wait_for(col.overflowed), col.batches
        assert "fs.inotify.max_user_watches" in caplog.text
        with open(os.path.join(root, "sub", "new.txt"), "wb"):
            pass
        assert col.wait_paths({"sub/new.txt"}), col.batches
    finally:
        w.stop()


def test_inotify_enospc_on_new_directory_falls_back(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    _skip_unless_available("inotify")
    root = os.path.realpath(str(tmp_path))
    col = Collector()
    w = start_watcher(root, col, prefer="inotify", poll_interval=0.1)
    try:
        real = watch._InotifyBackend._add_watch

        def limited(self: watch._InotifyBackend, path: str, follow: bool = False) -> int:
            if path.endswith("/newdir"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            return real(self, path, follow)

        monkeypatch.setattr(watch._InotifyBackend, "_add_watch", limited)
        os.mkdir(os.path.join(root, "newdir"))
        assert col.wait_for(col.overflowed), col.batches
        assert w.backend == "poll"
    finally:
        w.stop()


def test_inotify_dir_event_flags(tmp_path: object) -> None:
    """A directory created inside the tree is watched and its contents reported."""
    _skip_unless_available("inotify")
    root = os.path.realpath(str(tmp_path))
    col, be = _unstarted(tmp_path)
    lib = watch._load_inotify()
    assert lib is not None
    be._fd = lib.init1(watch.IN_NONBLOCK | watch.IN_CLOEXEC)
    try:
        be._add_tree("", report=False)
        os.makedirs(os.path.join(root, "n/m"))
        with open(os.path.join(root, "n/m/file"), "wb"):
            pass
        be.handle_event(be._rel_to_wd[""], IN_CREATE | IN_ISDIR, 0, "n")
        be._w._batcher.flush()
        assert {"n", "n/m", "n/m/file"} <= col.paths()
        assert "n/m" in be._rel_to_wd
    finally:
        os.close(be._fd)


# --------------------------------------------------------------------------- choice & fallback


def test_default_backend_order(tmp_path: object) -> None:
    root = os.path.realpath(str(tmp_path))
    w = start_watcher(root, Collector())
    try:
        assert w.backend == watch.available_backends()[0]
    finally:
        w.stop()


def test_unknown_backend_rejected(tmp_path: object) -> None:
    with pytest.raises(ValueError):
        start_watcher(str(tmp_path), Collector(), prefer="kqueue")


def test_watchfiles_watch_limit_falls_back_to_polling(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    watchfiles = pytest.importorskip("watchfiles")

    def limited(*args: object, **kwargs: object) -> Iterator[Set[Tuple[object, str]]]:
        raise OSError("OS file watch limit reached. about [...]")

    monkeypatch.setattr(watchfiles, "watch", limited)
    root = os.path.realpath(str(tmp_path))
    col = Collector()
    with caplog.at_level(logging.WARNING, logger="syncd.agent.watch"):
        w = start_watcher(root, col, prefer="watchfiles", poll_interval=0.1)
    try:
        assert w.backend == "poll"
        assert col.wait_for(col.overflowed), col.batches
        assert "fs.inotify.max_user_watches" in caplog.text
        assert sum(1 for _, ov in col.batches if ov) == 1
        with open(os.path.join(root, "p.txt"), "wb"):
            pass
        assert col.wait_paths({"p.txt"}), col.batches
    finally:
        w.stop()


def test_watchfiles_non_utf8_name_falls_back_to_inotify(tmp_path: object) -> None:
    pytest.importorskip("watchfiles")
    _skip_unless_available("inotify")
    root = os.path.realpath(str(tmp_path))
    col = Collector()
    w = start_watcher(root, col, prefer="watchfiles")
    try:
        assert w.backend == "watchfiles"
        with open(os.path.join(os.fsencode(root), b"bad\xff"), "wb"):
            pass
        assert col.wait_for(lambda: w.backend == "inotify" and col.overflowed()), col.batches
        col.clear()
        with open(os.path.join(root, "after.txt"), "wb"):
            pass
        assert col.wait_paths({"after.txt"}), col.batches
    finally:
        w.stop()
