"""End-to-end: crash safety. ``kill -9`` of the syncing process at random (seeded) moments
while both sides churn, each time restarted with the same ``--state-dir``; at the end the
trees are identical, no version anybody still held was lost and nothing came back or went
away that nobody asked for. And a restart after a clean sync sends nothing.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.engine.model import Agreed, Intent
from syncd.protocol.messages import FILE
from syncd.scan import digest_bytes
from tests.e2e.helpers import SyncProcess
from tests.e2e.twoway_util import (
    Churner,
    Ledger,
    Pair,
    add_intent,
    assert_idle,
    change_lines,
    churn_both,
    converge_or_known_bug,
    kill9,
    make_tree,
    open_pair,
    renameat2_works,
    wait_quiescent,
)
from tests.sshd import SshServer

CHURN_SECONDS = 10.0
RATE = 14.0


@pytest.fixture
def pair(sshd: SshServer, tmp_path: Path) -> Iterator[Pair]:
    yield from open_pair(sshd, tmp_path / "pair")


def test_kill9_during_churn_loses_nothing(pair: Pair, tmp_path: Path) -> None:
    if not renameat2_works(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    seed = int(os.environ.get("SYNCD_TEST_SEED", "4242"))
    rng = random.Random(seed)
    ledger = Ledger()
    lc = Churner("local", pair.local, tmp_path / "stage-local", ledger, seed)
    rc = Churner("remote", pair.remote, tmp_path / "stage-remote", ledger, seed + 1)
    for i, d in enumerate(lc.dirs):
        lc.write(f"{d}/{lc.names[i % len(lc.names)]}")
        lc.write(f"{d}/{lc.names[(i + 5) % len(lc.names)]}")
    session = [pair.start()]
    wait_quiescent(pair.local, pair.remote, session[0], what="initial push")

    # 3 to 5 kills at random moments; each restart comes after a short random pause.
    kills = sorted(rng.uniform(0.5, CHURN_SECONDS - 3.5) for _ in range(rng.randint(3, 5)))
    pending = list(kills)
    restart_at: list[float] = []
    done: list[str] = []

    def during(elapsed: float) -> None:
        # A kill falls due only once the previous restart has happened (it waits otherwise).
        if pending and elapsed >= pending[0] and not restart_at and session[-1].alive():
            pending.pop(0)
            kill9(session[-1])
            done.append(f"kill at {elapsed:.2f} s")
            restart_at.append(elapsed + rng.uniform(0.0, 0.6))
        if restart_at and elapsed >= restart_at[0]:
            restart_at.pop(0)
            session.append(pair.start())
        elif not restart_at and not session[-1].alive():
            raise AssertionError("syncd exited on its own during churn\n" + session[-1].describe())

    churn_both(lc, rc, CHURN_SECONDS, RATE, during=during)
    if restart_at or not session[-1].alive():
        session.append(pair.start())
    assert len(done) >= 3, done
    final: SyncProcess = session[-1]

    snap = converge_or_known_bug(pair.local, pair.remote, final, timeout=40, what="convergence after kills",
                                 sessions=session)
    stray = [p for p in snap if ".syncd-tmp" in p]
    assert stray == [], f"temp files of killed writers left in the trees: {stray[:10]}"
    missing = ledger.missing([pair.local, pair.remote])
    assert not missing, (
        f"{len(missing)} of {len(ledger.live)} live versions lost after {done}: "
        f"{sorted(missing.values())[:20]}\nlocal ops: {lc.log[-15:]}\nremote ops: {rc.log[-15:]}\n"
        + "\n".join(s.describe()[-1500:] for s in session[-2:])
    )
    # Nothing came back that both sides removed last (the ledger above covers the other
    # direction: a file deleted that nobody deleted would be a live version lost).
    resurrected = ledger.resurrected(snap)
    assert resurrected == [], f"present although both sides removed them last: {resurrected[:10]}"
    assert_idle(final)
    final.stop()


def test_restart_after_clean_sync_sends_nothing(pair: Pair) -> None:
    tree = {f"pkg{i}/mod{j}.py": f"# {i} {j}\n" * (j + 1) for i in range(8) for j in range(20)}
    tree.update({"bin/run.sh": "#!/bin/sh\n", "empty/": ""})
    make_tree(pair.local, {k: v for k, v in tree.items() if not k.endswith("/")})
    (pair.local / "empty").mkdir()
    os.chmod(pair.local / "bin" / "run.sh", 0o755)
    os.symlink("pkg0/mod0.py", pair.local / "link")
    s1 = pair.start()
    wait_quiescent(pair.local, pair.remote, s1, what="initial push")
    s1.stop()

    # A clean stop, then a restart: nothing travels.
    s2 = pair.start()
    wait_quiescent(pair.local, pair.remote, s2, what="restart")
    assert_idle(s2)  # the first cycle is over
    assert change_lines(s2) == [], s2.stdout()

    # kill -9 of an idle session, then a restart: nothing travels either.
    kill9(s2)
    s3 = pair.start()
    wait_quiescent(pair.local, pair.remote, s3, what="restart after kill -9")
    assert_idle(s3)
    assert change_lines(s3) == [], s3.stdout()
    s3.stop()


@pytest.mark.parametrize("side", ["remote", "local"])
def test_copy_landed_before_a_cut_then_deleted_at_its_source(pair: Pair, side: str) -> None:
    """A copy that reached ``side`` just before a kill -9 (recorded as an intent, not yet in
    the base), whose source was deleted before the restart: the restart adopts the copy
    and then propagates the deletion, rather than keep a row saying both sides hold it."""
    make_tree(pair.local, {"keep.txt": "kept\n"})
    s1 = pair.start()
    wait_quiescent(pair.local, pair.remote, s1, what="initial push")
    s1.stop()

    # What a session killed between applying the copy and committing it leaves behind.
    source, dest = (pair.local, pair.remote) if side == "remote" else (pair.remote, pair.local)
    data = b"copied, then deleted at the source\n"
    (source / "gone.txt").write_bytes(data)
    shutil.copy2(source / "gone.txt", dest / "gone.txt")
    st = (source / "gone.txt").stat()
    source_ino = {"local": 0, "remote": 0, "local" if side == "remote" else "remote": st.st_ino}
    after = Agreed("gone.txt", FILE, st.st_mode & 0o7777, st.st_size, st.st_mtime_ns, digest_bytes(data), None,
                   source_ino["local"], source_ino["remote"])
    add_intent(pair.state, Intent(side, "gone.txt", after))
    (source / "gone.txt").unlink()

    s2 = pair.start()
    snap = wait_quiescent(pair.local, pair.remote, s2, what="restart")
    assert "gone.txt" not in snap and not (dest / "gone.txt").exists()
    assert (pair.local / "keep.txt").read_text() == "kept\n"
    s2.stop()
