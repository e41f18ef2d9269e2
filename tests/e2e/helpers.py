"""Helpers for end-to-end tests that run the real ``syncd`` CLI against a real sshd.

- :func:`start_session` runs ``python -m syncd.cli run LOCAL REMOTE ...`` as a subprocess
  (stdout and stderr go to files) and returns a :class:`SyncProcess`.
- :func:`wait_until` polls a predicate every 20 ms.
- :func:`tree_snapshot` describes a tree as ``{relpath: (kind, mode & 0o777, digest or
  link target)}`` so that two trees can be compared with ``==``.
- :func:`run_cli` runs a short-lived CLI invocation (for the bad-input tests).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

from tests.sshd import SshServer

StrPath = Union[str, "os.PathLike[str]"]
T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
POLL_INTERVAL = 0.02
STOP_TIMEOUT = 20.0


# ---------------------------------------------------------------------------------------
# running the CLI
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def cli_argv() -> tuple[str, ...]:
    """How to start the CLI: ``python -m syncd.cli`` (cli.py calls main() when run as a
    module), else the ``syncd`` console script."""
    module = (sys.executable, "-m", "syncd.cli")
    probe = subprocess.run([*module, "--version"], capture_output=True, env=cli_env(), check=False)
    if probe.returncode == 0:
        return module
    script = shutil.which("syncd")
    if script is None:
        raise RuntimeError("neither `python -m syncd.cli` nor a `syncd` script works:\n"
                           + probe.stderr.decode(errors="replace"))
    return (script,)


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # each change line reaches the stdout file at once
    # Run the package from this checkout whatever the current directory is.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("SYNCD_SOCKET", None)
    return env


def ssh_args(server: SshServer) -> list[str]:
    """``--identity`` and ``--known-hosts`` for *server*."""
    return ["--identity", str(server.client_key), "--known-hosts", str(server.known_hosts)]


@dataclass
class SyncProcess:
    """One ``syncd run`` process; its output goes to ``stdout_path`` / ``stderr_path``."""

    proc: "subprocess.Popen[bytes]"
    argv: list[str]
    stdout_path: Path
    stderr_path: Path

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout_lines(self) -> list[str]:
        return self.stdout().splitlines()

    def change_lines(self) -> list[str]:
        """Lines reporting a change in either direction (``->`` or ``<-``)."""
        return [line for line in self.stdout_lines() if line.startswith(("->", "<-"))]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def describe(self) -> str:
        return (
            f"syncd exit status: {self.proc.poll()}\n"
            f"--- stdout ---\n{self.stdout()[-4000:]}\n--- stderr ---\n{self.stderr()[-6000:]}"
        )

    def assert_alive(self) -> None:
        if not self.alive():
            raise AssertionError("the syncd session exited early\n" + self.describe())

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then assert it exits 0 within *timeout* seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"syncd did not exit within {timeout:.0f} s of SIGTERM\n" + self.describe()
            ) from None
        assert code == 0, f"syncd exited {code} after SIGTERM\n" + self.describe()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_session(
    server: SshServer,
    local: StrPath,
    remote: StrPath,
    state_dir: StrPath,
    *extra: str,
    log_dir: Optional[StrPath] = None,
    verbose: bool = True,
    name: str = "session",
) -> SyncProcess:
    """Start ``syncd run LOCAL ssh://.../REMOTE`` in the background.

    ``verbose`` adds ``-v`` (INFO logs on stderr, e.g. "agent on python X.Y.Z"). Output
    files go to *log_dir* (default: the parent of *state_dir*) as ``NAME.out`` / ``NAME.err``;
    an existing file of that name is replaced.
    """
    logs = Path(log_dir) if log_dir is not None else Path(state_dir).parent
    logs.mkdir(parents=True, exist_ok=True)
    stdout_path = logs / f"{name}.out"
    stderr_path = logs / f"{name}.err"
    argv = [
        *cli_argv(), "run", os.fspath(local), server.url(remote), *ssh_args(server),
        "--state-dir", os.fspath(state_dir), *(["-v"] if verbose else []), *extra,
    ]
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=cli_env())
    return SyncProcess(proc, argv, stdout_path, stderr_path)


def run_cli(args: Sequence[str], timeout: float = 30.0) -> "subprocess.CompletedProcess[str]":
    """Run ``syncd ARGS`` to completion (for invocations expected to fail fast)."""
    return subprocess.run(
        [*cli_argv(), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
        check=False,
    )


# ---------------------------------------------------------------------------------------
# waiting
# ---------------------------------------------------------------------------------------


# Deadlines are generous on purpose: they catch hangs, not slowness (benchmarks do that).
TIMEOUT_SCALE = float(os.environ.get("SYNCD_TEST_TIMEOUT_SCALE", "2"))


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 15.0,
    *,
    interval: float = POLL_INTERVAL,
    message: Union[str, Callable[[], str], None] = None,
    session: Optional[SyncProcess] = None,
) -> T:
    """Poll *predicate* every *interval* s until it returns something truthy; return it.

    Raises AssertionError after *timeout* s, or at once when *session* has exited.
    """
    timeout *= TIMEOUT_SCALE
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if session is not None and not session.alive():
            value = predicate()
            if value:
                return value
            raise AssertionError(
                f"syncd exited while waiting for: {_text(message)}\n" + session.describe()
            )
        if time.monotonic() >= deadline:
            detail = f"\n{session.describe()}" if session is not None else ""
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for: {_text(message)}{detail}")
        time.sleep(interval)


def _text(message: Union[str, Callable[[], str], None]) -> str:
    if message is None:
        return "condition"
    return message() if callable(message) else message


# ---------------------------------------------------------------------------------------
# trees
# ---------------------------------------------------------------------------------------

FILE = "file"
DIR = "dir"
LINK = "link"
OTHER = "other"

Snapshot = dict[str, tuple[Any, ...]]
# (absolute path, dev, ino, size, mtime_ns, ctime_ns) -> digest; ctime moves on every write.
_DIGESTS: dict[tuple[bytes, int, int, int, int, int], str] = {}


def file_digest(path: StrPath) -> str:
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def bytes_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=20).hexdigest()


def _cached_digest(path: bytes, st: os.stat_result) -> Optional[str]:
    key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    found = _DIGESTS.get(key)
    if found is not None:
        return found
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        h = hashlib.blake2b(digest_size=20)
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if (after.st_ino, after.st_size, after.st_mtime_ns, after.st_ctime_ns) != key[2:]:
        return None  # replaced or written while read: let the caller retry later
    if len(_DIGESTS) > 200_000:
        _DIGESTS.clear()
    _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def tree_snapshot(root: StrPath, *, mtimes: bool = False) -> Snapshot:
    """``{relpath: (kind, mode & 0o777, digest or link target[, mtime_ns])}`` for a tree.

    Relative paths are ``str`` with undecodable bytes surrogate-escaped (``os.fsdecode``),
    so names that are not UTF-8 are kept. Symlinks are never followed. Directories carry
    no digest and no mtime; with ``mtimes`` files get their mtime_ns as a 4th element.
    A file that vanishes or changes while it is read gets the digest ``None``.
    """
    out: Snapshot = {}
    base = os.fsencode(os.fspath(root))
    stack = [b""]
    while stack:
        rel_dir = stack.pop()
        directory = base + b"/" + rel_dir if rel_dir else base
        try:
            it = os.scandir(directory)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for item in it:
                rel = rel_dir + b"/" + item.name if rel_dir else item.name
                try:
                    st = item.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                key = os.fsdecode(rel)
                perm = stat.S_IMODE(st.st_mode) & 0o777
                if stat.S_ISDIR(st.st_mode):
                    out[key] = (DIR, perm, None)
                    stack.append(rel)
                elif stat.S_ISLNK(st.st_mode):
                    try:
                        target = os.fsdecode(os.readlink(item.path))
                    except FileNotFoundError:
                        continue
                    out[key] = (LINK, perm, target)
                elif stat.S_ISREG(st.st_mode):
                    digest = _cached_digest(item.path, st)
                    out[key] = (FILE, perm, digest, st.st_mtime_ns) if mtimes else (FILE, perm, digest)
                else:
                    out[key] = (OTHER, perm, None)
    return out


def snapshot_diff(a: Snapshot, b: Snapshot, names: tuple[str, str] = ("local", "remote"), limit: int = 40) -> str:
    """A short human-readable difference of two snapshots."""
    lines = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        if left != right:
            lines.append(f"  {key!r}: {names[0]}={left} {names[1]}={right}")
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return f"{len(lines)} difference(s):\n" + "\n".join(lines[:limit]) + more


def wait_trees_equal(
    local: StrPath,
    remote: StrPath,
    session: Optional[SyncProcess] = None,
    timeout: float = 15.0,
    *,
    mtimes: bool = False,
    what: str = "trees to match",
    interval: float = POLL_INTERVAL,
) -> Snapshot:
    """Wait until both trees have equal snapshots; return the snapshot."""
    last: list[tuple[Snapshot, Snapshot]] = []

    def same() -> bool:
        a, b = tree_snapshot(local, mtimes=mtimes), tree_snapshot(remote, mtimes=mtimes)
        last[:] = [(a, b)]
        # A None digest means a file was being replaced while read: look again.
        return a == b and all(v[2] is not None for v in a.values() if v[0] == FILE)

    def message() -> str:
        return f"{what}; " + (snapshot_diff(*last[0]) if last else "no snapshot")

    wait_until(same, timeout, interval=interval, message=message, session=session)
    return last[0][0]


def bpath(root: StrPath, *parts: Union[str, bytes]) -> bytes:
    """A bytes path under *root* (for names that are not UTF-8)."""
    out = os.fsencode(os.fspath(root))
    for part in parts:
        out = os.path.join(out, os.fsencode(part) if isinstance(part, str) else part)
    return out


def write_file(path: Union[StrPath, bytes], data: Union[bytes, str], mode: Optional[int] = None) -> None:
    if isinstance(data, str):
        data = data.encode()
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    if mode is not None:
        os.chmod(path, mode)


def single_error_line(stderr: str) -> str:
    """Assert *stderr* is exactly one line starting with ``syncd: error:``; return it."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("syncd: error:"), f"stderr does not start with 'syncd: error:':\n{stderr}"
    return lines[0]
