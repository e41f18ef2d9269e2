"""Shared pytest fixtures.

Real-sshd fixtures (see ``tests/sshd.py``; tests skip when OpenSSH is not installed):

- ``sshd``: one OpenSSH server on 127.0.0.1 for the whole session.
- ``sshd_no_python``: one server for the whole session whose sessions run with a PATH
  that holds only a few basic tools, so ``python3`` is "not found" (exit 127).
- ``sshd_factory``: start throw-away servers inside one test (``start_sshd`` options);
  they are stopped when the test ends.

Tests that need a server of their own outside these fixtures use
``tests.sshd.start_sshd(tmpdir, **opts)`` directly.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.sshd import SshServer, start_sshd

__all__ = ["SshServer", "start_sshd"]


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """A real OpenSSH server on 127.0.0.1 shared by the whole test session."""
    with start_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture(scope="session")
def sshd_no_python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """A real OpenSSH server whose sessions cannot find python3 (exit 127)."""
    with start_sshd(tmp_path_factory.mktemp("sshd-nopy"), no_python=True) as server:
        yield server


@pytest.fixture
def sshd_factory(tmp_path: Path) -> Iterator[Callable[..., SshServer]]:
    """``sshd_factory(**opts) -> SshServer``: throw-away servers stopped after the test."""
    with contextlib.ExitStack() as stack:

        def factory(**opts: Any) -> SshServer:
            return stack.enter_context(start_sshd(tmp_path, **opts))

        yield factory


@pytest.fixture
def unprivileged_sshd(tmp_path: Path) -> Iterator[tuple[SshServer, Path, pwd.struct_passwd]]:
    """An sshd whose sessions run as ``nobody`` (a ForceCommand drops privileges before the
    agent starts), and a directory ``nobody`` can use. The tests run as root, which reads
    everything: on this remote, a root-owned mode-000 file is really unreadable."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the remote agent as another user")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user")
    area = Path(tempfile.mkdtemp(prefix="syncd-unpriv-", dir="/tmp"))
    try:
        os.chmod(area, 0o755)
        home = area / "home"
        home.mkdir()
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        drop = (f"import os; os.setgroups([]); os.setgid({nobody.pw_gid}); os.setuid({nobody.pw_uid}); "
                f"os.environ['HOME'] = {str(home)!r}; "
                "os.execv('/bin/sh', ['sh', '-c', os.environ.get('SSH_ORIGINAL_COMMAND', 'true')])")
        script = tmp_path / "drop-to-nobody.sh"
        script.write_text(f"#!/bin/sh\nexec python3 -c {shlex.quote(drop)}\n")
        script.chmod(0o755)
        with start_sshd(tmp_path / "sshd-nobody", force_command=str(script)) as server:
            yield server, area, nobody
    finally:
        shutil.rmtree(area, ignore_errors=True)
