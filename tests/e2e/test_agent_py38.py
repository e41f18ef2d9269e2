"""End-to-end: the agent runs on the oldest supported remote Python (3.8)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.e2e.helpers import SyncProcess, bpath, start_session, wait_trees_equal, wait_until, write_file
from tests.sshd import SshServer

PY38 = Path("/root/.pyenv/versions/3.8.18/bin/python3")


@pytest.mark.skipif(not os.access(PY38, os.X_OK), reason=f"no Python 3.8 interpreter at {PY38}")
@pytest.mark.parametrize("remote_empty", [False, True], ids=["entry-by-entry", "first-sync-stream"])
def test_round_trip_with_python38_agent(sshd: SshServer, tmp_path: Path, remote_empty: bool) -> None:
    local, remote, state = tmp_path / "local", tmp_path / "remote", tmp_path / "state"
    local.mkdir()
    remote.mkdir()
    write_file(local / "src" / "main.py", "print('pushed')\n")
    write_file(local / "tool.sh", "#!/bin/sh\n", mode=0o755)
    write_file(local / "big.bin", os.urandom(600 * 1024))  # streamed as a blob
    os.symlink("src/main.py", local / "link")
    write_file(bpath(local, b"n\xe9"), b"latin-1 name\n")
    if not remote_empty:  # else the first sync streams the tree (tar extraction and merge_in on 3.8)
        write_file(remote / "from-remote.txt", "pulled\n")

    session: SyncProcess = start_session(sshd, local, remote, state, "--remote-python", str(PY38))
    try:
        wait_trees_equal(local, remote, session, timeout=30, mtimes=True, what="initial sync with a 3.8 agent")
        if remote_empty:  # reported once the agent's answer arrives, after the tree is in place
            wait_until(lambda: "-> first sync: " in session.stdout(), 30, session=session,
                       message="the first sync's report")
        else:
            assert (local / "from-remote.txt").read_text() == "pulled\n"
        # Live, both ways.
        write_file(local / "src" / "main.py", "print('edited')\n")
        write_file(remote / "agent-made" / "out.txt", "agent output\n")
        wait_trees_equal(local, remote, session, timeout=15, mtimes=True, what="live round trip")
        assert (remote / "src" / "main.py").read_text() == "print('edited')\n"
        assert (local / "agent-made" / "out.txt").read_text() == "agent output\n"
        session.stop()
    finally:
        session.kill()
    found = re.search(r"agent on python (\d+\.\d+\.\d+)", session.stderr())
    assert found is not None, session.stderr()
    assert found.group(1).startswith("3.8."), found.group(0)
