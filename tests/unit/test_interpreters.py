"""The state directory's record of each host's interpreter: keys, round trip, and a
record that is damaged or cannot be written (a cache: never an error)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from syncd.endpoint import parse_remote
from syncd.session import interpreters
from syncd.transport.options import AgentOptions, SshOptions


@pytest.mark.parametrize(("remote", "agent", "key"), [
    ("me@box:/w", AgentOptions(), "ssh://me@box:22 python3"),
    ("box:/w", AgentOptions(), "ssh://box:22 python3"),
    ("ssh://me@box:2222/w", AgentOptions(), "ssh://me@box:2222 python3"),
    ("box:/w", AgentOptions(ssh=SshOptions(port=2200)), "ssh://box:2200 python3"),
    ("box:/other/root", AgentOptions(python="python3.12"), "ssh://box:22 python3.12"),
    ("exec:docker exec -i box::/w", AgentOptions(), "exec:docker exec -i box python3"),
    ("local:/w", AgentOptions(), ""),
])
def test_the_key_names_the_host_as_reached_and_the_interpreter(remote: str, agent: AgentOptions, key: str) -> None:
    assert interpreters.host_key(parse_remote(remote), agent) == key


def test_what_is_remembered_is_recalled_and_a_change_replaces_it(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    assert interpreters.recall(state, "ssh://box:22 python3") is None
    interpreters.remember(state, "ssh://box:22 python3", "/usr/bin/python3")
    interpreters.remember(state, "ssh://other:22 python3", "/opt/py/bin/python3")
    interpreters.remember(state, "ssh://box:22 python3", "/usr/local/bin/python3.12")
    assert interpreters.recall(state, "ssh://box:22 python3") == "/usr/local/bin/python3.12"
    assert interpreters.recall(state, "ssh://other:22 python3") == "/opt/py/bin/python3"
    assert os.stat(os.path.join(state, interpreters.FILE_NAME)).st_mode & 0o777 == 0o600
    assert not [n for n in os.listdir(state) if n.endswith(".tmp")]


@pytest.mark.parametrize("executable", ["", "python3", "bin/python3"])
def test_only_absolute_paths_are_remembered(tmp_path: Path, executable: str) -> None:
    interpreters.remember(str(tmp_path), "ssh://box:22 python3", executable)
    assert interpreters.recall(str(tmp_path), "ssh://box:22 python3") is None


def test_a_local_endpoint_has_nothing_to_remember(tmp_path: Path) -> None:
    interpreters.remember(str(tmp_path), "", "/usr/bin/python3")
    assert not (tmp_path / interpreters.FILE_NAME).exists()
    assert interpreters.recall(str(tmp_path), "") is None


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"ssh://box:22 python3": 7}', ""])
def test_a_damaged_record_is_ignored_and_replaced(tmp_path: Path, content: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / interpreters.FILE_NAME).write_text(content)
    with caplog.at_level(logging.WARNING):
        assert interpreters.recall(str(tmp_path), "ssh://box:22 python3") is None
    interpreters.remember(str(tmp_path), "ssh://box:22 python3", "/usr/bin/python3")
    assert json.loads((tmp_path / interpreters.FILE_NAME).read_text()) == {"ssh://box:22 python3": "/usr/bin/python3"}


def test_the_most_recently_used_hosts_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(interpreters, "MAX_HOSTS", 3)
    for i in range(5):
        interpreters.remember(str(tmp_path), f"ssh://h{i}:22 python3", f"/usr/bin/python3.{i}")
    interpreters.remember(str(tmp_path), "ssh://h2:22 python3", "/usr/bin/python3")  # used again: kept
    interpreters.remember(str(tmp_path), "ssh://h5:22 python3", "/usr/bin/python3.5")
    known = json.loads((tmp_path / interpreters.FILE_NAME).read_text())
    assert list(known) == ["ssh://h4:22 python3", "ssh://h2:22 python3", "ssh://h5:22 python3"]


def test_a_state_directory_that_cannot_be_written_is_only_logged(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory\n")
    with caplog.at_level(logging.WARNING):
        interpreters.remember(str(blocked / "state"), "ssh://box:22 python3", "/usr/bin/python3")
    assert "cannot record the remote interpreter" in caplog.text
