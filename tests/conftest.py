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
