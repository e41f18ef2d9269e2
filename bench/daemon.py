#!/usr/bin/env python3
"""Measure the syncd daemon: memory per session, live latency with many sessions, idle CPU.

Everything runs locally with ``local:`` remotes (the agent is a local subprocess of the
daemon), so no ssh is needed. See ``bench/README.md``.

    python3 bench/daemon.py [--files N] [--sessions K] [--idle-seconds S] [--edits E] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
RESULTS_JSON = BENCH_DIR / "daemon-results.json"

# Timeouts (seconds).
T_READY = 30.0  # daemon socket answering
T_CLI = 60.0  # one add / rm / list call
T_FLUSH_SMALL = 120.0  # flush of a ~50-file session
T_FLUSH_LARGE = 3600.0  # flush of the big tree's initial sync
T_EDIT = 10.0  # one propagated edit
T_STOP = 30.0  # daemon answering SIGTERM

# Targets from the issue.
TARGET_P99_MS = 250.0
TARGET_IDLE_CPU_PCT = 1.0

SMALL_TREE_FILES = 50
CLK_TCK = os.sysconf("SC_CLK_TCK")


# Shared with the other benchmarks (bench/run.py, imported as a sibling module).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import BenchError, compile_checkout, log, percentile, tail  # noqa: E402


def write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def make_tree(root: Path, files: int, *, per_dir: int = 50, fanout: int = 20) -> None:
    """*files* small files (64-1,000 bytes) in nested directories: root/dNN/dNN/fNNNN.txt."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        d = i // per_dir
        sub = root / f"d{d // fanout:04d}" / f"d{d % fanout:02d}"
        if i % per_dir == 0:
            sub.mkdir(parents=True, exist_ok=True)
        size = 64 + (i * 37) % 937
        line = f"file {i} of {files}: ".encode()
        (sub / f"f{i:06d}.txt").write_bytes((line * (size // len(line) + 1))[:size])


# ------------------------------------------------------------------------------------------
# /proc
# ------------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (index 0 is the state, field 3)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2:].split()


def children_of(pid: int) -> list[int]:
    """All descendants of *pid* (via the ppid field of every /proc/N/stat)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent[int(entry)] = int(_stat_fields(int(entry))[1])
    out: list[int] = []
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out.extend(kids)
        frontier.extend(kids)
    return sorted(out)


def rss_kib(pid: int) -> int:
    """VmRSS of *pid* in KiB (0 if it is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def comm(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip()
    return "?"


def cpu_ticks(pid: int) -> int:
    """utime + stime of *pid* in clock ticks (0 if it is gone)."""
    try:
        f = _stat_fields(pid)
    except OSError:
        return 0
    return int(f[11]) + int(f[12])  # fields 14 and 15 of proc(5)


def tree_ticks(pid: int) -> dict[int, int]:
    return {p: cpu_ticks(p) for p in [pid, *children_of(pid)]}


# ------------------------------------------------------------------------------------------
# the daemon
# ------------------------------------------------------------------------------------------


class Daemon:
    """One ``syncd daemon`` with its own state directory and socket, always stopped."""

    def __init__(self, work: Path, label: str) -> None:
        self.dir = work / label
        self.state = self.dir / "state"
        self.state.mkdir(parents=True)
        self.socket = self.dir / "syncd.sock"
        self.logfile = self.dir / "daemon.log"
        self.env = dict(os.environ, STATE_DIRECTORY=str(self.state), PYTHONPATH=str(REPO),
                        XDG_CONFIG_HOME=str(self.dir / "config"))
        self.env.pop("SYNCD_SOCKET", None)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with open(self.logfile, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "syncd.cli", "daemon", "--socket", str(self.socket)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=self.env, cwd=REPO,
                start_new_session=True)
        deadline = time.monotonic() + T_READY
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"daemon exited with {self.proc.returncode}:\n{tail(self.logfile)}")
            if self.socket.exists() and self.cli(["list"], check=False, timeout=10).returncode == 0:
                return
            time.sleep(0.05)
        raise BenchError(f"daemon not ready after {T_READY:.0f} s:\n{tail(self.logfile)}")

    def cli(self, args: list[str], *, check: bool = True,
            timeout: float = T_CLI) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "syncd.cli", *args, "--socket", str(self.socket)]
        try:
            res = subprocess.run(argv, env=self.env, cwd=REPO, capture_output=True, text=True,
                                 timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{' '.join(args[:2])}: timed out after {timeout:.0f} s") from None
        if check and res.returncode != 0:
            raise BenchError(f"syncd {' '.join(args)}: exit {res.returncode}: "
                             f"{(res.stderr or res.stdout).strip()[-800:]}\n{tail(self.logfile)}")
        return res

    def add(self, name: str, local: Path, remote: Path) -> None:
        self.cli(["add", name, str(local), f"local:{remote}"])

    def flush(self, name: str, timeout: float) -> float:
        start = time.perf_counter()
        self.cli(["flush", name, "--timeout", str(timeout)], timeout=timeout + 30)
        return time.perf_counter() - start

    def memory(self) -> dict[str, Any]:
        kids = children_of(self.pid)
        child_rss = {p: rss_kib(p) for p in kids}
        return {"daemon_rss_kib": rss_kib(self.pid), "agents_rss_kib": sum(child_rss.values()),
                "agents": len(kids),
                "agent_processes": [{"pid": p, "comm": comm(p), "rss_kib": r} for p, r in child_rss.items()]}

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=T_STOP)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything left in the group (agents)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


@contextlib.contextmanager
def running_daemon(work: Path, label: str) -> Iterator[Daemon]:
    d = Daemon(work, label)
    try:
        d.start()
        yield d
    finally:
        d.stop()


# ------------------------------------------------------------------------------------------
# the measurements
# ------------------------------------------------------------------------------------------


def add_small_sessions(d: Daemon, work: Path, first: int, count: int) -> list[tuple[str, Path, Path]]:
    out = []
    for i in range(first, first + count):
        name = f"s{i:02d}"
        local, remote = work / "small" / name / "local", work / "small" / name / "remote"
        make_tree(local, SMALL_TREE_FILES, per_dir=10, fanout=3)
        remote.mkdir(parents=True)
        d.add(name, local, remote)
        out.append((name, local, remote))
    for name, _, _ in out:
        d.flush(name, T_FLUSH_SMALL)
    return out


def brief(m: dict[str, Any]) -> str:
    return (f"daemon {m['daemon_rss_kib'] / 1024:.1f} MiB, {m['agents']} child processes "
            f"{m['agents_rss_kib'] / 1024:.1f} MiB")


def settle(seconds: float = 2.0) -> None:
    time.sleep(seconds)


def measure_memory_and_latency(work: Path, sessions: int, edits: int,
                               results: dict[str, Any]) -> None:
    mem: dict[str, Any] = {}
    results["memory"] = mem
    with running_daemon(work, "daemon-small") as d:
        settle()
        mem["0"] = d.memory()
        log(f"memory, 0 sessions: {brief(mem['0'])}")
        all_sessions = add_small_sessions(d, work, 0, 1)
        settle()
        mem["1"] = d.memory()
        log(f"memory, 1 session: {brief(mem['1'])}")
        all_sessions += add_small_sessions(d, work, 1, sessions - 1)
        settle()
        mem[str(sessions)] = d.memory()
        log(f"memory, {sessions} sessions: {brief(mem[str(sessions)])}")

        # Propagation latency, edits round-robin over the idle sessions.
        samples: list[float] = []
        timeouts = 0
        for k in range(edits):
            name, local, remote = all_sessions[k % len(all_sessions)]
            rel = Path(f"edit-{k % 7}.txt")
            data = f"edit {k} of {edits} in {name} at {time.time_ns()}\n".encode() * 4
            start = time.perf_counter()
            write_file(local / rel, data)
            target = remote / rel
            deadline = start + T_EDIT
            while True:
                with contextlib.suppress(OSError):
                    if target.read_bytes() == data:
                        samples.append((time.perf_counter() - start) * 1000.0)
                        break
                if time.perf_counter() > deadline:
                    timeouts += 1
                    break
                time.sleep(0.001)
            time.sleep(0.02)
        lat: dict[str, Any] = {"edits": edits, "sessions": len(all_sessions), "timeouts": timeouts,
                               "samples_ms": [round(s, 2) for s in samples]}
        if samples:
            lat.update(p50_ms=percentile(samples, 50), p99_ms=percentile(samples, 99),
                       mean_ms=statistics.fmean(samples), max_ms=max(samples))
        results["latency"] = lat
        log(f"latency: p50 {lat.get('p50_ms', float('nan')):.1f} ms, "
            f"p99 {lat.get('p99_ms', float('nan')):.1f} ms, {timeouts} timeouts")
        mem["after_edits"] = d.memory()


def measure_idle_cpu(work: Path, files: int, idle_seconds: float, results: dict[str, Any]) -> None:
    cpu: dict[str, Any] = {"files": files, "seconds": idle_seconds}
    results["idle_cpu"] = cpu
    local, remote = work / "big" / "local", work / "big" / "remote"
    log(f"generating {files} files")
    start = time.perf_counter()
    make_tree(local, files)
    remote.mkdir(parents=True)
    cpu["generate_s"] = time.perf_counter() - start
    with running_daemon(work, "daemon-big") as d:
        d.add("big", local, remote)
        log("initial sync of the big tree")
        cpu["initial_sync_s"] = d.flush("big", T_FLUSH_LARGE)
        log(f"initial sync: {cpu['initial_sync_s']:.1f} s")
        settle(5.0)
        cpu["memory"] = d.memory()
        before = tree_ticks(d.pid)
        t0 = time.monotonic()
        time.sleep(idle_seconds)
        after = tree_ticks(d.pid)
        elapsed = time.monotonic() - t0
        # Processes that appeared during the window count from zero; ones that ended are lost
        # (their ticks show up nowhere), which is noted in the JSON.
        daemon_ticks = after.get(d.pid, 0) - before.get(d.pid, 0)
        agent_ticks = sum(t - before.get(p, 0) for p, t in after.items() if p != d.pid)
        cpu.update(
            elapsed_s=elapsed,
            daemon_pct=100.0 * daemon_ticks / CLK_TCK / elapsed,
            agents_pct=100.0 * agent_ticks / CLK_TCK / elapsed,
            processes_gone=sorted(set(before) - set(after)),
            processes_new=sorted(set(after) - set(before)),
        )
        cpu["total_pct"] = cpu["daemon_pct"] + cpu["agents_pct"]
        log(f"idle CPU: {cpu['total_pct']:.2f}% of one core")


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def report(results: dict[str, Any], sessions: int) -> None:
    rows: list[tuple[str, str, str]] = []
    mem = results.get("memory", {})
    for key, label in (("0", "0 sessions"), ("1", "1 session"), (str(sessions), f"{sessions} sessions")):
        m = mem.get(key)
        if m:
            rows.append((f"RSS, {label}", f"daemon {mib(m['daemon_rss_kib'])}",
                         f"{m['agents']} child procs {mib(m['agents_rss_kib'])}"))
    lat = results.get("latency")
    if lat and "p50_ms" in lat:
        ok = lat["p99_ms"] <= TARGET_P99_MS and not lat["timeouts"]
        rows.append((f"latency p50, {lat['sessions']} sessions", f"{lat['p50_ms']:.1f} ms", ""))
        rows.append((f"latency p99, {lat['sessions']} sessions", f"{lat['p99_ms']:.1f} ms",
                     f"<= {TARGET_P99_MS:.0f} ms {'PASS' if ok else 'FAIL'}"
                     + (f" ({lat['timeouts']} timeouts)" if lat["timeouts"] else "")))
    cpu = results.get("idle_cpu")
    if cpu and "initial_sync_s" in cpu:
        rows.append((f"initial sync, {cpu['files']} files", f"{cpu['initial_sync_s']:.1f} s", ""))
    if cpu and "memory" in cpu:
        m = cpu["memory"]
        rows.append((f"RSS, 1 session of {cpu['files']} files", f"daemon {mib(m['daemon_rss_kib'])}",
                     f"{m['agents']} child procs {mib(m['agents_rss_kib'])}"))
    if cpu and "total_pct" in cpu:
        ok = cpu["total_pct"] < TARGET_IDLE_CPU_PCT
        rows.append((f"idle CPU over {cpu['elapsed_s']:.0f} s", f"{cpu['total_pct']:.2f}% of a core",
                     f"< {TARGET_IDLE_CPU_PCT:g}% {'PASS' if ok else 'FAIL'} "
                     f"(daemon {cpu['daemon_pct']:.2f}%, agents {cpu['agents_pct']:.2f}%)"))
    for err in results.get("errors", []):
        rows.append(("ERROR", err.splitlines()[0][:60], ""))
    w0 = max(len(r[0]) for r in rows) if rows else 10
    w1 = max(len(r[1]) for r in rows) if rows else 10
    print()
    print(f"{'measure':<{w0}}  {'value':<{w1}}  notes")
    print(f"{'-' * w0}  {'-' * w1}  -----")
    for a, b, c in rows:
        print(f"{a:<{w0}}  {b:<{w1}}  {c}")
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=50_000, help="files in the idle-CPU tree")
    ap.add_argument("--sessions", type=int, default=20, help="idle sessions for memory and latency")
    ap.add_argument("--idle-seconds", type=float, default=60.0, help="idle CPU window")
    ap.add_argument("--edits", type=int, default=200, help="single-file edits for latency")
    ap.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    args = ap.parse_args()
    if args.sessions < 2:
        ap.error("--sessions must be at least 2")

    compile_checkout()
    work = Path(tempfile.mkdtemp(prefix="syncd-bench-daemon-"))
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "args": vars(args), "targets": {"p99_ms": TARGET_P99_MS, "idle_cpu_pct": TARGET_IDLE_CPU_PCT},
        "errors": [],
    }
    log(f"work directory {work}")
    try:
        for step in (lambda: measure_memory_and_latency(work, args.sessions, args.edits, results),
                     lambda: measure_idle_cpu(work, args.files, args.idle_seconds, results)):
            try:
                step()
            except BenchError as e:
                log(f"FAILED: {e}")
                results["errors"].append(str(e))
            except Exception:
                traceback.print_exc()
                results["errors"].append(traceback.format_exc().strip().splitlines()[-1])
    finally:
        RESULTS_JSON.write_text(json.dumps(results, indent=2) + "\n")
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(results, args.sessions)
    log(f"wrote {RESULTS_JSON}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
