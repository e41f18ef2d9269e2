"""No echo, measured: what one side changes crosses the link once, in each direction."""

from __future__ import annotations

import os
import re
from pathlib import Path

from tests.e2e.helpers import start_session, wait_trees_equal
from tests.sshd import SshServer

FILES = 40
SIZE = 16 * 1024
SUMMARY = re.compile(
    r"sent (\d+) files \((\d+) bytes\), received (\d+) files \((\d+) bytes\).*"
    r"wire out (\d+) bytes, in (\d+) bytes"
)


def test_each_change_crosses_once(sshd: SshServer, tmp_path: Path) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    remote.mkdir()
    session = start_session(sshd, local, remote, tmp_path / "state", verbose=False)
    wait_trees_equal(local, remote, session, what="empty start")
    for i in range(FILES):
        (local / f"l{i}.bin").write_bytes(os.urandom(SIZE))
        (remote / f"r{i}.bin").write_bytes(os.urandom(SIZE))
    wait_trees_equal(local, remote, session, timeout=30, what="both directions")
    session.stop()
    match = SUMMARY.search(session.stdout())
    assert match, session.stdout()
    sent_files, sent_bytes, got_files, got_bytes, wire_out, wire_in = map(int, match.groups())
    payload = FILES * SIZE
    # Each file travelled once, in its own direction: applying it did not send it back.
    assert (sent_files, sent_bytes) == (FILES, payload)
    assert (got_files, got_bytes) == (FILES, payload)
    # On the wire: the payload plus metadata (paths, stats, digests), never a second copy.
    assert payload <= wire_out < payload * 1.25, (wire_out, payload)
    assert payload <= wire_in < payload * 1.25, (wire_in, payload)
