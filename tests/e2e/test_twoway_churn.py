"""End-to-end: convergence under churn on both sides, and no echo.

Both sides create, modify, delete and rename random files (and now and then whole
directories) in ~30 directories while the session runs. Every write has unique content,
and each edit is made by an atomic rename from outside the root, so the test knows exactly
which version every operation replaced or removed (see ``twoway_util.Churner``). After
quiescence both trees must be identical, and every version that no side replaced or
deleted while holding it must still exist, at its path or as a conflict copy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.twoway_util import (
    Churner,
    Ledger,
    Pair,
    assert_idle,
    change_lines,
    churn_both,
    converge_or_known_bug,
    is_conflict_copy,
    open_pair,
    renameat2_works,
    wait_quiescent,
)
from tests.sshd import SshServer

CHURN_SECONDS = 8.0
RATE = 18.0  # operations per second per side (about 280 in all)


@pytest.fixture
def pair(sshd: SshServer, tmp_path: Path) -> Iterator[Pair]:
    yield from open_pair(sshd, tmp_path / "pair")


def _churners(pair: Pair, tmp_path: Path, seed: int) -> tuple[Ledger, Churner, Churner]:
    if not renameat2_works(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    ledger = Ledger()
    lc = Churner("local", pair.local, tmp_path / "stage-local", ledger, seed)
    rc = Churner("remote", pair.remote, tmp_path / "stage-remote", ledger, seed + 1)
    # A starting tree: two files in each directory.
    for i, d in enumerate(lc.dirs):
        lc.write(f"{d}/{lc.names[i % len(lc.names)]}")
        lc.write(f"{d}/{lc.names[(i + 3) % len(lc.names)]}")
    return ledger, lc, rc


def test_churn_converges_and_loses_no_version(pair: Pair, tmp_path: Path) -> None:
    seed = int(os.environ.get("SYNCD_TEST_SEED", "20250101"))
    ledger, lc, rc = _churners(pair, tmp_path, seed=seed)
    s = pair.start()
    wait_quiescent(pair.local, pair.remote, s, what="initial push")

    churn_both(lc, rc, CHURN_SECONDS, RATE, during=lambda _t: s.assert_alive())
    assert lc.ops + rc.ops >= 200, (lc.ops, rc.ops)

    snap = converge_or_known_bug(pair.local, pair.remote, s, timeout=30, what="convergence after churn")
    stray = [p for p in snap if ".syncd-tmp" in p]
    assert stray == [], f"temp files left in the trees: {stray[:10]}"
    missing = ledger.missing([pair.local, pair.remote])
    print(f"churn: ops local={lc.ops} remote={rc.ops} skipped={lc.errors + rc.errors} "
          f"written={ledger.written} superseded={ledger.superseded} live={len(ledger.live)} "
          f"files={sum(1 for v in snap.values() if v[0] == 'file')} "
          f"conflict copies={sum(1 for p in snap if is_conflict_copy(p))}")
    assert not missing, (
        f"{len(missing)} of {len(ledger.live)} live versions lost (written {ledger.written}, "
        f"superseded {ledger.superseded}): {sorted(missing.values())[:20]}\n"
        f"conflict copies: {sum(1 for p in snap if is_conflict_copy(p))}\n"
        f"local ops: {lc.log[-15:]}\nremote ops: {rc.log[-15:]}\n{s.describe()}"
    )
    resurrected = ledger.resurrected(snap)
    assert resurrected == [], f"present although both sides removed them last: {resurrected[:10]}"
    assert_idle(s)

    # No echo: with the session idle for 2 s, one local edit makes one "->" line and no "<-".
    time.sleep(2.0)
    mark = len(s.stdout_lines())
    (pair.local / "echo-probe.txt").write_text("probe\n")
    wait_quiescent(pair.local, pair.remote, s, timeout=15, what="echo probe")
    time.sleep(1.0)
    lines = change_lines(s, mark)
    assert len([ln for ln in lines if ln.startswith("->")]) == 1, lines
    assert [ln for ln in lines if ln.startswith("<-")] == [], lines
    assert "echo-probe.txt" in lines[0]
    s.stop()
