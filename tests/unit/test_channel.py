"""The agent's stderr, as a channel keeps and logs it (a fake carrier: no process)."""

from __future__ import annotations

import logging

import pytest

from syncd.transport import channel as channel_mod
from syncd.transport.channel import STDERR_LINES_PER_MINUTE, Channel


class _Quiet(Channel):
    async def _read_raw(self) -> bytes:
        return b""

    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def exit_status(self, timeout: float = 2.0) -> int | None:
        return 0


def _logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "syncd.agent"]


STDERR_CASES = [
    # (case, chunks as they arrive, lines logged)
    ("one line", [b"syncd-agent: WARNING watch: root /r was deleted\n"],
     ["s1: agent: syncd-agent: WARNING watch: root /r was deleted"]),
    ("a line split across chunks", [b"syncd-agent: WAR", b"NING half", b"s\n"],
     ["s1: agent: syncd-agent: WARNING halfs"]),
    ("two lines in one chunk, blank lines skipped", [b"a\n\n  \nb\n"], ["s1: agent: a", "s1: agent: b"]),
    ("a line without its end yet", [b"a\npartial"], ["s1: agent: a"]),
    ("bytes that are not UTF-8", [b"caf\xe9\n"], ["s1: agent: caf\ufffd"]),
]


@pytest.mark.parametrize(("chunks", "expected"), [c[1:] for c in STDERR_CASES], ids=[c[0] for c in STDERR_CASES])
def test_each_line_of_the_agents_stderr_is_logged_with_the_session(
        caplog: pytest.LogCaptureFixture, chunks: list[bytes], expected: list[str]) -> None:
    ch = _Quiet()
    ch.log_stderr_as("s1")
    with caplog.at_level(logging.WARNING, logger="syncd.agent"):
        for chunk in chunks:
            ch._keep_stderr(chunk)
    assert _logged(caplog) == expected
    assert ch.stderr_tail == b"".join(chunks)  # still kept whole for start-up errors


def test_a_line_that_never_ends_is_logged_in_bounded_pieces(caplog: pytest.LogCaptureFixture) -> None:
    ch = _Quiet()
    ch.log_stderr_as("")
    with caplog.at_level(logging.WARNING, logger="syncd.agent"):
        for _ in range(10):
            ch._keep_stderr(b"x" * 1000)
    logged = _logged(caplog)
    assert logged and all(len(line) <= 4096 + len("agent: ") for line in logged)
    assert len(ch.stderr_tail) <= 8192


def test_nothing_is_logged_while_the_agent_starts(caplog: pytest.LogCaptureFixture) -> None:
    ch = _Quiet()
    with caplog.at_level(logging.WARNING, logger="syncd.agent"):
        ch._keep_stderr(b"sh: 1: python3: not found\n")  # goes into the start-up error instead
    assert _logged(caplog) == [] and ch.stderr_text() == "sh: 1: python3: not found"


def test_a_flood_is_cut_to_a_bounded_number_of_lines_per_minute(caplog: pytest.LogCaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(channel_mod.time, "monotonic", lambda: now[0])
    ch = _Quiet()
    ch.log_stderr_as("")
    with caplog.at_level(logging.WARNING, logger="syncd.agent"):
        ch._keep_stderr(b"noise\n" * (STDERR_LINES_PER_MINUTE * 3))
        assert len(_logged(caplog)) == STDERR_LINES_PER_MINUTE + 1
        assert "not logged" in _logged(caplog)[-1]
        now[0] += 61  # a new minute: logged again
        ch._keep_stderr(b"later\n")
    assert _logged(caplog)[-1] == "agent: later"
