"""The remote's own GNU tar, for extracting what the daemon pushes.

Unpacking tens of thousands of small files costs the agent's interpreter about twice what
it costs GNU tar in system calls and Python bytecode; where the remote has GNU tar, the
agent hands it the stream through a pipe instead. Only streams from the daemon go this
way: the daemon archived them from its own scan, so no member name escapes and no member
is a device. (A stream from a remote is always unpacked by syncd's own TarExtractor, which
trusts nothing.) GNU tar still refuses ``..`` and absolute names, and makes a symlink only
after the members that could be written through it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from typing import IO, Callable, Dict, List, Optional, Set, Tuple

from syncd.fsops import size_pipe, write_all
from syncd.protocol import messages as m
from syncd.scan import is_under

# syncd.tarstream is imported where it is used: the agent imports this module at start
# (find_gnu_tar) and needs the rest only for a stream.

_STDERR_KEEP = 4096  # bytes of tar's complaints quoted in an error
_unset = object()
_found: object = _unset


def find_gnu_tar() -> Optional[str]:
    """The path of GNU tar on this host, or None (looked up once per process)."""
    global _found
    if _found is _unset:
        _found = None
        path = shutil.which("tar")
        if path is not None:
            try:
                out = subprocess.run([path, "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                out = b""
            if out.startswith(b"tar (GNU tar) 1."):
                _found = path
    return _found if isinstance(_found, str) else None


class TarProcess:
    """GNU tar extracting into ``staging`` (made here, empty, 0700): ``feed`` it the
    stream (a write blocks while tar is behind: that is the back-pressure), ``end`` it for
    what was staged, ``close`` to remove the staging area. Modes are kept exactly (``-p``),
    owners are not; directory metadata is set last."""

    def __init__(self, tar: str, staging: str, is_ignored: Optional[Callable[[str, bool], bool]] = None) -> None:
        os.mkdir(staging, 0o700)
        self.staging = staging
        self.is_ignored = is_ignored
        self._stderr: List[bytes] = []
        try:
            self.proc = subprocess.Popen(
                [tar, "-x", "-f", "-", "-p", "--no-same-owner", "--warning=no-unknown-keyword", "-C", staging],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except BaseException:
            os.rmdir(staging)
            raise
        assert self.proc.stdin is not None and self.proc.stderr is not None
        self._in = self.proc.stdin.fileno()
        size_pipe(self._in)
        self._broken = False
        self._reader = threading.Thread(target=self._keep_stderr, args=(self.proc.stderr,),
                                        name="syncd-tar-err", daemon=True)
        self._reader.start()

    def _keep_stderr(self, pipe: IO[bytes]) -> None:
        kept = 0
        for line in pipe:
            if kept < _STDERR_KEEP:
                self._stderr.append(line[: _STDERR_KEEP - kept])
                kept += len(line)

    def feed(self, data: bytes) -> None:
        if self._broken:
            return
        try:
            write_all(self._in, data)
        except BrokenPipeError:
            self._broken = True  # tar stopped reading: its status and stderr say why

    def end(self) -> Tuple[Dict[str, m.Entry], List[m.Skip]]:
        """The stream is complete: wait for tar, then list what it staged (see
        scan_staged). Raises ExtractError if tar failed."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        status = self.proc.wait()
        self._reader.join()
        if status != 0:
            from syncd.tarstream import ExtractError

            detail = b"".join(self._stderr).decode("utf-8", "replace").strip().replace("\n", "; ")
            raise ExtractError("tar failed (status %d)%s" % (status, ": " + detail if detail else ""))
        return _staged(self.staging, self.is_ignored)

    def abort(self) -> None:
        """Stop tar now (the stream will not be completed)."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait()
        self._reader.join()

    def close(self) -> None:
        """Remove the staging directory and whatever is left in it."""
        shutil.rmtree(self.staging, ignore_errors=True)


class DirectStaging:
    """A staging directory for a stream the daemon unpacks with this host's GNU tar itself
    (TarReady), through a process of its own: ``end`` lists what tar staged. Should the
    daemon send the stream as TarData after all (its own way failed before tar ran), a
    TarProcess takes over on a fresh staging directory."""

    def __init__(self, tar: str, staging: str, is_ignored: Optional[Callable[[str, bool], bool]] = None) -> None:
        os.mkdir(staging, 0o700)
        self.tar = tar
        self.staging = staging
        self.is_ignored = is_ignored
        self.inner: Optional[TarProcess] = None
        self.expected: Dict[str, Optional[m.Entry]] = {}  # see scan_staged
        self.listed_in_place = False  # see end

    def expect(self, entry: m.Entry) -> None:
        """A member of the archive, as the daemon listed it (TarDigests): checked against
        the rules now, while tar works, so that listing the staging area needs neither a
        stat nor a rule lookup per entry."""
        ignored = self.is_ignored is not None and self.is_ignored(entry.path, entry.kind == m.DIR)
        self.expected[entry.path] = None if ignored else entry

    def feed(self, data: bytes) -> None:
        if self.inner is None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.inner = TarProcess(self.tar, self.staging, self.is_ignored)
        self.inner.feed(data)

    def end(self, shared: int = -1) -> Tuple[Dict[str, m.Entry], List[m.Skip]]:
        """The daemon's tar finished (or the TarData did): what was staged.

        Where the daemon named ``shared`` entries and each was expected, the list is the
        whole archive: what tar staged is taken from it, without a walk of the staging
        area (a few hundred milliseconds for 50,000 entries, between the end of the
        stream and its placement). The entries keep the daemon's inodes then
        (``listed_in_place``): read the real ones where they are placed (tarstream.in_place)."""
        if self.inner is not None:
            return self.inner.end()
        if shared > 0 and shared == len(self.expected):
            self.listed_in_place = True
            return self._from_list(), []
        return _staged(self.staging, self.is_ignored, self.expected)

    def _from_list(self) -> Dict[str, m.Entry]:
        """The expected entries, once those the rules ignore here are out of the staging
        area (and what lies below them); their directories keep the times tar gave them."""
        dropped = sorted((rel for rel, entry in self.expected.items() if entry is None), key=len)
        removed: Set[str] = set()
        touched: Dict[str, os.stat_result] = {}
        for rel in dropped:
            if is_under(rel, removed):
                continue
            path = os.path.join(self.staging, rel)
            parent = os.path.dirname(path)
            try:
                if parent not in touched:
                    touched[parent] = os.stat(parent, follow_symlinks=False)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                from syncd.tarstream import ExtractError

                raise ExtractError("cannot remove the ignored %s from the staging area: %s"
                                   % (rel, exc.strerror or exc)) from None
            removed.add(rel)
        for parent, st in touched.items():
            if os.path.isdir(parent):
                os.utime(parent, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        # Digests are the daemon's to record, as with the walk (none come from a push).
        return {rel: entry if entry.digest is None else entry._replace(digest=None)
                for rel, entry in self.expected.items()
                if entry is not None and not (removed and is_under(rel, removed))}

    def abort(self) -> None:
        if self.inner is not None:
            self.inner.abort()

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def _staged(staging: str, is_ignored: Optional[Callable[[str, bool], bool]],
            expected: Optional[Dict[str, Optional[m.Entry]]] = None) -> Tuple[Dict[str, m.Entry], List[m.Skip]]:
    from syncd.tarstream import ExtractError, scan_staged

    try:
        return scan_staged(staging, is_ignored, expected)
    except OSError as exc:
        raise ExtractError("cannot list the staging area %s: %s" % (staging, exc.strerror or exc)) from None

