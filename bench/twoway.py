#!/usr/bin/env python3
"""Two-way churn: syncd (live) against one Unison two-way run, over OpenSSH on 127.0.0.1.

One generated tree of small files is copied to four directories: a local and a remote tree
for syncd, and a local and a remote tree for Unison (the "remote" trees are on this machine,
reached through a throw-away ``sshd`` from ``tests/sshd.py``). Each tree has two halves:
``a/`` is churned only on the local side and ``b/`` only on the remote side, so the two
writers never touch the same path and no conflict can arise.

1. syncd: ``syncd run LOCAL ssh://...`` is started on the identical trees and allowed to
   settle (a marker file each way). Two writer threads then churn for ``--seconds`` or
   ``--ops`` operations per side, whichever comes first (seeded creates, modifications,
   deletes and renames; as fast as possible unless ``--rate``). The convergence time is from
   the end of churn until both trees hold exactly the expected final state.
2. Unison: a baseline run on the identical trees builds its archive (not timed for the
   comparison); the very same operations (same seeds, same count per side) are applied
   without any sync running; then one ``unison LOCAL ssh://HOST//REMOTE -batch -auto`` run
   is timed, and both trees are checked against the expected state.

    python3 bench/twoway.py [--files N] [--seconds S] [--ops N] [--rate R] [--keep]

See ``bench/README.md``. Results go to ``bench/twoway-results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO))

from run import (  # noqa: E402  (bench/run.py, imported as a sibling module)
    EXTS,
    SYNCD_TEMP_PREFIX,
    BenchError,
    Ctx,
    Syncd,
    absent,
    compare,
    compile_checkout,
    fmt,
    has_content,
    log,
    make_corpus,
    manifest,
    sizes,
    source_like,
    ssh_baseline,
    tool_versions,
    wait_for,
    warm_up_syncd,
)

RESULTS_JSON = BENCH_DIR / "twoway-results.json"
T_SETTLE = 300.0  # syncd's first cycle on the identical trees
T_CONVERGE = 300.0
T_UNISON = 600.0
HALVES = {"local": "a", "remote": "b"}
# Operation mix (weights): keeps the file count roughly stable.
OPS = (("create", 3), ("modify", 4), ("delete", 1.5), ("rename", 1.5))

Entry = tuple[int, str]  # (size, sha1) as in run.manifest


# ------------------------------------------------------------------------------------------
# the tree and the writers
# ------------------------------------------------------------------------------------------


def generate(root: Path, files: int, seed: int) -> dict[str, list[str]]:
    """*files* small files split over ``a/dNN`` and ``b/dNN``; returns half -> its directories."""
    rng = random.Random(seed)
    corpus = make_corpus(rng, 1 << 20)
    per_half = max(1, files // 2)
    n_dirs = max(1, per_half // 50)
    dirs: dict[str, list[str]] = {}
    for half in ("a", "b"):
        dirs[half] = [f"{half}/d{i:03d}" for i in range(n_dirs)]
        for d in dirs[half]:
            (root / d).mkdir(parents=True)
        for i in range(per_half):
            rel = f"{dirs[half][i % n_dirs]}/f{i:06d}{EXTS[i % len(EXTS)]}"
            (root / rel).write_bytes(source_like(rng, corpus, rng.randint(256, 8 * 1024), rel))
    return dirs


class Writer(threading.Thread):
    """Seeded churn on one half of one tree. Tracks the expected final content in memory."""

    def __init__(self, side: str, root: Path, dirs: list[str], files: dict[str, Entry], *, seed: int,
                 max_ops: int, seconds: float | None, rate: float, corpus: bytes,
                 start: threading.Event) -> None:
        super().__init__(name=f"writer-{side}", daemon=True)
        self.side = side
        self.root = root
        self.dirs = dirs
        self.files = dict(files)  # rel -> (size, sha1): the state this writer leaves behind
        self.seed = seed
        self.max_ops = max_ops
        self.seconds = seconds
        self.rate = rate
        self.corpus = corpus
        self.start_event = start
        self.ops = 0
        self.counts = {name: 0 for name, _ in OPS}
        self.t_start = 0.0
        self.t_end = 0.0
        self.error: str | None = None

    def run(self) -> None:
        try:
            self.churn()
        except Exception:  # reported by the caller
            self.error = traceback.format_exc()
        finally:
            self.t_end = time.perf_counter()

    def churn(self) -> None:
        rng = random.Random(self.seed)
        names = sorted(self.files)
        index = {rel: i for i, rel in enumerate(names)}
        kinds = [name for name, _ in OPS]
        weights = [w for _, w in OPS]
        counter = 0

        def payload(rel: str) -> bytes:
            return source_like(rng, self.corpus, rng.randint(256, 8 * 1024), rel)

        def put(rel: str, data: bytes) -> None:
            with open(self.root / rel, "wb") as f:
                f.write(data)
            self.files[rel] = (len(data), hashlib.sha1(data).hexdigest())

        def add_name(rel: str) -> None:
            index[rel] = len(names)
            names.append(rel)

        def drop_name(rel: str) -> None:
            i = index.pop(rel)
            last = names.pop()
            if last != rel:
                names[i] = last
                index[last] = i

        self.start_event.wait()
        self.t_start = time.perf_counter()
        deadline = None if self.seconds is None else self.t_start + self.seconds
        while self.ops < self.max_ops:
            now = time.perf_counter()
            if deadline is not None and now >= deadline:
                break
            if self.rate > 0:
                due = self.t_start + self.ops / self.rate
                if due > now:
                    time.sleep(due - now)
            kind = rng.choices(kinds, weights)[0]
            if kind != "create" and not names:
                kind = "create"
            counter += 1
            if kind == "create":
                rel = f"{rng.choice(self.dirs)}/new-{self.side}-{counter:06d}{rng.choice(EXTS)}"
                put(rel, payload(rel))
                add_name(rel)
            elif kind == "modify":
                rel = rng.choice(names)
                put(rel, payload(rel))
            elif kind == "delete":
                rel = rng.choice(names)
                os.unlink(self.root / rel)
                del self.files[rel]
                drop_name(rel)
            else:
                rel = rng.choice(names)
                new = f"{rng.choice(self.dirs)}/ren-{self.side}-{counter:06d}{rng.choice(EXTS)}"
                os.rename(self.root / rel, self.root / new)
                self.files[new] = self.files.pop(rel)
                drop_name(rel)
                add_name(new)
            self.counts[kind] += 1
            self.ops += 1


def churn(trees: dict[str, Path], dirs: dict[str, list[str]], base: dict[str, Entry], args: argparse.Namespace,
          corpus: bytes, ops: dict[str, int] | None) -> tuple[dict[str, Writer], float, dict[str, Entry]]:
    """Run both writers at once. With *ops*, replay exactly that many operations per side
    (no time limit). Returns the writers, the perf_counter() of the end of churn and the
    expected final manifest of both trees."""
    start = threading.Event()
    writers: dict[str, Writer] = {}
    for i, side in enumerate(("local", "remote")):
        half = HALVES[side]
        mine = {rel: e for rel, e in base.items() if rel.startswith(f"{half}/") and e[0] >= 0}
        writers[side] = Writer(side, trees[side], dirs[half], mine, seed=args.seed * 1000 + i,
                               max_ops=ops[side] if ops else args.ops,
                               seconds=None if ops else args.seconds,
                               rate=0.0 if ops else args.rate, corpus=corpus, start=start)
    for w in writers.values():
        w.start()
    start.set()
    for w in writers.values():
        w.join()
    end = time.perf_counter()
    for w in writers.values():
        if w.error:
            raise BenchError(f"writer {w.side} failed:\n{w.error}")
    expected = {rel: e for rel, e in base.items() if e[0] < 0 or not rel.startswith(("a/", "b/"))}
    for w in writers.values():
        expected.update(w.files)
    return writers, end, expected


def writer_stats(writers: dict[str, Writer]) -> dict[str, Any]:
    out = {}
    for side, w in writers.items():
        dur = w.t_end - w.t_start
        out[side] = {"ops": w.ops, "counts": w.counts, "seconds": dur,
                     "ops_per_s": w.ops / dur if dur > 0 else None, "files_after": len(w.files)}
    return out


# ------------------------------------------------------------------------------------------
# convergence
# ------------------------------------------------------------------------------------------


def clean_manifest(root: Path) -> dict[str, Entry]:
    return {rel: e for rel, e in manifest(root).items() if not rel.rsplit("/", 1)[-1].startswith(SYNCD_TEMP_PREFIX)}


def matches(roots: list[Path], expected: dict[str, Entry]) -> bool:
    """Cheap check first (path -> size of every file), the full SHA-1 manifest only then."""
    exp_sizes = {rel: e[0] for rel, e in expected.items() if e[0] >= 0}
    if any(sizes(r) != exp_sizes for r in roots):
        return False
    return all(clean_manifest(r) == expected for r in roots)


def settle_syncd(local: Path, remote: Path, proc: Syncd) -> float:
    """Marker each way, then both removed: syncd's first cycle is done and both watchers live."""
    t0 = time.perf_counter()
    for name, src, dst in (("l2r", local, remote), ("r2l", remote, local)):
        data = f"settle {name} {time.time_ns()}\n".encode()
        (src / f"bench-settle-{name}.txt").write_bytes(data)
        wait_for(has_content(dst / f"bench-settle-{name}.txt", data), T_SETTLE, f"syncd settle {name}", proc,
                 sleep=0.01)
    for name, src, dst in (("l2r", local, remote), ("r2l", remote, local)):
        (src / f"bench-settle-{name}.txt").unlink()
        wait_for(absent(dst / f"bench-settle-{name}.txt"), T_SETTLE, f"syncd settle delete {name}", proc,
                 sleep=0.01)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------
# the two runs
# ------------------------------------------------------------------------------------------


def run_syncd(ctx: Ctx, work: Path, base_dir: Path, base: dict[str, Entry], dirs: dict[str, list[str]],
              args: argparse.Namespace, corpus: bytes, r: dict[str, Any]) -> dict[str, int]:
    log("== syncd: live two-way sync during churn")
    local, remote = work / "syncd-local", work / "syncd-remote"
    shutil.copytree(base_dir, local)
    shutil.copytree(base_dir, remote)
    os.sync()
    out = r.setdefault("syncd", {})
    proc = Syncd(ctx, remote, work / "syncd-state", "twoway", local=local)
    with proc.running():
        out["settle_s"] = settle_syncd(local, remote, proc)
        log(f"  settled (markers both ways) after {out['settle_s']:.2f} s")
        writers, end, expected = churn({"local": local, "remote": remote}, dirs, base, args, corpus, None)
        out["churn"] = writer_stats(writers)
        out["churn_s"] = max(w.t_end for w in writers.values()) - min(w.t_start for w in writers.values())
        ops = {side: w.ops for side, w in writers.items()}
        rates = ", ".join(f"{side} {v['ops_per_s']:.0f} ops/s" for side, v in out["churn"].items())
        log(f"  churn: {ops} ops in {out['churn_s']:.2f} s ({rates})")
        try:
            done = wait_for(lambda: matches([local, remote], expected), T_CONVERGE, "syncd convergence", proc,
                            sleep=0.005, adaptive=True)
            out["convergence_s"] = done - end
            total = sum(ops.values())
            out["applied_ops_per_s"] = total / (out["churn_s"] + out["convergence_s"])
            log(f"  converged {out['convergence_s']:.3f} s after the end of churn")
        except BenchError:
            out["diff_local"] = compare(expected, clean_manifest(local))
            out["diff_remote"] = compare(expected, clean_manifest(remote))
            raise
        proc.check()
    out["exit_status"] = proc.exit_status
    out["verify"] = {"local": compare(expected, clean_manifest(local)),
                     "remote": compare(expected, clean_manifest(remote))}
    r["expected_files"] = sum(1 for e in expected.values() if e[0] >= 0)
    r["_expected"] = expected
    return ops


def run_unison(ctx: Ctx, work: Path, base_dir: Path, base: dict[str, Entry], dirs: dict[str, list[str]],
               args: argparse.Namespace, corpus: bytes, ops: dict[str, int], r: dict[str, Any]) -> None:
    log("== unison: same churn, then one two-way run")
    local, remote = work / "unison-local", work / "unison-remote"
    shutil.copytree(base_dir, local)
    shutil.copytree(base_dir, remote)
    os.sync()
    out = r.setdefault("unison", {})
    out["baseline_run_s"] = ctx.unison(remote, local=local, timeout=T_UNISON)
    log(f"  baseline run on identical trees (builds the archive): {out['baseline_run_s']:.2f} s")
    writers, _end, expected = churn({"local": local, "remote": remote}, dirs, base, args, corpus, ops)
    out["churn"] = writer_stats(writers)
    os.sync()
    out["run_s"] = ctx.unison(remote, local=local, timeout=T_UNISON)
    out["applied_ops_per_s"] = sum(ops.values()) / out["run_s"]
    log(f"  two-way run after churn: {out['run_s']:.2f} s")
    out["verify"] = {"local": compare(expected, clean_manifest(local)),
                     "remote": compare(expected, clean_manifest(remote))}
    syncd_expected = r.get("_expected")
    if syncd_expected is not None:
        out["same_final_state_as_syncd"] = syncd_expected == expected


# ------------------------------------------------------------------------------------------
# report / main
# ------------------------------------------------------------------------------------------


def report(r: dict[str, Any]) -> str:
    s, u = r.get("syncd", {}), r.get("unison", {})
    churn = s.get("churn", {})
    conv, urun = s.get("convergence_s"), u.get("run_s")

    def per_side(key: str, d: dict[str, Any]) -> str:
        return " / ".join(str(d.get(side, {}).get(key, "-")) for side in ("local", "remote"))

    def rate(d: dict[str, Any]) -> str:
        return " / ".join(f"{d[side]['ops_per_s']:.0f}" if d.get(side, {}).get("ops_per_s") else "-"
                          for side in ("local", "remote"))

    rows = [
        ("churn ops per side (local / remote)", per_side("ops", churn)),
        ("churn duration (syncd run)", fmt(s.get("churn_s"))),
        ("churn rate, ops/s per side (local / remote)", rate(churn)),
        ("syncd: convergence after end of churn", fmt(conv)),
        ("syncd: ops applied/s (both sides, churn start -> converged)",
         f"{s['applied_ops_per_s']:.0f}" if s.get("applied_ops_per_s") else "-"),
        ("unison: baseline run, identical trees (not compared)", fmt(u.get("baseline_run_s"))),
        ("unison: one two-way run after the same churn", fmt(urun)),
        ("unison: ops applied/s (both sides / run time)",
         f"{u['applied_ops_per_s']:.0f}" if u.get("applied_ops_per_s") else "-"),
        ("ratio syncd convergence / unison run", f"{conv / urun:.3f}x" if conv and urun else "-"),
    ]
    w = max(len(a) for a, _ in rows)
    lines = ["", f"{'metric'.ljust(w)} | value", f"{'-' * w}-+-{'-' * 12}"]
    lines += [f"{a.ljust(w)} | {b}" for a, b in rows]
    checks = []
    for tool, d in (("syncd", s), ("unison", u)):
        for side, v in d.get("verify", {}).items():
            checks.append(f"{tool} {side}: {'identical' if v['ok'] else 'DIFFERENT ' + json.dumps(v)}")
    if checks:
        lines.append("verification vs expected final state: " + "; ".join(checks))
    if "same_final_state_as_syncd" in u:
        lines.append(f"unison and syncd runs reached the same final state: {u['same_final_state_as_syncd']}")
    lines.append(f"tree: {r.get('tree', {}).get('files')} files at start, {r.get('expected_files', '-')} after churn; "
                 f"ssh baseline {fmt(r.get('ssh_true_s'))}; {r['host'].get('cpus')} CPUs, "
                 f"load {r['host']['loadavg_start'][0]:.2f} at start")
    if r.get("errors"):
        lines.append("errors:")
        lines += [f"  - {e.splitlines()[0]}" for e in r["errors"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=5000, help="small files in the tree (default 5000)")
    p.add_argument("--seconds", type=float, default=20.0, help="churn at most this long (default 20)")
    p.add_argument("--ops", type=int, default=2000, help="churn at most this many ops per side (default 2000)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="pace each writer at R ops/s (default 0: as fast as possible)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temp dir (default /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the trees and logs")
    p.add_argument("--json", type=Path, default=RESULTS_JSON, help="where to write the results")
    p.add_argument("--no-unison", action="store_true", help="leave Unison out")
    args = p.parse_args(argv)
    if args.files < 100 or args.ops < 1 or args.seconds <= 0:
        p.error("need --files >= 100, --ops >= 1, --seconds > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sshd = importlib.import_module("tests.sshd")
    reason = sshd.sshd_missing_reason()
    if reason is not None:
        print(f"twoway: {reason}", file=sys.stderr)
        return 1
    compile_checkout()
    parent = args.workdir or Path("/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="syncd-twoway-", dir=parent)).resolve()
    r: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "host": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                 "tools": tool_versions(), "loadavg_start": os.getloadavg()},
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
        base_dir = work / "base"
        t0 = time.perf_counter()
        dirs = generate(base_dir, args.files, args.seed)
        base = manifest(base_dir)
        corpus = make_corpus(random.Random(args.seed + 7), 1 << 20)
        r["tree"] = {"files": sum(1 for e in base.values() if e[0] >= 0),
                     "bytes": sum(e[0] for e in base.values() if e[0] >= 0),
                     "dirs": sum(1 for e in base.values() if e[0] < 0), "generate_s": time.perf_counter() - t0}
        log(f"tree: {r['tree']['files']} files, {r['tree']['bytes'] / 2**20:.1f} MiB")
        extra = [f"SetEnv UNISON={unison_dir / 'remote'}"]
        with sshd.start_sshd(work, extra_config=extra) as server:
            ctx = Ctx(work=work, server=server, src=base_dir, logs=logs, unison_dir=unison_dir,
                      syncd_cmd=[sys.executable, "-m", "syncd.cli"])
            if args.no_unison:
                ctx.unison_reason = "left out (--no-unison)"
            else:
                ctx.check_unison()
            r["host"]["unison"] = ctx.unison_reason
            log(f"sshd on {server.host}:{server.port}; unison: {ctx.unison_reason or 'ok'}")
            r["ssh_true_s"] = ssh_baseline(server, logs)
            warm_up_syncd(ctx, r)
            ops: dict[str, int] | None = None
            try:
                ops = run_syncd(ctx, work, base_dir, base, dirs, args, corpus, r)
            except Exception as exc:  # the unison figures are still worth having
                r["errors"].append(f"syncd: {exc}")
                r.setdefault("tracebacks", []).append(traceback.format_exc())
                log(f"FAILED syncd: {exc}")
            if ctx.unison_ok:
                try:
                    run_unison(ctx, work, base_dir, base, dirs, args, corpus,
                               ops or {"local": args.ops, "remote": args.ops}, r)
                except Exception as exc:
                    r["errors"].append(f"unison: {exc}")
                    r.setdefault("tracebacks", []).append(traceback.format_exc())
                    log(f"FAILED unison: {exc}")
            else:
                log(f"unison skipped: {ctx.unison_reason}")
        r["host"]["loadavg_end"] = os.getloadavg()
        r.pop("_expected", None)
        print(report(r), flush=True)
        code = 0 if not r["errors"] else 2
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        r.pop("_expected", None)
        r["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        r["workdir"] = str(work)
        with contextlib.suppress(OSError):
            args.json.write_text(json.dumps(r, indent=2, default=str) + "\n")
            log(f"results written to {args.json}")
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
