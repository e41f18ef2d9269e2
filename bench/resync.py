#!/usr/bin/env python3
"""Full resync: ``syncd resync --push`` / ``--pull`` against ``tar -c | ssh tar -x`` and
``rsync -a`` over OpenSSH on 127.0.0.1, on the same generated tree in the same run.

Push: each tool fills an empty remote directory from the local tree. Pull: each tool fills
an empty local directory from the remote tree. syncd runs as a real daemon with a session
added ``--paused`` (so no live sync happens first); the time is the wall time of the
``syncd resync`` command (CLI start, reconnect and ssh login included, as for the others).
The answer comes once the tree is in place; the script then waits for the base and the
files' digests to be recorded (``digests_s``, not timed, its CPU counted). The peak RSS
of the daemon and of the remote agent (VmHWM) is read after each resync, and every
destination is checked file by file against the source.

    python3 bench/resync.py [--quick] [--files N] [--size-mb M] [--dir /dev/shm] [--rounds N] [--keep]

Results go to ``bench/resync-results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO))

from daemon import CLK_TCK, cpu_ticks  # noqa: E402  (sibling module)
from run import compare, compile_checkout, generate_tree, log, manifest, run_timed  # noqa: E402  (sibling module)

RESULTS = BENCH_DIR / "resync-results.json"
TARGET_RATIO = 1.1
T_RESYNC = 1800.0


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set size of a process."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def machine_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:8]]
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
    return busy / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Machine CPU seconds used between start and stop: what a run cost in total, across
    every process (ssh and sshd included), on a machine where nothing else runs."""

    def __enter__(self) -> CpuMeter:
        self.start = machine_cpu_s()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = machine_cpu_s() - self.start


def agent_pids() -> list[int]:
    """Running syncd agents (started through ssh by the daemon)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"syncd-agent" in part or part.endswith(b".pyz") for part in cmdline) or (
                b"-c" in cmdline and any(b"SYNCD-NEED" in part for part in cmdline)):
            out.append(int(entry))
    return out


class Daemon:
    def __init__(self, work: Path, server: Any) -> None:
        self.work = work
        self.server = server
        self.socket = work / "syncd.sock"
        self.env = dict(os.environ, STATE_DIRECTORY=str(work / "state"),
                        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = open(work / "logs" / "daemon.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "syncd.cli", "daemon", "--socket", str(self.socket)],
                                     stdout=self.log, stderr=self.log, env=self.env, start_new_session=True)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the daemon did not start")
            time.sleep(0.05)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        argv = [sys.executable, "-m", "syncd.cli", *args, "--socket", str(self.socket)]
        return subprocess.run(argv, env=self.env, capture_output=True, timeout=timeout, check=False)

    def add_paused(self, name: str, local: Path, remote: Path) -> None:
        s = self.server
        done = self.cli("add", name, str(local), s.url(remote), "--identity", str(s.client_key),
                        "--known-hosts", str(s.known_hosts), "--paused")
        if done.returncode != 0:
            raise RuntimeError(done.stderr.decode())

    def resync(self, name: str, direction: str) -> tuple[float, dict[str, Any]]:
        t0 = time.perf_counter()
        done = self.cli("resync", name, f"--{direction}", "--json", timeout=T_RESYNC)
        elapsed = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"resync --{direction} failed: {done.stderr.decode()}")
        return elapsed, json.loads(done.stdout)

    def settled(self, name: str) -> float:
        """Wait until the resync's base is recorded and the digests of the files it
        placed unhashed are in (``unhashed`` 0); return how long that took."""
        t0 = time.perf_counter()
        while True:
            row = json.loads(self.cli("status", name, "--json").stdout)["sessions"][0]
            if row["resync"] is None and row["unhashed"] == 0:
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > T_RESYNC:
                raise RuntimeError(f"the digests of {name} were not recorded within {T_RESYNC:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def tar_push(server: Any, src: Path, dst: Path, logs: Path) -> float:
    ssh = shlex.join([*server.ssh_argv(), f"tar -C {shlex.quote(str(dst))} -xf -"])
    return run_timed(["bash", "-c", f"set -o pipefail; tar -C {shlex.quote(str(src))} -cf - . | {ssh}"],
                     timeout=T_RESYNC, logfile=logs / "tar.log", what="tar | ssh tar -x")


def tar_pull(server: Any, src: Path, dst: Path, logs: Path) -> float:
    ssh = shlex.join([*server.ssh_argv(), f"tar -C {shlex.quote(str(src))} -cf - ."])
    return run_timed(["bash", "-c", f"set -o pipefail; {ssh} | tar -C {shlex.quote(str(dst))} -xf -"],
                     timeout=T_RESYNC, logfile=logs / "tar.log", what="ssh tar -c | tar -x")


def rsync(server: Any, src: str, dst: str, logs: Path) -> float:
    return run_timed(["rsync", "-a", "-e", server.ssh_command(), src, dst], timeout=T_RESYNC,
                     logfile=logs / "rsync.log", what="rsync")


def settle(src: Path) -> None:
    """Same start for every tool: the previous destination written back, and the source
    tree read once so that it is in the page cache (this machine's memory limit evicts it
    between runs, and whoever ran first would pay the cold reads for the others)."""
    os.sync()
    for dirpath, _, filenames in os.walk(src):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            with contextlib.suppress(OSError), open(path, "rb") as fh:
                while fh.read(1 << 20):
                    pass
    time.sleep(1.0)


def one_round(daemon: Daemon, server: Any, work: Path, src: Path, expected: dict[str, Any], direction: str,
              i: int) -> dict[str, Any]:
    """syncd, then tar, then rsync, each into a fresh destination (removed afterwards)."""
    settle(src)
    if direction == "push":
        local, remote = src, work / f"{direction}-syncd-{i}"
        remote.mkdir()
        dest = remote
    else:
        local, remote = work / f"{direction}-syncd-{i}", src
        local.mkdir()
        dest = local
    others = set(agent_pids())
    daemon.add_paused(direction, local, remote)
    agents = set(agent_pids()) - others
    before = {p: cpu_ticks(p) for p in (daemon.proc.pid, *agents)}
    with CpuMeter() as syncd_cpu:
        seconds, summary = daemon.resync(direction, direction)
        # Not timed, but in the CPU figures: the base recorded, then the digests.
        digests_s = daemon.settled(direction)
    ours = set(agent_pids()) - others
    rss = {"daemon_kib": vm_hwm_kib(daemon.proc.pid),
           "agent_kib": max((vm_hwm_kib(p) for p in ours), default=0)}
    cpu = {"machine_s": round(syncd_cpu.seconds, 2),
           "daemon_s": (cpu_ticks(daemon.proc.pid) - before[daemon.proc.pid]) / CLK_TCK,
           "agent_s": sum(cpu_ticks(p) - before.get(p, 0) for p in ours) / CLK_TCK}
    check = compare(expected, manifest(dest))
    daemon.cli("rm", direction)
    log(f"syncd resync --{direction}: {seconds:.2f} s, base and digests recorded {digests_s:.2f} s later "
        f"({summary['files']} entries, "
        f"{len(summary['skipped'])} skipped), RSS daemon {rss['daemon_kib'] // 1024} MiB, "
        f"agent {rss['agent_kib'] // 1024} MiB, check {check}")
    settle(src)
    tar_dst = work / f"{direction}-tar-{i}"
    tar_dst.mkdir()
    with CpuMeter() as tar_cpu:
        tar_s = (tar_push if direction == "push" else tar_pull)(server, src, tar_dst, work / "logs")
    settle(src)
    rsync_dst = work / f"{direction}-rsync-{i}"
    with CpuMeter() as rsync_cpu:
        if direction == "push":
            rsync_s = rsync(server, f"{src}/", f"{server.user}@{server.host}:{rsync_dst}/", work / "logs")
        else:
            rsync_s = rsync(server, f"{server.user}@{server.host}:{src}/", f"{rsync_dst}/", work / "logs")
    cpu.update(tar_machine_s=round(tar_cpu.seconds, 2), rsync_machine_s=round(rsync_cpu.seconds, 2))
    log(f"tar: {tar_s:.2f} s, rsync: {rsync_s:.2f} s; CPU seconds {cpu}")
    for path in (dest, tar_dst, rsync_dst):
        if path != src:
            shutil.rmtree(path, ignore_errors=True)
    return {"syncd_s": seconds, "syncd_daemon_s": summary["seconds"], "digests_s": digests_s,
            "tar_s": tar_s, "rsync_s": rsync_s,
            "rss": rss, "cpu": cpu, "check": check, "skipped": len(summary["skipped"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5,000 files / 100 MiB")
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--rounds", type=int, default=1,
                        help="times each tool runs each way, taking turns (figures are medians)")
    parser.add_argument("--dir", default="/tmp",
                        help="where the trees go (e.g. /dev/shm: a tmpfs takes the disk's noise out)")
    args = parser.parse_args(argv)
    if args.quick:
        args.files, args.size_mb = 5000, 100
    sshd = importlib.import_module("tests.sshd")
    reason = sshd.sshd_missing_reason()
    if reason is not None:
        print(f"bench: {reason}", file=sys.stderr)
        return 1
    compile_checkout()
    work = Path(tempfile.mkdtemp(prefix="syncd-resync-bench-", dir=args.dir)).resolve()
    (work / "logs").mkdir()
    results: dict[str, Any] = {"files": args.files, "size_mb": args.size_mb, "dir": args.dir,
                               "loadavg_start": os.getloadavg()}
    try:
        log(f"generating ~{args.files} files / {args.size_mb} MiB in {work}")
        tree = generate_tree(work / "src", args.files, args.size_mb, args.seed)
        src = work / "src"
        results["tree"] = {"files": tree.files, "bytes": tree.total_bytes}
        expected = manifest(src)
        with sshd.start_sshd(work) as server, contextlib.ExitStack() as stack:
            daemon = Daemon(work, server)
            stack.callback(daemon.stop)
            # A tiny session first: the agent upload and cold imports are not timed.
            (work / "warm-l").mkdir()
            (work / "warm-l" / "f").write_text("warm")
            (work / "warm-r").mkdir()
            daemon.add_paused("warm", work / "warm-l", work / "warm-r")
            daemon.resync("warm", "push")
            daemon.cli("rm", "warm")

            for direction in ("push", "pull"):
                rounds = [one_round(daemon, server, work, src, expected, direction, i) for i in range(args.rounds)]
                syncd_s = [r["syncd_s"] for r in rounds]
                tar_s = [r["tar_s"] for r in rounds]
                rsync_s = [r["rsync_s"] for r in rounds]
                seconds, tar_median, rsync_median = (statistics.median(x) for x in (syncd_s, tar_s, rsync_s))
                if args.rounds > 1:
                    log(f"{direction} medians of {args.rounds} rounds: syncd {seconds:.2f} s, tar {tar_median:.2f} s, "
                        f"rsync {rsync_median:.2f} s")
                results[direction] = {
                    "syncd_s": seconds, "syncd_daemon_s": statistics.median(r["syncd_daemon_s"] for r in rounds),
                    "digests_s": statistics.median(r["digests_s"] for r in rounds),
                    "tar_s": tar_median, "rsync_s": rsync_median,
                    "ratio_tar": seconds / tar_median, "ratio_rsync": seconds / rsync_median,
                    "samples_s": {"syncd": syncd_s, "tar": tar_s, "rsync": rsync_s},
                    "rss": {key: max(r["rss"][key] for r in rounds) for key in ("daemon_kib", "agent_kib")},
                    "cpu": rounds[-1]["cpu"], "check": [r["check"] for r in rounds],
                    "skipped": max(r["skipped"] for r in rounds)}
        results["loadavg_end"] = os.getloadavg()
        print(report(results))
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        ok = all(results[d]["ratio_tar"] <= TARGET_RATIO for d in ("push", "pull"))
        return 0 if ok else 2
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def report(r: dict[str, Any]) -> str:
    lines = [f"tree: {r['tree']['files']} files, {r['tree']['bytes'] / 2**20:.0f} MiB",
             f"{'':8} {'syncd':>8} {'tar|ssh':>8} {'rsync':>8} {'/tar':>6} {'/rsync':>7}  "
             f"{'RSS daemon':>10} {'RSS agent':>10}  target <= {TARGET_RATIO}x tar"]
    for d in ("push", "pull"):
        x = r[d]
        verdict = "PASS" if x["ratio_tar"] <= TARGET_RATIO else "FAIL"
        lines.append(f"{d:8} {x['syncd_s']:7.2f}s {x['tar_s']:7.2f}s {x['rsync_s']:7.2f}s {x['ratio_tar']:5.2f}x "
                     f"{x['ratio_rsync']:6.2f}x  {x['rss']['daemon_kib'] / 1024:8.0f} MiB "
                     f"{x['rss']['agent_kib'] / 1024:8.0f} MiB  {verdict}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
