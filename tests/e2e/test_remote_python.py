"""End to end: the agent starts with the interpreter its configured ``python3`` led to
last time (recorded in the state directory for the host), and with ``python3`` again
should that one fail. Real daemon, real sshd, real login shell."""

from __future__ import annotations

import json
import os
from pathlib import Path

from syncd.session.interpreters import FILE_NAME
from tests.e2e.daemon_util import DaemonProc, wait_until
from tests.e2e.test_resync import LIVE, add_session, daemon, pause, wait_state, write
from tests.sshd import SshServer

__all__ = ["daemon"]  # the module's daemon fixture, shared by the tests here


def recorded(state_dir: Path) -> dict[str, str]:
    """The interpreters recorded, by host."""
    known = json.loads((state_dir / FILE_NAME).read_text())
    assert isinstance(known, dict)
    return known


def record(state_dir: Path, key: str, path: str) -> None:
    (state_dir / FILE_NAME).write_text(json.dumps({key: path}))


def resume_and_sync(daemon: DaemonProc, name: str, local: Path, remote: Path, marker: str) -> None:
    daemon.rpc("resume", {"name": name})
    wait_state(daemon, name, LIVE)
    write(local / marker, marker)
    wait_until(lambda: (remote / marker).exists(), 20, message=f"{marker} to reach the remote")


def test_the_agent_starts_with_the_interpreter_found_last_time(daemon: DaemonProc, sshd: SshServer,
                                                                 tmp_path: Path) -> None:
    name = "python"
    local, remote = add_session(daemon, sshd, tmp_path, name)
    ((key, found),) = recorded(daemon.state_dir).items()
    assert key == f"ssh://{sshd.user}@{sshd.host}:{sshd.port} python3", key
    assert os.path.isabs(found) and os.access(found, os.X_OK), found

    # A wrapper recorded in its place is what the next start runs.
    used = tmp_path / "wrapper-used"
    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text(f'#!/bin/sh\necho started >> {used}\nexec {found} "$@"\n')
    wrapper.chmod(0o755)
    record(daemon.state_dir, key, str(wrapper))
    resume_and_sync(daemon, name, local, remote, "one.txt")
    assert used.read_text() == "started\n"
    pause(daemon, name)
    assert recorded(daemon.state_dir) == {key: found}  # what the wrapper ran

    # One that is gone: python3 starts the agent, and is found again.
    record(daemon.state_dir, key, str(tmp_path / "gone" / "python3"))
    resume_and_sync(daemon, name, local, remote, "two.txt")
    pause(daemon, name)
    assert recorded(daemon.state_dir) == {key: found}

    # One that is there but too old for the agent (exit 64): the same.
    old = tmp_path / "python-too-old"
    old.write_text('#!/bin/sh\necho "syncd: remote python3 is 3.6.0, 3.8 or newer is needed" >&2\nexit 64\n')
    old.chmod(0o755)
    record(daemon.state_dir, key, str(old))
    resume_and_sync(daemon, name, local, remote, "three.txt")
    assert recorded(daemon.state_dir) == {key: found}
    assert "did not start the agent" in daemon.log()
