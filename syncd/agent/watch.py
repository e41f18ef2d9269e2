"""Watch a root directory for changes, from a thread, on the remote agent.

Shipped to remote hosts: Python 3.8+ and the standard library only (watchfiles is used
if it happens to be importable there).

Events are hints, never truth. ``on_batch(paths, overflow)`` is called from the watcher
thread with a set of dirty paths relative to the root ('/'-separated, no leading slash,
"" for the root itself); the consumer re-stats them. ``overflow=True`` means events may
have been lost and the consumer must rescan everything (``paths`` may then be empty).

Backends, in default order: ``watchfiles`` (if importable), ``inotify`` (Linux, through
ctypes), ``poll`` (os.scandir walks). A backend that fails at run time falls back to the
next workable one and reports overflow once: watchfiles' "OS file watch limit reached" and
inotify's ENOSPC go to polling (and name the sysctl to raise); any other watchfiles error
(it cannot even represent names that are not UTF-8) goes to inotify.

Watching is established before ``start()`` returns, so a caller that starts the watcher
and then scans misses nothing that changed during its scan.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import math
import os
import select
import stat
import struct
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

__all__ = [
    "BACKENDS",
    "MAX_BATCH_PATHS",
    "MAX_LATENCY",
    "Watcher",
    "available_backends",
    "start_watcher",
]

log = logging.getLogger("syncd.agent.watch")

OnBatch = Callable[[Set[str], bool], None]
IsIgnored = Callable[[str, bool], bool]

BACKENDS = ("watchfiles", "inotify", "poll")

MAX_LATENCY = 0.2  # seconds: flush at least this often under continuous churn
MAX_BATCH_PATHS = 10000  # flush as soon as a batch holds this many paths
SETTLE_TIMEOUT = 10.0  # settle(): longest wait for the watcher thread
SETTLE_READS = 256  # settle(): at most this many reads of the inotify queue
READY_TIMEOUT = 60.0  # seconds start() waits for the watches to be in place
JOIN_TIMEOUT = 1.0  # seconds stop() waits for the thread

SYSCTL_WATCHES = "fs.inotify.max_user_watches"
SYSCTL_INSTANCES = "fs.inotify.max_user_instances"

# <sys/inotify.h>
IN_ACCESS = 0x00000001
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_CLOSE_NOWRITE = 0x00000010
IN_OPEN = 0x00000020
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

WATCH_MASK = (
    IN_CREATE
    | IN_DELETE
    | IN_MODIFY
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_ATTRIB
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)

# struct inotify_event { int wd; uint32_t mask; uint32_t cookie; uint32_t len; char name[]; }
_EVENT = struct.Struct("iIII")
_READ_SIZE = 64 * 1024
_COALESCE = 0.003  # seconds to let inotify events gather before a read


class _WatchLimit(Exception):
    """inotify_add_watch failed with ENOSPC/ENOMEM: no more watches can be added."""

    def __init__(self, err: int, path: str) -> None:
        super().__init__(err, path)
        self.errno = err
        self.path = path


# --------------------------------------------------------------------------- batching


class _Batcher:
    """Collects dirty paths; flushes after `step` of quiet, `max_latency` at most, or a cap.

    Thread-safe; the callback runs outside the lock, in the flushing thread.
    """

    def __init__(
        self,
        on_batch: OnBatch,
        step_ms: int,
        max_latency: float = MAX_LATENCY,
        max_paths: int = MAX_BATCH_PATHS,
    ) -> None:
        self._on_batch = on_batch
        self._step = max(1, step_ms) / 1000.0
        self._max_latency = max(max_latency, self._step)
        self._max_paths = max(1, max_paths)
        self._lock = threading.Lock()
        self._paths: Set[str] = set()
        self._overflow = False
        self._first = 0.0
        self._last = 0.0

    def _touch(self) -> None:  # caller holds the lock
        now = time.monotonic()
        if not self._paths and not self._overflow:
            self._first = now
        self._last = now

    def add(self, rel: str) -> None:
        with self._lock:
            self._touch()
            self._paths.add(rel)
            full = len(self._paths) >= self._max_paths
        if full:
            self.flush()

    def overflow(self) -> None:
        with self._lock:
            self._touch()
            self._overflow = True

    def deadline(self) -> Optional[float]:
        """Monotonic time at which the pending batch is due, or None if nothing is pending."""
        with self._lock:
            if not self._paths and not self._overflow:
                return None
            return min(self._last + self._step, self._first + self._max_latency)

    def flush_due(self) -> None:
        due = self.deadline()
        if due is not None and time.monotonic() >= due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if not self._paths and not self._overflow:
                return
            paths, overflow = self._paths, self._overflow
            self._paths = set()
            self._overflow = False
        try:
            self._on_batch(paths, overflow)
        except Exception:
            log.exception("watch: on_batch callback failed")


class _StopEvent(threading.Event):
    """The stop flag; while armed, a call to is_set() also signals `ready`.

    watchfiles first polls its stop_event once its watches are in place, so this tells
    start() when watching has begun.
    """

    def __init__(self) -> None:
        super().__init__()
        self._ready_probe: Optional[threading.Event] = None

    def arm(self, ready: threading.Event) -> None:
        self._ready_probe = ready

    def disarm(self) -> None:
        self._ready_probe = None

    def is_set(self) -> bool:
        probe = self._ready_probe
        if probe is not None:
            probe.set()
        return super().is_set()


# --------------------------------------------------------------------------- backends available


class _InotifyLib:
    """The three inotify calls of libc, typed."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._init1 = lib.inotify_init1
        self._init1.argtypes = [ctypes.c_int]
        self._init1.restype = ctypes.c_int
        self._add = lib.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._add.restype = ctypes.c_int
        self._rm = lib.inotify_rm_watch
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        self._rm.restype = ctypes.c_int

    def init1(self, flags: int) -> int:
        """Returns the fd; raises OSError."""
        fd = int(self._init1(flags))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return fd

    def add_watch(self, fd: int, path: bytes, mask: int) -> int:
        """Returns the watch descriptor; raises OSError."""
        wd = int(self._add(fd, path, mask))
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), os.fsdecode(path))
        return wd

    def rm_watch(self, fd: int, wd: int) -> None:
        self._rm(fd, wd)


_inotify_lib: Optional[_InotifyLib] = None
_inotify_checked = False
_watchfiles_ok: Optional[bool] = None


def _load_inotify() -> Optional[_InotifyLib]:
    global _inotify_lib, _inotify_checked
    if _inotify_checked:
        return _inotify_lib
    lib: Optional[_InotifyLib] = None
    if sys.platform.startswith("linux"):
        for name in (None, "libc.so.6", "find_library"):
            try:
                if name == "find_library":
                    name = ctypes.util.find_library("c")
                    if name is None:
                        break
                cdll = ctypes.CDLL(name, use_errno=True)
                lib = _InotifyLib(cdll)
                break
            except (OSError, AttributeError, TypeError):
                continue
    _inotify_lib = lib
    _inotify_checked = True
    return lib


def _watchfiles_importable() -> bool:
    global _watchfiles_ok
    if _watchfiles_ok is None:
        try:
            import watchfiles  # noqa: F401
        except Exception:
            _watchfiles_ok = False
        else:
            _watchfiles_ok = True
    return _watchfiles_ok


def _usable(backend: str, root: str) -> bool:
    if backend == "watchfiles":
        try:
            root.encode("utf-8")  # watchfiles cannot take a root that is not UTF-8
        except UnicodeEncodeError:
            return False
        return _watchfiles_importable()
    if backend == "inotify":
        return _load_inotify() is not None
    return backend == "poll"


def available_backends() -> List[str]:
    """The backends this interpreter can run, in default order."""
    return [b for b in BACKENDS if _usable(b, "/")]


def _fallback_after_watchfiles() -> str:
    return "inotify" if _load_inotify() is not None else "poll"


def _join(parent: str, name: str) -> str:
    return name if not parent else parent + "/" + name


def _parent(rel: str) -> str:
    i = rel.rfind("/")
    return rel[:i] if i >= 0 else ""


# --------------------------------------------------------------------------- the watcher


class Watcher:
    """A thread that watches `root` and calls `on_batch(paths, overflow)` from it.

    `backend` names the backend in use; it changes if the watcher falls back at run time.
    """

    backend: str = "poll"

    def __init__(
        self,
        root: str,
        on_batch: OnBatch,
        is_ignored: Optional[IsIgnored] = None,
        backend: str = "poll",
        step_ms: int = 20,
        poll_interval: float = 1.0,
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError("unknown watch backend %r (expected one of %s)" % (backend, BACKENDS))
        if isinstance(root, bytes):
            root = os.fsdecode(root)
        self.root = os.path.abspath(root)
        self._prefix = self.root if self.root.endswith("/") else self.root + "/"
        self.backend = backend
        self._is_ignored = is_ignored
        self._step_ms = max(1, int(step_ms))
        self._poll_interval = max(0.01, float(poll_interval))
        self._ready_timeout = ready_timeout
        self._batcher = _Batcher(on_batch, self._step_ms)
        self._stop = _StopEvent()
        self._ready = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()
        self._wake_lock = threading.Lock()
        self._wake_fd = -1
        self._engine: Optional[object] = None  # the running backend, for introspection
        self._settle: List[threading.Event] = []  # settle() calls waiting (under _wake_lock)
        self._placing = False  # see placing()

    # ---- public API

    def start(self) -> None:
        """Start the thread; returns once watching is in place. Idempotent."""
        with self._start_lock:
            if self._thread is not None or self._stop.is_set():
                return
            thread = threading.Thread(target=self._main, name="syncd-watch", daemon=True)
            self._thread = thread
            thread.start()
        if not self._ready.wait(self._ready_timeout):
            log.warning(
                "watch: %s watcher of %s not ready after %.0f s; continuing",
                self.backend,
                self.root,
                self._ready_timeout,
            )

    def stop(self, wait: bool = True) -> None:
        """Stop the thread; with ``wait``, join it (within about a second). Idempotent."""
        self._stop.set()
        self._wake()
        if not wait:
            return
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT)
            if thread.is_alive():
                log.warning("watch: watcher thread of %s did not stop within %.1f s", self.root, JOIN_TIMEOUT)

    def settle(self, timeout: float = SETTLE_TIMEOUT) -> bool:
        """Pass every event the kernel holds at this moment through ``on_batch`` (a
        partial batch included) before returning. For a caller that is about to rescan
        anyway and wants the reports of its own writes out of the way first. True if
        done; False at the timeout or with a backend that cannot tell (poll, watchfiles)."""
        if not isinstance(self._engine, _InotifyBackend) or not self.running:
            return False
        done = threading.Event()
        with self._wake_lock:
            self._settle.append(done)
        self._wake()
        return done.wait(timeout)

    @contextlib.contextmanager
    def placing(self) -> Iterator[None]:
        """For a caller about to move whole directories of its own into the tree, settle,
        and then rescan all of it: meanwhile a directory that appears is watched, with
        everything below it, but what it holds is not reported path by path (the inotify
        backend). A stream placing 50,000 files would report each, for nothing. Left by an
        exception, the whole tree is reported instead (the caller may not rescan then)."""
        self._placing = True
        try:
            yield
        except BaseException:
            self._batcher.overflow()
            self._batcher.add("")
            raise
        finally:
            self._placing = False

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def __repr__(self) -> str:
        return "<Watcher %s %r running=%s>" % (self.backend, self.root, self.running)

    # ---- thread

    def _main(self) -> None:
        name = self.backend
        try:
            while not self._stop.is_set():
                self.backend = name
                nxt: Optional[str]
                try:
                    nxt = self._run_backend(name)
                except Exception:
                    log.exception("watch: %s watcher of %s failed; falling back to polling", name, self.root)
                    self._batcher.overflow()
                    if name == "poll" and self._stop.wait(self._poll_interval):
                        break
                    nxt = "poll"
                if nxt is None:
                    break
                name = nxt
        except BaseException:  # never let anything escape the thread
            log.exception("watch: watcher thread of %s died", self.root)
        finally:
            self._ready.set()

    def _run_backend(self, name: str) -> Optional[str]:
        """Run one backend until stopped (None) or until it gives up (name of the next)."""
        engine: Any
        if name == "watchfiles":
            engine = _WatchfilesBackend(self)
        elif name == "inotify":
            engine = _InotifyBackend(self)
        else:
            engine = _PollBackend(self)
        self._engine = engine
        nxt: Optional[str] = engine.run()
        return nxt

    def _set_wake_fd(self, fd: int) -> None:
        with self._wake_lock:
            self._wake_fd = fd

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_fd >= 0:
                try:
                    os.write(self._wake_fd, b"x")
                except OSError:
                    pass

    # ---- paths

    def _abs(self, rel: str) -> str:
        return self.root if not rel else self._prefix + rel

    def _rel(self, path: str) -> Optional[str]:
        if path == self.root:
            return ""
        if path.startswith(self._prefix):
            return path[len(self._prefix) :].rstrip("/")
        return None

    def _ignored(self, rel: str, is_dir: bool) -> bool:
        if not rel or self._is_ignored is None:
            return False
        try:
            return bool(self._is_ignored(rel, is_dir))
        except Exception:
            log.exception("watch: is_ignored(%r) failed; treating the path as watched", rel)
            return False

    def _list_dir(self, rel: str, dirs_only: bool = False) -> List[Tuple[str, os.DirEntry[str], bool]]:
        """The entries of a directory that are not ignored: (relpath, entry, is_dir).

        Symlinks are never followed (except the root itself, by _abs("")). With
        `dirs_only`, other entries are left out before their (costly) ignore check."""
        out: List[Tuple[str, os.DirEntry[str], bool]] = []
        try:
            with os.scandir(self._abs(rel)) as it:
                for entry in it:
                    try:
                        is_dir = entry.is_dir(follow_symlinks=False)
                    except OSError:
                        is_dir = False
                    if dirs_only and not is_dir:
                        continue
                    child = _join(rel, entry.name)
                    if not self._ignored(child, is_dir):
                        out.append((child, entry, is_dir))
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                log.debug("watch: cannot list %r: %s", self._abs(rel), exc)
        return out

    def _report_subtree(self, rel: str) -> None:
        """Report every (not ignored) path below directory `rel`."""
        stack = [rel]
        seen: Set[int] = set()
        while stack and not self._stop.is_set():
            d = stack.pop()
            for child, entry, is_dir in self._list_dir(d):
                self._batcher.add(child)
                if is_dir:
                    try:
                        ino = entry.inode()
                    except OSError:
                        continue
                    if ino not in seen:
                        seen.add(ino)
                        stack.append(child)


# --------------------------------------------------------------------------- polling


_Key = Tuple[int, int, int, int]  # (mtime_ns, size, mode, ino)


def _key(st: os.stat_result) -> _Key:
    return (st.st_mtime_ns, st.st_size, st.st_mode, st.st_ino)


class _PollBackend:
    """Walk the tree every poll_interval and report what differs from the last walk."""

    def __init__(self, w: Watcher) -> None:
        self._w = w

    def run(self) -> Optional[str]:
        w = self._w
        snap = self.snapshot()
        w._ready.set()
        w._batcher.flush()  # e.g. the overflow of the backend we fell back from
        while not w._stop.wait(w._poll_interval):
            try:
                new = self.snapshot()
                if w._stop.is_set():
                    break
                self.diff(snap, new)
                snap = new
            except Exception:
                log.exception("watch: polling %s failed; reporting overflow", w.root)
                w._batcher.overflow()
            w._batcher.flush()
        return None

    def snapshot(self) -> Optional[Dict[str, _Key]]:
        """Every non-ignored path under the root with its key; None if the root is missing."""
        w = self._w
        try:
            st = os.stat(w.root)
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return None
        snap: Dict[str, _Key] = {"": _key(st)}
        seen = {(st.st_dev, st.st_ino)}
        stack = [""]
        while stack and not w._stop.is_set():
            d = stack.pop()
            for child, entry, is_dir in w._list_dir(d):
                try:
                    cst = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                snap[child] = _key(cst)
                if is_dir:
                    ident = (cst.st_dev, cst.st_ino)
                    if ident not in seen:  # bind-mount loops
                        seen.add(ident)
                        stack.append(child)
        return snap

    def diff(self, old: Optional[Dict[str, _Key]], new: Optional[Dict[str, _Key]]) -> None:
        b = self._w._batcher
        if old is None or new is None:
            if old is not new:  # the root vanished or came back
                log.warning("watch: root %s %s", self._w.root, "vanished" if new is None else "appeared")
                b.overflow()
                b.add("")
            return
        for rel, key in new.items():
            if old.get(rel) != key:
                b.add(rel)
        for rel in old:
            if rel not in new:
                b.add(rel)


# --------------------------------------------------------------------------- inotify


class _InotifyBackend:
    """Recursive inotify through ctypes: one watch per (non-ignored) directory."""

    def __init__(self, w: Watcher, lib: Optional[_InotifyLib] = None) -> None:
        self._w = w
        self._lib = lib if lib is not None else _load_inotify()
        self._fd = -1
        self._wd_to_rel: Dict[int, str] = {}
        self._rel_to_wd: Dict[str, int] = {}
        self._children: Dict[str, Set[str]] = {}  # watched dir -> its watched subdirs
        self._root_lost = False
        self._last_root_try = 0.0

    # ---- lifecycle

    def run(self) -> Optional[str]:
        w = self._w
        lib = self._lib
        if lib is None:
            log.warning("watch: inotify is not available here; falling back to polling")
            w._batcher.overflow()
            return "poll"
        try:
            self._fd = lib.init1(IN_NONBLOCK | IN_CLOEXEC)
        except OSError as exc:
            hint = ""
            if exc.errno == errno.EMFILE:
                hint = " (raise the sysctl %s)" % SYSCTL_INSTANCES
            log.warning("watch: inotify_init1 failed: %s%s; falling back to polling", exc, hint)
            w._batcher.overflow()
            return "poll"
        rpipe, wpipe = os.pipe()
        os.set_blocking(rpipe, False)
        os.set_blocking(wpipe, False)
        w._set_wake_fd(wpipe)
        try:
            try:
                self._add_tree("", report=False)
                if "" not in self._rel_to_wd:
                    log.warning("watch: cannot watch root %s (missing?); will retry", w.root)
                    self._root_lost = True
                    self._last_root_try = time.monotonic()
                w._ready.set()
                return self._loop(rpipe)
            except _WatchLimit as exc:
                return self._watch_limit(exc)
        finally:
            w._set_wake_fd(-1)
            for fd in (rpipe, wpipe, self._fd):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fd = -1

    def _watch_limit(self, exc: _WatchLimit) -> str:
        w = self._w
        if exc.errno == errno.ENOSPC:
            log.warning(
                "watch: inotify watch limit reached while watching %s (at %r); falling back "
                "to polling, which is slower and costs CPU on big trees. Raise the sysctl %s "
                "(e.g. `sysctl -w %s=524288`) to restore live watching.",
                w.root,
                exc.path,
                SYSCTL_WATCHES,
                SYSCTL_WATCHES,
            )
        else:
            log.warning(
                "watch: inotify_add_watch(%r) failed: %s; falling back to polling",
                exc.path,
                os.strerror(exc.errno),
            )
        w._batcher.overflow()
        return "poll"

    def _loop(self, rpipe: int) -> Optional[str]:
        w = self._w
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(rpipe, select.POLLIN)
        while not w._stop.is_set():
            due = w._batcher.deadline()
            if due is None:
                timeout = w._poll_interval if self._root_lost else 1.0
            else:
                timeout = max(0.0, due - time.monotonic())
            ready = poller.poll(int(math.ceil(timeout * 1000)))
            if w._stop.is_set():
                break
            for fd, mask in ready:
                if fd == rpipe:
                    try:
                        os.read(rpipe, 512)
                    except OSError:
                        pass
                elif fd == self._fd:
                    if mask & (select.POLLERR | select.POLLNVAL):
                        raise OSError(errno.EIO, "inotify descriptor failed")
                    # let events gather first: one read then takes many, and a busy writer
                    # in this process (the agent applying files) is not slowed by a
                    # wake-up per event
                    time.sleep(_COALESCE)
                    self._read()
            if w._settle:
                self._settle_now()
            w._batcher.flush_due()
            if self._root_lost and time.monotonic() - self._last_root_try >= w._poll_interval:
                self._try_restore_root()
        return None

    def _read(self) -> int:
        try:
            buf = os.read(self._fd, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return 0
        self.handle_events(buf)
        return len(buf)

    def _settle_now(self) -> None:
        """Answer settle(): read what the kernel queued up to now, flush the batch."""
        w = self._w
        with w._wake_lock:
            waiting, w._settle = w._settle, []
        # Bounded: a writer still busy keeps queueing; what comes after the call may wait.
        for _ in range(SETTLE_READS):
            if self._read() == 0:
                break
        w._batcher.flush()
        for done in waiting:
            done.set()

    # ---- watches

    def _add_watch(self, path: str, follow: bool = False) -> int:
        assert self._lib is not None
        mask = WATCH_MASK | IN_ONLYDIR
        if not follow:
            mask |= IN_DONT_FOLLOW
        return self._lib.add_watch(self._fd, os.fsencode(path), mask)

    def _rm_watch(self, wd: int) -> None:
        if self._lib is not None and self._fd >= 0:
            try:
                self._lib.rm_watch(self._fd, wd)
            except Exception:
                pass

    def _map(self, wd: int, rel: str) -> None:
        old = self._wd_to_rel.get(wd)
        if old is not None and old != rel and self._rel_to_wd.get(old) == wd:
            self._unlink(old)
        self._wd_to_rel[wd] = rel
        self._rel_to_wd[rel] = wd
        if rel:
            self._children.setdefault(_parent(rel), set()).add(rel)
        else:
            self._root_lost = False

    def _unlink(self, rel: str) -> None:
        """Forget the path `rel` (not its watch descriptor)."""
        self._rel_to_wd.pop(rel, None)
        if rel:
            siblings = self._children.get(_parent(rel))
            if siblings is not None:
                siblings.discard(rel)
                if not siblings:
                    del self._children[_parent(rel)]

    def _forget_wd(self, wd: int) -> Optional[str]:
        rel = self._wd_to_rel.pop(wd, None)
        if rel is not None and self._rel_to_wd.get(rel) == wd:
            self._unlink(rel)
        return rel

    def _add_tree(self, rel: str, report: bool) -> None:
        """Watch directory `rel` and every non-ignored directory below it.

        Each directory is watched before it is listed, so an entry created meanwhile is
        either listed or produces an event. With `report`, every path found is reported
        (it may have been created before its directory was watched)."""
        w = self._w
        stack = [rel]
        seen: Set[int] = set()
        while stack and not w._stop.is_set():
            d = stack.pop()
            path = w._abs(d)
            try:
                wd = self._add_watch(path, follow=not d)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                    raise _WatchLimit(exc.errno, path) from None
                if exc.errno in (errno.EACCES, errno.EPERM):
                    log.debug("watch: cannot watch %r: %s", path, exc)  # nor read it
                elif exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    log.warning("watch: cannot watch %r: %s", path, exc)
                continue
            if wd in seen:  # the same directory again (bind mount): do not loop
                continue
            seen.add(wd)
            self._map(wd, d)
            for child, _entry, is_dir in w._list_dir(d, dirs_only=not report):
                if report:
                    w._batcher.add(child)
                if is_dir:
                    stack.append(child)

    def _drop_tree(self, rel: str) -> None:
        """Remove the watches of directory `rel` and of every watched directory below it."""
        stack = [rel]
        while stack:
            r = stack.pop()
            stack.extend(self._children.pop(r, ()))
            wd = self._rel_to_wd.get(r)
            self._unlink(r)
            if wd is not None:
                if self._wd_to_rel.get(wd) == r:
                    del self._wd_to_rel[wd]
                self._rm_watch(wd)

    def _lose_root(self) -> None:
        w = self._w
        log.warning("watch: root %s was deleted or moved; will rescan when it is back", w.root)
        self._drop_tree("")
        self._root_lost = True
        self._last_root_try = time.monotonic()
        w._batcher.overflow()
        w._batcher.add("")

    def _try_restore_root(self) -> None:
        self._last_root_try = time.monotonic()
        if not os.path.isdir(self._w.root):
            return
        self._add_tree("", report=False)
        if "" in self._rel_to_wd:
            log.warning("watch: root %s is back; rescanning", self._w.root)
            self._w._batcher.overflow()
            self._w._batcher.add("")

    # ---- events

    def handle_events(self, buf: bytes) -> None:
        """Parse a buffer read from the inotify descriptor and handle each event."""
        off = 0
        size = _EVENT.size
        end = len(buf)
        while off + size <= end:
            wd, mask, cookie, length = _EVENT.unpack_from(buf, off)
            off += size
            raw = buf[off : off + length]
            off += length
            name = os.fsdecode(raw.split(b"\0", 1)[0]) if length else ""
            self.handle_event(wd, mask, cookie, name)

    def handle_event(self, wd: int, mask: int, cookie: int, name: str) -> None:
        w = self._w
        b = w._batcher
        if mask & IN_Q_OVERFLOW:
            log.warning("watch: inotify queue overflowed on %s; rescanning", w.root)
            b.overflow()
            return
        if mask & IN_IGNORED:  # the watch is gone (deleted, unmounted, or removed by us)
            rel = self._forget_wd(wd)
            if rel == "" and not self._root_lost:
                self._lose_root()
            return
        parent = self._wd_to_rel.get(wd)
        if parent is None:
            return  # a watch we already dropped
        if not name:  # about the watched directory itself
            if mask & IN_UNMOUNT:
                b.overflow()
            if parent == "" and mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT):
                self._lose_root()
                return
            if mask & IN_MOVE_SELF:
                return  # reported by its parent's IN_MOVED_FROM
            b.add(parent)
            return
        rel = _join(parent, name)
        is_dir = bool(mask & IN_ISDIR)
        if w._ignored(rel, is_dir):
            return
        b.add(rel)
        if is_dir:
            if mask & (IN_CREATE | IN_MOVED_TO):
                self._add_tree(rel, report=not w._placing)
            elif mask & IN_MOVED_FROM:
                self._drop_tree(rel)


# --------------------------------------------------------------------------- watchfiles


def _is_watch_limit(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return "watch limit" in str(exc).lower()


class _WatchfilesBackend:
    """watchfiles (Rust notify); paths come back absolute and are made relative."""

    def __init__(self, w: Watcher) -> None:
        self._w = w

    def run(self) -> Optional[str]:
        w = self._w
        try:
            import watchfiles
        except Exception as exc:
            log.warning("watch: watchfiles cannot be imported (%s); falling back", exc)
            w._batcher.overflow()
            return _fallback_after_watchfiles()
        added = watchfiles.Change.added
        kwargs: Dict[str, Any] = {
            "watch_filter": None,
            "step": w._step_ms,
            "debounce": max(w._step_ms, int(MAX_LATENCY * 1000)),
            "rust_timeout": 1000,
            "yield_on_timeout": True,
            "stop_event": w._stop,
            "raise_interrupt": False,
            "ignore_permission_denied": True,
        }
        gen: Any = None
        w._stop.arm(w._ready)
        try:
            try:
                gen = watchfiles.watch(w.root, **kwargs)
            except TypeError:  # an older watchfiles
                kwargs.pop("ignore_permission_denied")
                gen = watchfiles.watch(w.root, **kwargs)
            for changes in gen:
                w._ready.set()
                w._stop.disarm()
                if w._stop.is_set():
                    return None
                skip: Dict[str, bool] = {}  # ancestor dir -> ignored or a symlink
                for change, path in changes:
                    self._note(change == added, path, skip)
                w._batcher.flush()
        except Exception as exc:
            w._stop.disarm()  # not ready: the fallback backend will say when it is
            if w._stop.is_set():
                return None
            w._batcher.overflow()
            if _is_watch_limit(exc):
                log.warning(
                    "watch: watchfiles: %s while watching %s; falling back to polling, which "
                    "is slower. Raise the sysctl %s (e.g. `sysctl -w %s=524288`) to restore "
                    "live watching.",
                    exc,
                    w.root,
                    SYSCTL_WATCHES,
                    SYSCTL_WATCHES,
                )
                return "poll"
            nxt = _fallback_after_watchfiles()
            log.warning("watch: watchfiles failed on %s (%s); falling back to %s", w.root, exc, nxt)
            return nxt
        finally:
            w._stop.disarm()
            if gen is not None:
                try:
                    gen.close()
                except Exception:
                    pass
        if w._stop.is_set():
            return None
        log.warning("watch: watchfiles stopped unexpectedly on %s; falling back", w.root)
        w._batcher.overflow()
        return _fallback_after_watchfiles()

    def _note(self, is_added: bool, path: str, skip: Dict[str, bool]) -> None:
        w = self._w
        rel = w._rel(path)
        if rel is None:
            return
        if not rel:
            w._batcher.add("")
            if not os.path.isdir(w.root):
                w._batcher.overflow()
            return
        # watchfiles watches everything and follows symlinked directories: drop what lies
        # in (or is) an ignored directory, and what lies below a symlink
        prefix = ""
        for part in rel.split("/")[:-1]:
            prefix = _join(prefix, part)
            hit = skip.get(prefix)
            if hit is None:
                try:
                    hit = stat.S_ISLNK(os.lstat(w._abs(prefix)).st_mode)
                except OSError:
                    hit = False
                hit = skip[prefix] = hit or w._ignored(prefix, True)
            if hit:
                return
        try:
            is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
        except OSError:
            is_dir = False
        if w._ignored(rel, is_dir):
            return
        w._batcher.add(rel)
        if is_added and is_dir:
            # a new directory may already hold entries that raced its watch
            w._report_subtree(rel)


# --------------------------------------------------------------------------- entry point


def start_watcher(
    root: str,
    on_batch: Callable[[Set[str], bool], None],
    is_ignored: Callable[[str, bool], bool] | None = None,
    prefer: str | None = None,
    step_ms: int = 20,
    poll_interval: float = 1.0,
) -> Watcher:
    """Start watching `root`; returns a running Watcher once watching is in place.

    `prefer` forces a backend ("watchfiles", "inotify" or "poll"); if it cannot run here,
    the next one in default order is used (with a warning).
    """
    if prefer is not None and prefer not in BACKENDS:
        raise ValueError("unknown watch backend %r (expected one of %s)" % (prefer, BACKENDS))
    if isinstance(root, bytes):
        root = os.fsdecode(root)
    order = list(BACKENDS)
    if prefer is not None:
        order = order[order.index(prefer) :]
    backend = next((b for b in order if _usable(b, root)), "poll")
    if prefer is not None and backend != prefer:
        log.warning("watch: backend %s is not available here; using %s", prefer, backend)
    watcher = Watcher(
        root,
        on_batch,
        is_ignored=is_ignored,
        backend=backend,
        step_ms=step_ms,
        poll_interval=poll_interval,
    )
    watcher.start()
    return watcher
