"""Smoke tests for the real-sshd fixtures in tests/conftest.py."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable

import asyncssh
import pytest

from tests.sshd import NO_PYTHON_TOOLS, SshServer


def ssh(server: SshServer, command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*server.ssh_argv(), command],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_ssh_true(sshd: SshServer) -> None:
    result = ssh(sshd, "true")
    assert result.returncode == 0, result.stderr + sshd.log_text()


def test_remote_python3(sshd: SshServer) -> None:
    result = ssh(sshd, 'python3 -c "print(1)"')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


def test_ssh_config_alias(sshd: SshServer) -> None:
    result = subprocess.run(
        ["ssh", "-F", str(sshd.ssh_config), "syncd-test", "echo alias-ok"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "alias-ok"


def test_url(sshd: SshServer) -> None:
    assert sshd.url("/srv/work") == f"ssh://{sshd.user}@127.0.0.1:{sshd.port}/srv/work"


def test_no_python_exit_127(sshd_no_python: SshServer) -> None:
    result = ssh(sshd_no_python, 'python3 -c "print(1)"')
    assert result.returncode == 127, (result.returncode, result.stdout, result.stderr)


def test_no_python_path_has_only_basic_tools(sshd_no_python: SshServer) -> None:
    result = ssh(sshd_no_python, 'echo "$PATH"; ls "$PATH"')
    assert result.returncode == 0, result.stderr
    path, *tools = result.stdout.split()
    entries = path.split(":")
    assert "/usr/bin" not in entries and "/bin" not in entries
    assert sorted(tools) == sorted(NO_PYTHON_TOOLS)
    # The basic tools do work.
    result = ssh(sshd_no_python, "printf x | sha256sum | head -c 8; echo; uname -s")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2d711642", "Linux"]


def test_asyncssh_connects(sshd: SshServer) -> None:
    async def run() -> str:
        async with asyncssh.connect(
            sshd.host,
            port=sshd.port,
            username=sshd.user,
            client_keys=[str(sshd.client_key)],
            known_hosts=str(sshd.known_hosts),
        ) as conn:
            result = await conn.run("echo hi", check=True)
            return str(result.stdout)

    assert asyncio.run(run()).strip() == "hi"


def test_changed_host_key_is_rejected(
    sshd: SshServer, sshd_factory: Callable[..., SshServer]
) -> None:
    # A second server with its own host key, checked against known_hosts that
    # pins a different key for the same [host]:port.
    other = sshd_factory(client_key=sshd.client_key)
    other.known_hosts.write_text(
        f"[{other.host}]:{other.port} " + sshd.known_hosts_line().split(" ", 1)[1] + "\n"
    )
    result = ssh(other, "true")
    assert result.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in result.stderr

    async def connect() -> None:
        async with asyncssh.connect(
            other.host,
            port=other.port,
            username=other.user,
            client_keys=[str(other.client_key)],
            known_hosts=str(other.known_hosts),
        ):
            pass

    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        asyncio.run(connect())
