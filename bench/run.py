#!/usr/bin/env python3
"""Benchmark syncd against ``rsync -a``, ``tar | ssh tar -x`` and Unison, all over OpenSSH.

Everything runs on 127.0.0.1: one throw-away OpenSSH ``sshd`` (``tests/sshd.py``), one
generated tree, one destination directory per tool. See ``bench/README.md``.

    python3 bench/run.py [--files N] [--size-mb M] [--edits K] [--quick] [--noop-only]
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import hashlib
import importlib
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
RESULTS_JSON = BENCH_DIR / "results-latest.json"

# Timeouts (seconds): a step that exceeds its timeout is reported as failed, never waited on.
T_INITIAL = 600.0
T_RUN = 300.0  # one rsync / unison run after the initial one
T_READY = 600.0  # syncd catching up after a restart
T_EDIT = 10.0  # one propagated edit
T_BURST = 300.0
T_STOP = 30.0  # syncd answering SIGTERM
T_GIT = 300.0

# Targets from the issue.
TARGET_P50_MS = 30.0
TARGET_P99_MS = 150.0
TARGET_INITIAL_RATIO = 1.0
TARGET_NOOP_RATIO = 0.5

SYNCD_TEMP_PREFIX = ".syncd-tmp-"  # syncd's in-flight temp files (syncd/scan.py)

_WORDS_TEXT = (
    "def class return import from self if else elif for while in not and or None True False "
    "yield lambda try except finally with as pass break continue raise assert data value result "
    "index count item items key name path config buffer state node child parent size offset "
    "stream reader writer request response handler session error message status update"
)
WORDS = _WORDS_TEXT.split()


class BenchError(Exception):
    """A step failed (timeout, non-zero exit, wrong result); the message says which."""


# ------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group started for *proc* (always created with start_new_session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def repo_env() -> dict[str, str]:
    """This environment, with this checkout first on the import path (syncd runs from it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_timed(argv: list[str], *, timeout: float, logfile: Path, what: str,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> float:
    """Run *argv* to completion; return its wall time. Raise BenchError on failure or timeout."""
    with open(logfile, "ab") as out:
        out.write(f"\n$ {shlex.join(argv)}\n".encode())
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                cwd=cwd, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise BenchError(f"{what}: timed out after {timeout:.0f} s (log {logfile})") from None
        elapsed = time.perf_counter() - start
    if rc != 0:
        raise BenchError(f"{what}: exit status {rc} (log {logfile}):\n{tail(logfile)}")
    return elapsed


def git(repo: Path, *args: str, timeout: float = T_GIT) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.invalid",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@example.invalid",
               GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull)
    result = subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, timeout=timeout,
                            check=False)
    if result.returncode != 0:
        raise BenchError(f"git {' '.join(args)}: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout.decode()


# ------------------------------------------------------------------------------------------
# trees: walking, snapshots, verification
# ------------------------------------------------------------------------------------------


def iter_tree(root: Path) -> Iterator[tuple[str, os.DirEntry[str], bool]]:
    """(relative path, entry, is_dir) for everything under *root*; races are skipped."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(os.path.join(root, rel_dir)) as it:
                entries = list(it)
        except OSError:
            continue
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir:
                stack.append(rel)
            yield rel, entry, is_dir


def sizes(root: Path) -> dict[str, int]:
    """path -> size of every regular file (syncd temp files excluded)."""
    out: dict[str, int] = {}
    for rel, entry, is_dir in iter_tree(root):
        if is_dir or entry.name.startswith(SYNCD_TEMP_PREFIX):
            continue
        try:
            out[rel] = entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return out


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def manifest(root: Path) -> dict[str, tuple[int, str]]:
    """path -> (size, sha1) for files and (-1, "dir") for directories."""
    out: dict[str, tuple[int, str]] = {}
    for rel, entry, is_dir in iter_tree(root):
        if is_dir:
            out[rel] = (-1, "dir")
            continue
        try:
            size = entry.stat(follow_symlinks=False).st_size
            out[rel] = (size, file_digest(Path(entry.path)))
        except OSError:
            continue
    return out


def compare(expected: dict[str, tuple[int, str]], actual: dict[str, tuple[int, str]]) -> dict[str, Any]:
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    differ = sorted(p for p in set(expected) & set(actual) if expected[p] != actual[p])
    return {
        "ok": not (missing or extra or differ),
        "missing": len(missing),
        "extra": len(extra),
        "differ": len(differ),
        "examples": (missing[:3] + extra[:3] + differ[:3]),
    }


# ------------------------------------------------------------------------------------------
# the generated tree
# ------------------------------------------------------------------------------------------


@dataclass
class Burst:
    """The change between the two git revisions: what the remote must look like after it."""

    changed: dict[str, tuple[int, str]] = field(default_factory=dict)  # repo path -> (size, sha1)
    deleted: list[str] = field(default_factory=list)
    modified: int = 0
    added: int = 0


@dataclass
class Tree:
    root: Path
    files: int = 0
    total_bytes: int = 0
    large_files: list[str] = field(default_factory=list)
    editable: list[str] = field(default_factory=list)  # small files outside the git repo
    burst: Burst = field(default_factory=Burst)
    repo_files: int = 0


def make_corpus(rng: random.Random, size: int) -> bytes:
    lines: list[str] = []
    total = 0
    while total < size:
        line = "    " * rng.randint(0, 3) + " ".join(rng.choices(WORDS, k=rng.randint(2, 10))) + "\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()


def source_like(rng: random.Random, corpus: bytes, size: int, tag: str) -> bytes:
    header = f"# {tag} {rng.getrandbits(64):016x}\n".encode()
    n = max(0, size - len(header))
    offset = rng.randrange(0, len(corpus) - n)
    return header + corpus[offset : offset + n]


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


EXTS = (".py", ".py", ".c", ".h", ".js", ".ts", ".md", ".txt", ".json", ".rs")


def generate_tree(root: Path, files: int, size_mb: int, seed: int) -> Tree:
    """~*files* files, ~*size_mb* MiB: a git repo with two revisions, source-like files, big blobs."""
    rng = random.Random(seed)
    corpus = make_corpus(rng, 4 << 20)
    tree = Tree(root)
    root.mkdir(parents=True)
    budget = size_mb << 20

    # 1. A git repository (part of the tree from the start), two branches: main and other.
    repo_files = min(3000, files * 3 // 5)
    n_mod, n_del, n_add = repo_files // 3, repo_files // 6, repo_files // 6
    repo = root / "repo"
    repo_paths = []
    fan = max(1, math.ceil(math.sqrt(repo_files / 15)))
    for i in range(repo_files):
        d = i % (fan * fan)
        rel = f"src/pkg{d // fan:02d}/mod{d % fan:02d}/f{i:05d}{EXTS[i % len(EXTS)]}"
        write(repo / rel, source_like(rng, corpus, rng.randint(1024, 20 * 1024), rel))
        repo_paths.append(rel)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "gc.auto", "0")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "revision A")
    git(repo, "checkout", "-q", "-b", "other")
    picked = rng.sample(repo_paths, n_mod + n_del)
    burst = Burst(modified=n_mod, added=n_add)
    for rel in picked[:n_mod]:
        data = source_like(rng, corpus, rng.randint(1024, 20 * 1024), rel + " v2")
        write(repo / rel, data)
        burst.changed[f"repo/{rel}"] = (len(data), hashlib.sha1(data).hexdigest())
    for rel in picked[n_mod:]:
        (repo / rel).unlink()
        burst.deleted.append(f"repo/{rel}")
    for i in range(n_add):
        rel = f"src/added{i % 10}/n{i:05d}{EXTS[i % len(EXTS)]}"
        data = source_like(rng, corpus, rng.randint(1024, 20 * 1024), rel)
        write(repo / rel, data)
        burst.changed[f"repo/{rel}"] = (len(data), hashlib.sha1(data).hexdigest())
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "revision B")
    git(repo, "checkout", "-q", "main")
    git(repo, "gc", "-q")
    tree.burst = burst
    tree.repo_files = repo_files

    # 2. Source-like small files in nested directories.
    n_large = 5 if files >= 20000 else 4
    current = sizes(root)
    n_small = max(0, files - len(current) - n_large)
    leaf_dirs = max(1, math.ceil(n_small / 16))
    fan = max(1, math.ceil(leaf_dirs ** (1 / 3)))
    for i in range(n_small):
        d = i // 16
        rel = (f"proj{d // (fan * fan):02d}/lib{(d // fan) % fan:02d}/pkg{d % fan:02d}/"
               f"file{i:06d}{EXTS[i % len(EXTS)]}")
        write(root / rel, source_like(rng, corpus, rng.randint(1024, 20 * 1024), rel))
        tree.editable.append(rel)

    # 3. A few large binary files take the rest of the byte budget.
    used = sum(sizes(root).values())
    rest = max(budget - used, n_large << 20)
    weights = [0.4, 0.25, 0.15, 0.1, 0.1][:n_large]
    for i, w in enumerate(weights):
        size = int(rest * w / sum(weights))
        rel = f"assets/blob{i}.bin"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            left = size
            while left > 0:
                chunk = min(left, 8 << 20)
                f.write(rng.randbytes(chunk))
                left -= chunk
        tree.large_files.append(rel)

    final = sizes(root)
    tree.files = len(final)
    tree.total_bytes = sum(final.values())
    return tree


# ------------------------------------------------------------------------------------------
# the tools
# ------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    work: Path
    server: Any  # tests.sshd.SshServer
    src: Path
    logs: Path
    unison_dir: Path
    syncd_cmd: list[str]
    unison_ok: bool = False
    unison_reason: str = ""

    def remote(self) -> str:
        return f"{self.server.user}@{self.server.host}"

    # rsync ------------------------------------------------------------------------------

    def rsync(self, dst: Path, *, timeout: float = T_RUN) -> float:
        argv = ["rsync", "-a", "--delete", "-e", self.server.ssh_command(), f"{self.src}/",
                f"{self.remote()}:{dst}/"]
        return run_timed(argv, timeout=timeout, logfile=self.logs / "rsync.log", what="rsync")

    # tar | ssh tar -x ------------------------------------------------------------------------

    def tar(self, dst: Path, *, timeout: float = T_INITIAL) -> float:
        ssh = shlex.join([*self.server.ssh_argv(), f"tar -C {shlex.quote(str(dst))} -xf -"])
        script = f"set -o pipefail; tar -C {shlex.quote(str(self.src))} -cf - . | {ssh}"
        return run_timed(["bash", "-c", script], timeout=timeout, logfile=self.logs / "tar.log",
                         what="tar | ssh tar -x")

    # unison -----------------------------------------------------------------------------------

    def unison_argv(self, local: Path, dst: Path) -> list[str]:
        ssh = self.server.ssh_argv(destination=False)[1:]  # drop the leading "ssh"
        return ["unison", str(local), f"ssh://{self.remote()}/{dst}", "-batch", "-auto", "-ui", "text",
                "-perms", "0", "-times", "-contactquietly", "-sshargs", " ".join(ssh)]

    def unison(self, dst: Path, *, local: Path | None = None, timeout: float = T_RUN) -> float:
        env = dict(os.environ, UNISON=str(self.unison_dir / "local"))
        return run_timed(self.unison_argv(local or self.src, dst), timeout=timeout, env=env,
                         logfile=self.logs / "unison.log", what="unison")

    def check_unison(self) -> None:
        if shutil.which("unison") is None:
            self.unison_reason = "unison not installed"
            return
        try:
            version = subprocess.run(["unison", "-version"], capture_output=True, timeout=30, check=False)
            probe_src = self.work / "unison-probe-src"
            probe_dst = self.work / "unison-probe-dst"
            write(probe_src / "a" / "b.txt", b"probe\n")
            probe_dst.mkdir()
            self.unison(probe_dst, local=probe_src, timeout=120)
            if (probe_dst / "a" / "b.txt").read_bytes() != b"probe\n":
                raise BenchError("probe file did not arrive")
            self.unison_ok = True
            self.unison_reason = version.stdout.decode(errors="replace").strip()
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            self.unison_reason = f"unison unavailable: {exc}"


def drop_landed(dst: Path, wanted: dict[str, int]) -> None:
    """Remove from ``wanted`` (path -> size) the files ``dst`` now holds at their size."""
    for rel, size in list(wanted.items()):
        with contextlib.suppress(OSError):
            if os.stat(dst / rel).st_size == size:
                del wanted[rel]


class Syncd:
    """One ``syncd run`` process; always stopped (SIGTERM, then SIGKILL) by the caller."""

    def __init__(self, ctx: Ctx, dst: Path, state: Path, name: str, local: Path | None = None) -> None:
        self.ctx = ctx
        self.local = local or ctx.src
        self.dst = dst
        self.state = state
        self.logfile = ctx.logs / f"syncd-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_status: int | None = None

    def argv(self) -> list[str]:
        s = self.ctx.server
        return [*self.ctx.syncd_cmd, "run", str(self.local), s.url(self.dst), "--identity",
                str(s.client_key), "--known-hosts", str(s.known_hosts), "--state-dir", str(self.state), "-q"]

    def start(self) -> None:
        env = repo_env()
        with open(self.logfile, "ab") as out:
            out.write(f"\n$ {shlex.join(self.argv())}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         env=env, start_new_session=True)

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"syncd exited with status {self.proc.returncode} (log {self.logfile}):\n"
                             f"{tail(self.logfile)}")

    def stop(self) -> int | None:
        proc = self.proc
        if proc is None:
            return self.exit_status
        self.proc = None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=T_STOP)
            except subprocess.TimeoutExpired:
                log(f"syncd did not stop within {T_STOP:.0f} s of SIGTERM; killing it")
                kill_group(proc)
        self.exit_status = proc.returncode
        return self.exit_status

    @contextlib.contextmanager
    def running(self) -> Iterator[Syncd]:
        self.start()
        try:
            yield self
        finally:
            status = self.stop()
            if status not in (0, None):
                log(f"syncd exit status {status} (log {self.logfile})")


def wait_for(pred: Callable[[], bool], timeout: float, what: str, syncd: Syncd | None = None,
             sleep: float = 0.001, adaptive: bool = False) -> float:
    """Poll *pred* every *sleep* s; return perf_counter() of the first success.

    With *adaptive*, an expensive predicate is polled at most a third of the time.
    """
    deadline = time.perf_counter() + timeout
    n = 0
    while True:
        start = time.perf_counter()
        if pred():
            return time.perf_counter()
        now = time.perf_counter()
        if now > deadline:
            raise BenchError(f"{what}: not done within {timeout:.0f} s")
        n += 1
        if syncd is not None and n % 50 == 0:
            syncd.check()
        time.sleep(max(sleep, 2 * (now - start)) if adaptive else sleep)


def has_content(path: Path, data: bytes) -> Callable[[], bool]:
    def pred() -> bool:
        try:
            with open(path, "rb") as f:
                return f.read(len(data) + 1) == data
        except OSError:
            return False

    return pred


def absent(path: Path) -> Callable[[], bool]:
    return lambda: not os.path.lexists(path)


def edit_payload(rng: random.Random, i: int) -> bytes:
    body = " ".join(rng.choices(WORDS, k=rng.randint(150, 600)))
    return f"# edit {i} {time.time_ns()}\n{body}\n".encode()


# ------------------------------------------------------------------------------------------
# the measurements
# ------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, ctx: Ctx, tree: Tree, args: argparse.Namespace, results: dict[str, Any]) -> None:
        self.ctx = ctx
        self.tree = tree
        self.args = args
        self.r = results
        self.rng = random.Random(args.seed + 1)
        w = ctx.work
        self.dst = {"syncd": w / "dst-syncd", "rsync": w / "dst-rsync", "tar": w / "dst-tar",
                    "unison": w / "dst-unison"}
        self.state = w / "syncd-state"
        self.src_manifest: dict[str, tuple[int, str]] = {}
        self.expected_sizes: dict[str, int] = {}
        self.edit_cursor = 0

    def error(self, step: str, exc: BaseException) -> None:
        msg = f"{step}: {exc}"
        log(f"FAILED {msg}")
        self.r["errors"].append(msg)

    def next_editable(self) -> str:
        rel = self.tree.editable[self.edit_cursor % len(self.tree.editable)]
        self.edit_cursor += 1
        return rel

    def verify(self, tool: str, key: str) -> None:
        result = compare(self.src_manifest, manifest(self.dst[tool]))
        self.r.setdefault("verify", {})[f"{key}:{tool}"] = result
        if not result["ok"]:
            log(f"  {tool}: tree differs from the source after {key}: {result}")

    # 1. initial sync -------------------------------------------------------------------------

    def initial(self) -> None:
        log("== 1. initial sync to an empty remote")
        self.src_manifest = manifest(self.ctx.src)
        self.expected_sizes = sizes(self.ctx.src)
        out = self.r.setdefault("initial_s", {})
        samples: dict[str, list[float]] = self.r.setdefault("initial_samples_s", {})
        tools = ("rsync", "syncd") if self.args.noop_only else ("rsync", "tar", "unison", "syncd")
        rounds = max(1, self.args.initial_rounds)
        failed: set[str] = set()
        # Rounds alternate the tools, so that a machine whose speed drifts (a shared host)
        # skews all of them alike; each tool's figure is its median.
        for round_no in range(rounds):
            for tool in tools:
                dst = self.dst[tool]
                if tool == "unison" and not self.ctx.unison_ok:
                    dst.mkdir(exist_ok=True)
                    continue
                if tool in failed or (round_no and tool == "unison"):
                    continue  # Unison runs once: its archives would take an emptied replica for deletions
                if round_no:  # start again from an empty destination (and, for syncd, no state)
                    shutil.rmtree(dst)
                    if tool == "syncd":
                        shutil.rmtree(self.state, ignore_errors=True)
                dst.mkdir()
                os.sync()  # every tool starts with no dirty pages from the previous one
                try:
                    if tool == "rsync":
                        took = self.ctx.rsync(dst, timeout=T_INITIAL)
                    elif tool == "tar":
                        took = self.ctx.tar(dst)
                    elif tool == "unison":
                        took = self.ctx.unison(dst, timeout=T_INITIAL)
                    else:
                        took = self.syncd_initial(dst)
                    samples.setdefault(tool, []).append(took)
                    log(f"  {tool}: {took:.2f} s" + (f" (round {round_no + 1} of {rounds})" if rounds > 1 else ""))
                    if round_no == rounds - 1 or tool == "unison":
                        self.verify(tool, "initial")
                except BenchError as exc:
                    failed.add(tool)
                    self.error(f"initial {tool}", exc)
        for tool, values in samples.items():
            if tool not in failed:
                out[tool] = statistics.median(values)
        if rounds > 1:
            log("  medians: " + ", ".join(f"{tool} {value:.2f} s" for tool, value in out.items()))

    def syncd_initial(self, dst: Path) -> float:
        """From process start until the remote holds every file with its size (then SIGTERM).

        Each poll stats only the files still missing or short, so polls get cheaper (and the
        resolution finer) as the tree fills; a full walk then confirms nothing extra is there.
        Until a sample of 17 files spread over the tree has landed, a poll stats only those:
        the poller must not take the CPU the sync needs (rsync's run has no poller beside it).
        """
        expected = self.expected_sizes
        pending = dict(expected)
        ordered = sorted(expected)
        sample = {rel: expected[rel] for rel in ordered[:: max(1, len(ordered) // 16)] + ordered[-1:]}
        proc = Syncd(self.ctx, dst, self.state, "initial")
        polls = 0
        interval = 0.0
        t0 = time.perf_counter()
        deadline = t0 + T_INITIAL
        with proc.running():
            while True:
                proc.check()
                w0 = time.perf_counter()
                drop_landed(dst, sample)
                if sample:
                    if time.perf_counter() > deadline:
                        raise BenchError(f"syncd initial: nothing complete after {T_INITIAL:.0f} s")
                    polls += 1
                    time.sleep(0.01)
                    continue
                drop_landed(dst, pending)
                w1 = time.perf_counter()
                polls += 1
                if not pending:
                    done = w1
                    got = sizes(dst)
                    if got == expected:
                        break
                    extra = sorted(set(got) - set(expected))[:3]
                    raise BenchError(f"syncd initial: every file arrived but the remote differs, e.g. {extra}")
                if w1 > deadline:
                    raise BenchError(f"syncd initial: {len(expected) - len(pending)}/{len(expected)} files "
                                     f"complete after {T_INITIAL:.0f} s")
                # Keep polling under ~25% of one CPU.
                interval = max(0.005, 3 * (w1 - w0))
                time.sleep(interval)
            # Not timed: the stream carries files unhashed and the session records their
            # digests after it. A restart that found them missing would hash them again.
            self.r["syncd_initial_digests_s"] = wait_for_digests(self.state, proc) - done
        self.r["syncd_initial_poll"] = {"polls": polls, "resolution_s": round(interval + (w1 - w0), 4),
                                        "exit_status": proc.exit_status}
        return done - t0

    # 2. no-op restart ------------------------------------------------------------------------

    def noop(self) -> None:
        log("== 2. no-op restart (trees identical)")
        out = self.r.setdefault("noop_s", {})
        samples: dict[str, list[float]] = {}
        for tool in ("rsync", "unison"):
            if tool == "unison" and not self.ctx.unison_ok:
                continue
            if "initial_s" not in self.r or tool not in self.r["initial_s"]:
                continue
            try:
                samples[tool] = [
                    self.ctx.rsync(self.dst[tool]) if tool == "rsync" else self.ctx.unison(self.dst[tool])
                    for _ in range(self.args.repeats)
                ]
                out[tool] = statistics.median(samples[tool])
                log(f"  {tool} no-op: median {out[tool]:.3f} s of {samples[tool]}")
            except BenchError as exc:
                self.error(f"no-op {tool}", exc)
        if "syncd" in self.r.get("initial_s", {}):
            try:
                samples["syncd"] = [self.syncd_restart(i) for i in range(self.args.repeats)]
                out["syncd"] = statistics.median(samples["syncd"])
                log(f"  syncd restart -> marker on remote: median {out['syncd']:.3f} s of {samples['syncd']}")
            except BenchError as exc:
                self.error("no-op syncd", exc)
        else:
            log("  syncd no-op skipped: its initial sync did not complete")
        self.r["noop_samples_s"] = samples

    def syncd_restart(self, i: int) -> float:
        """Start syncd, write a new file at once; time until the remote has it."""
        name = f"bench-marker-{i}.txt"
        data = f"marker {i} {time.time_ns()}\n".encode()
        local, remote = self.ctx.src / name, self.dst["syncd"] / name
        proc = Syncd(self.ctx, self.dst["syncd"], self.state, f"restart{i}")
        t0 = time.perf_counter()
        try:
            with proc.running():
                write(local, data)
                done = wait_for(has_content(remote, data), T_READY, "syncd restart marker", proc, sleep=0.002)
                local.unlink()
                wait_for(absent(remote), T_EDIT, "syncd marker deletion", proc)
        finally:
            local.unlink(missing_ok=True)
        return done - t0

    # 3. live propagation + 4. burst, with one syncd process -----------------------------------

    def live(self) -> None:
        log("== 3. live propagation latency and 4. burst, syncd running")
        proc = Syncd(self.ctx, self.dst["syncd"], self.state, "live")
        name = "bench-ready.txt"
        data = f"ready {time.time_ns()}\n".encode()
        t0 = time.perf_counter()
        with proc.running():
            try:
                write(self.ctx.src / name, data)
                ready = wait_for(has_content(self.dst["syncd"] / name, data), T_READY, "syncd ready", proc,
                                 sleep=0.002)
                self.r["syncd_ready_s"] = ready - t0
                (self.ctx.src / name).unlink()
                wait_for(absent(self.dst["syncd"] / name), T_EDIT, "syncd ready marker deletion", proc)
                time.sleep(0.5)
            except BenchError as exc:
                self.error("syncd live start", exc)
                return
            for direction in ("l2r", "r2l"):
                try:
                    self.latency(proc, direction)
                except BenchError as exc:
                    self.error(f"latency {direction}", exc)
            try:
                self.syncd_burst(proc)
            except BenchError as exc:
                self.error("burst syncd", exc)
        try:
            self.src_manifest = manifest(self.ctx.src)
            self.verify("syncd", "live+burst")
        except OSError as exc:
            self.error("verify syncd after burst", exc)

    def latency(self, proc: Syncd, direction: str) -> None:
        k = self.args.edits
        gap = self.args.gap_ms / 1000.0
        if direction == "l2r":
            writer, reader = self.ctx.src, self.dst["syncd"]
        else:
            writer, reader = self.dst["syncd"], self.ctx.src
        samples: list[float] = []
        failures = 0
        for i in range(k):
            rel = self.next_editable()
            data = edit_payload(self.rng, i)
            t0 = time.perf_counter()
            with open(writer / rel, "wb") as f:
                f.write(data)
            try:
                done = wait_for(has_content(reader / rel, data), T_EDIT, f"edit {direction} {rel}", proc)
                samples.append((done - t0) * 1000.0)
            except BenchError:
                proc.check()
                failures += 1
                if failures >= 5 and not samples:
                    raise
            time.sleep(gap)
        stats: dict[str, Any] = {"edits": k, "failures": failures, "gap_ms": self.args.gap_ms}
        if samples:
            stats.update(p50_ms=percentile(samples, 50), p99_ms=percentile(samples, 99),
                         min_ms=min(samples), max_ms=max(samples), mean_ms=statistics.fmean(samples))
        self.r.setdefault("latency", {})[direction] = stats
        self.r.setdefault("latency_samples_ms", {})[direction] = [round(s, 3) for s in samples]
        if samples:
            log(f"  {direction}: p50 {stats['p50_ms']:.1f} ms, p99 {stats['p99_ms']:.1f} ms, "
                f"max {stats['max_ms']:.1f} ms, {failures} timed out")
        else:
            log(f"  {direction}: no edit propagated ({failures} timed out)")

    def burst_pending(self, dst: Path) -> tuple[set[str], Callable[[], bool]]:
        """A predicate true once *dst* holds revision B for every path the checkout touched."""
        b = self.tree.burst
        pending = set(b.changed) | set(b.deleted)
        git_files = {}
        for rel in (".git/HEAD", ".git/index"):
            p = self.ctx.src / "repo" / rel
            data = p.read_bytes()
            git_files[f"repo/{rel}"] = (len(data), hashlib.sha1(data).hexdigest())
        pending |= set(git_files)
        want = {**b.changed, **git_files}

        def pred() -> bool:
            for rel in list(pending):
                path = dst / rel
                if rel in want:
                    size, digest = want[rel]
                    try:
                        if os.stat(path).st_size != size or file_digest(path) != digest:
                            continue
                    except OSError:
                        continue
                elif os.path.lexists(path):
                    continue
                pending.discard(rel)
            return not pending

        return pending, pred

    def syncd_burst(self, proc: Syncd) -> None:
        repo = self.ctx.src / "repo"
        t0 = time.perf_counter()
        git(repo, "checkout", "-q", "other")
        t1 = time.perf_counter()
        pending, pred = self.burst_pending(self.dst["syncd"])
        try:
            done = wait_for(pred, T_BURST, "syncd burst", proc, sleep=0.002, adaptive=True)
        except BenchError as exc:
            raise BenchError(f"{exc}; {len(pending)} paths still differ, e.g. {sorted(pending)[:3]}") from None
        out = self.r.setdefault("burst", {})
        out["checkout_s"] = t1 - t0
        out["syncd_total_s"] = done - t0
        out["syncd_after_checkout_s"] = done - t1
        b = self.tree.burst
        out["change"] = {"modified": b.modified, "added": b.added, "deleted": len(b.deleted)}
        log(f"  burst: checkout {t1 - t0:.2f} s; remote matches {done - t0:.2f} s after the checkout "
            f"started ({done - t1:.2f} s after it ended)")

    # 5. the batch tools' per-change runs and burst ------------------------------------------

    def settle(self, tools: tuple[str, ...]) -> None:
        for tool in tools:
            if tool == "rsync":
                self.ctx.rsync(self.dst["rsync"])
            else:
                self.ctx.unison(self.dst["unison"])

    def batch_tools(self) -> tuple[str, ...]:
        tools = ["rsync"] if "rsync" in self.r.get("initial_s", {}) else []
        if self.ctx.unison_ok and "unison" in self.r.get("initial_s", {}):
            tools.append("unison")
        return tuple(tools)

    def batch_runs(self) -> None:
        log("== 3b. one batch run per single-file edit, and 4b. the same checkout for rsync / unison")
        tools = self.batch_tools()
        repo = self.ctx.src / "repo"
        try:
            git(repo, "checkout", "-q", "main")
            self.settle(tools)
        except BenchError as exc:
            self.error("reset batch tools", exc)
            return
        out = self.r.setdefault("edit_run_s", {})
        samples: dict[str, list[float]] = {}
        for tool in tools:
            try:
                runs = []
                for i in range(self.args.edit_runs):
                    rel = self.next_editable()
                    write(self.ctx.src / rel, edit_payload(self.rng, 10_000 + i))
                    runs.append(self.ctx.rsync(self.dst[tool]) if tool == "rsync"
                                else self.ctx.unison(self.dst[tool]))
                samples[tool] = runs
                out[tool] = statistics.median(runs)
                log(f"  {tool} after one edit: median {out[tool]:.3f} s of {[round(x, 3) for x in runs]}")
                self.settle(tools)
            except BenchError as exc:
                self.error(f"edit run {tool}", exc)
        self.r["edit_run_samples_s"] = samples
        try:
            self.settle(tools)
            t0 = time.perf_counter()
            git(repo, "checkout", "-q", "other")
            checkout = time.perf_counter() - t0
        except BenchError as exc:
            self.error("burst reset", exc)
            return
        burst = self.r.setdefault("burst", {})
        burst["checkout_batch_s"] = checkout
        self.src_manifest = manifest(self.ctx.src)
        for tool in tools:
            try:
                run = self.ctx.rsync(self.dst[tool]) if tool == "rsync" else self.ctx.unison(self.dst[tool])
                burst[f"{tool}_run_s"] = run
                burst[f"{tool}_total_s"] = checkout + run
                log(f"  burst {tool}: run {run:.2f} s (checkout {checkout:.2f} s)")
                self.verify(tool, "burst")
            except BenchError as exc:
                self.error(f"burst {tool}", exc)


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} s" if value >= 1.0 else f"{value * 1000:.1f} ms"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def table(r: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    init = r.get("initial_s", {})
    noop = r.get("noop_s", {})
    edit = r.get("edit_run_s", {})
    lat = r.get("latency", {})
    burst = r.get("burst", {})

    def lat_s(direction: str, key: str) -> float | None:
        v = lat.get(direction, {}).get(key)
        return None if v is None else v / 1000.0

    rows: list[tuple[str, float | None, float | None, float | None, float | None]] = [
        ("initial sync to empty remote", init.get("syncd"), init.get("rsync"), init.get("tar"),
         init.get("unison")),
        ("no-op restart (syncd: start->marker on remote)", noop.get("syncd"), noop.get("rsync"), None,
         noop.get("unison")),
        ("edit local->remote p50 (batch: 1 run/edit)", lat_s("l2r", "p50_ms"), edit.get("rsync"), None,
         edit.get("unison")),
        ("edit local->remote p99 (batch: 1 run/edit)", lat_s("l2r", "p99_ms"), edit.get("rsync"), None,
         edit.get("unison")),
        ("edit remote->local p50 (batch: 1 run/edit)", lat_s("r2l", "p50_ms"), edit.get("rsync"), None,
         edit.get("unison")),
        ("edit remote->local p99 (batch: 1 run/edit)", lat_s("r2l", "p99_ms"), edit.get("rsync"), None,
         edit.get("unison")),
        ("burst: checkout start -> remote matches", burst.get("syncd_total_s"), burst.get("rsync_total_s"),
         None, burst.get("unison_total_s")),
        ("burst: checkout end -> remote matches", burst.get("syncd_after_checkout_s"),
         burst.get("rsync_run_s"), None, burst.get("unison_run_s")),
    ]
    head = ("metric", "syncd", "rsync", "tar+ssh", "unison", "syncd/rsync", "syncd/tar", "syncd/unison")
    lines = []
    data = []
    for name, s, rs, t, u in rows:
        lines.append((name, fmt(s), fmt(rs), fmt(t), fmt(u), ratio(s, rs), ratio(s, t), ratio(s, u)))
        data.append({"metric": name, "syncd_s": s, "rsync_s": rs, "tar_s": t, "unison_s": u})
    widths = [max(len(str(row[i])) for row in [head, *lines]) for i in range(len(head))]
    out = [" | ".join(str(c).ljust(w) for c, w in zip(head, widths, strict=True))]
    out.append("-+-".join("-" * w for w in widths))
    out += [" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in lines]
    return "\n".join(out), data


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    init = r.get("initial_s", {})
    noop = r.get("noop_s", {})
    lat = r.get("latency", {})
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, limit: float, unit: str) -> None:
        checks.append({"target": name, "value": value, "limit": limit, "unit": unit,
                       "pass": None if value is None else value <= limit})

    for d, label in (("l2r", "local->remote"), ("r2l", "remote->local")):
        check(f"latency p50 {label} <= {TARGET_P50_MS:.0f} ms", lat.get(d, {}).get("p50_ms"), TARGET_P50_MS, "ms")
        check(f"latency p99 {label} <= {TARGET_P99_MS:.0f} ms", lat.get(d, {}).get("p99_ms"), TARGET_P99_MS, "ms")
    s, rs = init.get("syncd"), init.get("rsync")
    check(f"initial sync <= {TARGET_INITIAL_RATIO:.1f}x rsync", None if s is None or rs is None else s / rs,
          TARGET_INITIAL_RATIO, "x")
    s, rs = noop.get("syncd"), noop.get("rsync")
    check(f"no-op restart <= {TARGET_NOOP_RATIO:.1f}x rsync no-op", None if s is None or rs is None else s / rs,
          TARGET_NOOP_RATIO, "x")
    return checks


def report(r: dict[str, Any]) -> str:
    text, rows = table(r)
    r["table"] = rows
    r["targets"] = targets(r)
    lines = ["", text, "", "targets:"]
    for c in r["targets"]:
        verdict = "n/a " if c["pass"] is None else ("PASS" if c["pass"] else "FAIL")
        value = "-" if c["value"] is None else (f"{c['value']:.1f} ms" if c["unit"] == "ms"
                                                 else f"{c['value']:.2f}x")
        lines.append(f"  [{verdict}] {c['target']}: {value}")
    if r.get("ssh_true_s") is not None:
        lines.append(f"ssh baseline: `ssh 127.0.0.1 true` takes {r['ssh_true_s'] * 1000:.0f} ms (median of 5); "
                     "every rsync / tar / unison run pays it once (syncd connects in-process, through asyncssh)")
    floor, rsync_noop = r.get("startup_floor_s"), r.get("noop_s", {}).get("rsync")
    if floor is not None:
        share = f" = {floor / rsync_noop:.2f}x rsync's no-op" if rsync_noop else ""
        lines.append(f"syncd start-up floor: the interpreter and the imports take {floor * 1000:.0f} ms "
                     f"(median of 5){share}; every syncd start pays it before its first packet")
    host = r.get("host", {})
    if "loadavg_start" in host and "loadavg_end" in host:
        lines.append(f"machine: {host.get('cpus')} CPUs; 1-min load average {host['loadavg_start'][0]:.2f} at start, "
                     f"{host['loadavg_end'][0]:.2f} at end (anything else running skews every column)")
    verify = r.get("verify", {})
    if verify:
        bad = [k for k, v in verify.items() if not v["ok"]]
        lines.append(f"verification: {len(verify) - len(bad)}/{len(verify)} destination trees identical to the source"
                     + (f"; DIFFERENT: {', '.join(bad)}" if bad else ""))
    if r.get("errors"):
        lines.append("errors:")
        lines += [f"  - {e.splitlines()[0]}" for e in r["errors"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=None, help="files in the tree (default 50000; quick 5000)")
    p.add_argument("--size-mb", type=int, default=None, help="total MiB (default 1024; quick 100)")
    p.add_argument("--edits", type=int, default=200, help="single-file edits per direction (default 200)")
    p.add_argument("--quick", action="store_true", help="5,000 files / 100 MiB")
    p.add_argument("--repeats", type=int, default=3, help="no-op runs per tool (median)")
    p.add_argument("--initial-rounds", type=int, default=1,
                   help="initial syncs per tool, the tools taking turns (median; default 1)")
    p.add_argument("--edit-runs", type=int, default=5, help="rsync/unison runs after one edit (median)")
    p.add_argument("--gap-ms", type=float, default=50.0, help="pause between two timed edits")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temp dir (default /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the trees and logs")
    p.add_argument("--json", type=Path, default=RESULTS_JSON, help="where to write the results")
    p.add_argument("--no-unison", action="store_true", help="leave Unison out")
    p.add_argument("--noop-only", action="store_true",
                   help="only the no-op restart (after the initial sync of rsync and syncd it needs)")
    args = p.parse_args(argv)
    if args.files is None:
        args.files = 5000 if args.quick else 50000
    if args.size_mb is None:
        args.size_mb = 100 if args.quick else 1024
    if args.files < 100 or args.size_mb < 10 or args.edits < 1:
        p.error("need --files >= 100, --size-mb >= 10, --edits >= 1")
    return args


def tool_versions() -> dict[str, str]:
    out = {}
    for name, argv in (("rsync", ["rsync", "--version"]), ("ssh", ["ssh", "-V"]),
                       ("unison", ["unison", "-version"]), ("git", ["git", "--version"])):
        try:
            res = subprocess.run(argv, capture_output=True, timeout=30, check=False)
            text = (res.stdout or res.stderr).decode(errors="replace").strip().splitlines()
            out[name] = text[0] if text else ""
        except (OSError, subprocess.SubprocessError) as exc:
            out[name] = f"unavailable: {exc}"
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    sshd = importlib.import_module("tests.sshd")
    reason = sshd.sshd_missing_reason()
    if reason is not None:
        print(f"bench: {reason}", file=sys.stderr)
        return 1
    for tool in ("rsync", "tar", "git"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed", file=sys.stderr)
            return 1

    compile_checkout()
    parent = args.workdir or Path("/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="syncd-bench-", dir=parent)).resolve()
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "host": {"python": platform.python_version(), "platform": platform.platform(),
                 "cpus": os.cpu_count(), "tools": tool_versions(), "loadavg_start": os.getloadavg()},
        "errors": [],
    }
    code = 1
    try:
        log(f"work dir {work}")
        unison_dir = work / "unison"
        (unison_dir / "local").mkdir(parents=True)
        (unison_dir / "remote").mkdir(parents=True)
        logs = work / "logs"
        logs.mkdir()

        log(f"generating ~{args.files} files / {args.size_mb} MiB")
        t0 = time.perf_counter()
        tree = generate_tree(work / "src", args.files, args.size_mb, args.seed)
        results["tree"] = {"files": tree.files, "bytes": tree.total_bytes, "large_files": len(tree.large_files),
                           "repo_files": tree.repo_files, "generate_s": time.perf_counter() - t0,
                           "burst": {"modified": tree.burst.modified, "added": tree.burst.added,
                                     "deleted": len(tree.burst.deleted)}}
        log(f"tree: {tree.files} files, {tree.total_bytes / 2**20:.1f} MiB "
            f"({time.perf_counter() - t0:.1f} s)")

        extra = [f"SetEnv UNISON={unison_dir / 'remote'}"]
        with start_server(sshd, work, extra) as server:
            ctx = Ctx(work=work, server=server, src=tree.root, logs=logs, unison_dir=unison_dir,
                      syncd_cmd=[sys.executable, "-m", "syncd.cli"])
            if args.no_unison or args.noop_only:
                ctx.unison_reason = "left out (--no-unison)" if args.no_unison else "left out (--noop-only)"
            else:
                ctx.check_unison()
            results["host"]["unison"] = ctx.unison_reason
            log(f"sshd on {server.host}:{server.port}; unison: {ctx.unison_reason or 'ok'}")
            results["ssh_true_s"] = ssh_baseline(server, logs)
            log(f"ssh baseline (connect + remote login shell + `true`): median {results['ssh_true_s']:.3f} s")
            warm_up_syncd(ctx, results)
            results["startup_floor_s"] = startup_floor(ctx, logs)
            if results["startup_floor_s"] is not None:
                log(f"syncd start-up floor (interpreter + imports): median {results['startup_floor_s']:.3f} s")
            bench = Bench(ctx, tree, args, results)
            steps = (bench.initial, bench.noop) if args.noop_only else (bench.initial, bench.noop, bench.live,
                                                                        bench.batch_runs)
            for step in steps:
                results["host"].setdefault("loadavg_before_step", {})[step.__name__] = os.getloadavg()
                try:
                    step()
                except Exception as exc:  # one broken step must not hide the others' figures
                    bench.error(step.__name__, exc)
                    results.setdefault("tracebacks", []).append(traceback.format_exc())
        results["host"]["loadavg_end"] = os.getloadavg()
        print(report(results), flush=True)
        code = 0
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        results["workdir"] = str(work)
        try:
            args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
            log(f"results written to {args.json}")
        except OSError as exc:
            log(f"could not write {args.json}: {exc}")
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return code


@contextlib.contextmanager
def start_server(sshd: Any, work: Path, extra: list[str]) -> Iterator[Any]:
    with sshd.start_sshd(work, extra_config=extra) as server:
        yield server


def ssh_baseline(server: Any, logs: Path) -> float | None:
    """Median wall time of ``ssh HOST true``: the fixed cost every rsync, tar and unison run pays."""
    try:
        runs = [run_timed([*server.ssh_argv(), "true"], timeout=60, logfile=logs / "ssh.log", what="ssh true")
                for _ in range(5)]
    except BenchError as exc:
        log(f"ssh baseline failed: {exc}")
        return None
    return statistics.median(runs)


def compile_checkout() -> None:
    """Byte-compile the syncd this script runs, as installing it does (pip compiles what it
    installs). A checkout may have no compiled modules, and with PYTHONDONTWRITEBYTECODE
    set (as on this machine image) Python never writes them: every syncd process and
    every child it starts would compile each module again (about 0.15 s a start here), a
    cost no installed syncd pays."""
    if not compileall.compile_dir(str(REPO / "syncd"), quiet=1):
        log("could not byte-compile syncd: its starts include compiling it")


def unhashed_files(state: Path) -> int | None:
    """Files the session's base index holds without a digest; None until it holds any
    (read from its SQLite file, as syncd runs: the base is written in one transaction)."""
    for index in (state / "sessions").glob("*.sqlite"):
        con = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=5)
        try:
            query = "SELECT count(*), count(*) - count(digest) FROM base WHERE kind = 0"  # 0: a file
            rows, unhashed = con.execute(query).fetchone()
        except sqlite3.Error:
            return None
        finally:
            con.close()
        return int(unhashed) if rows else None
    return None


def wait_for_digests(state: Path, proc: Syncd) -> float:
    """Wait until the base records every file with its digest; return the time then."""
    deadline = time.perf_counter() + T_INITIAL
    while unhashed_files(state) != 0:
        proc.check()
        if time.perf_counter() > deadline:
            raise BenchError(f"syncd initial: the digests were not all recorded after {T_INITIAL:.0f} s")
        time.sleep(0.1)
    return time.perf_counter()


def startup_floor(ctx: Ctx, logs: Path) -> float | None:
    """Median wall time of starting the interpreter and importing what ``syncd run`` needs
    before its first packet (the CLI, the session and asyncssh): paid by every syncd start,
    so a restart can never take less."""
    probe = [ctx.syncd_cmd[0], "-c", "import syncd.cli, syncd.session.session, asyncssh"]
    try:
        runs = [run_timed(probe, timeout=60, logfile=logs / "startup.log", what="syncd imports", env=repo_env())
                for _ in range(5)]
    except BenchError as exc:
        log(f"start-up floor failed: {exc}")
        return None
    return statistics.median(runs)


def warm_up_syncd(ctx: Ctx, results: dict[str, Any]) -> None:
    """One tiny session first, so the agent upload and cold imports are not in the timings."""
    src = ctx.work / "warm-src"
    dst = ctx.work / "warm-dst"
    write(src / "hello.txt", b"hello\n")
    dst.mkdir()
    proc = Syncd(ctx, dst, ctx.work / "warm-state", "warmup", local=src)
    try:
        t0 = time.perf_counter()
        with proc.running():
            done = wait_for(has_content(dst / "hello.txt", b"hello\n"), 120, "syncd warm-up", proc, sleep=0.005)
        results["syncd_warmup_s"] = done - t0
        log(f"syncd warm-up session: first file after {done - t0:.2f} s")
    except BenchError as exc:
        results["errors"].append(f"syncd warm-up: {exc}")
        log(f"syncd warm-up FAILED: {exc}")


if __name__ == "__main__":
    sys.exit(main())
