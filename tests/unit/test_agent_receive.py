"""The agent's receiving end of a push: GNU tar where the host has it, syncd's own
extractor otherwise; both must stage and place exactly the same tree."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.agent import gnu_tar
from syncd.agent.main import Agent
from syncd.agent.tar_jobs import Receive
from syncd.fsops import Root, write_all
from syncd.protocol import messages as m
from syncd.protocol.codec import Connection
from syncd.rules import Rules
from syncd.scan import Scanner
from syncd.tarstream import SPECIAL, ExtractError, scan_staged, staging_name
from tests.unit.test_tarstream import archive, make_tree, snapshot

HAVE_GNU_TAR = gnu_tar.find_gnu_tar() is not None
UNPACKERS = [
    pytest.param("gnu-tar", marks=pytest.mark.skipif(not HAVE_GNU_TAR, reason="GNU tar not installed")),
    "python",
]


@pytest.fixture(params=UNPACKERS)
def unpacker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "python":
        monkeypatch.setattr(gnu_tar, "_found", None)
    yield request.param


def receive(dest: Path, data: bytes, rules: Rules | None = None,
            msg: m.TarReceive | None = None) -> tuple[list[m.Entry], list[m.Skip], int]:
    root = Root(str(dest))
    is_ignored = rules.is_ignored if rules is not None else None
    scanner = Scanner(str(dest), is_ignored)
    try:
        job = Receive(root, scanner, msg or m.TarReceive(1, "", False))
        for i in range(0, len(data), 100_000):  # in pieces, as TarData arrives
            job.feed(data[i:i + 100_000])
        entries, kept, skipped, deleted = job.finish(())
        return entries + kept, skipped, deleted
    finally:
        root.close()


def on_disk(dest: Path, entries: list[m.Entry]) -> None:
    """Every reported entry is what the destination holds (the base is built from them)."""
    for e in entries:
        st = os.lstat(dest / e.path)
        assert st.st_ino == e.ino, e.path
        assert stat.S_IMODE(st.st_mode) == e.mode, e.path
        if e.kind != m.DIR:
            assert st.st_mtime_ns == e.mtime_ns, e.path
        if e.kind == m.FILE:
            assert st.st_size == e.size, e.path


def test_a_push_lands_whole_and_reports_what_is_on_disk(tmp_path: Path, unpacker: str) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src)
    dest.mkdir()
    (dest / "stale.txt").write_text("not in the source\n")
    (dest / "src").mkdir()
    (dest / "src" / "main.py").write_text("older\n")
    data, producer = archive(src)
    placed, skipped, deleted = receive(dest, data)
    assert snapshot(dest) == snapshot(src)
    assert deleted == 1 and skipped == []
    assert sorted(e.path for e in placed) == sorted(e.path for e in producer.sent)
    on_disk(dest, placed)
    assert not [n for n in os.listdir(dest) if n.startswith(".syncd-tmp")]


def test_both_unpackers_stage_the_same_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not HAVE_GNU_TAR:
        pytest.skip("GNU tar not installed")
    src = tmp_path / "src"
    make_tree(src)
    data, _ = archive(src)
    results = {}
    for name in ("gnu-tar", "python"):
        if name == "python":
            monkeypatch.setattr(gnu_tar, "_found", None)
        dest = tmp_path / name
        dest.mkdir()
        placed, _, _ = receive(dest, data)
        results[name] = sorted(e._replace(ino=0) for e in placed)
    assert results["gnu-tar"] == results["python"]


def test_entries_the_root_ignores_are_not_placed(tmp_path: Path, unpacker: str) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    (src / "keep").mkdir(parents=True)
    (src / "keep" / "a.txt").write_text("a")
    (src / "keep" / "a.log").write_text("log")
    (src / "build").mkdir()
    (src / "build" / "out.o").write_text("o")
    dest.mkdir()
    data, _ = archive(src)
    placed, _, _ = receive(dest, data, Rules(["*.log", "build/"]))
    assert sorted(e.path for e in placed) == ["keep", "keep/a.txt"]
    assert sorted(os.listdir(dest)) == ["keep"]
    assert os.listdir(dest / "keep") == ["a.txt"]
    on_disk(dest, placed)


def test_an_upload_replaces_its_target_directory(tmp_path: Path, unpacker: str) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src)
    (dest / "skills" / "old").mkdir(parents=True)
    data, _ = archive(src)
    receive(dest, data, msg=m.TarReceive(1, "skills", False))
    assert snapshot(dest / "skills") == snapshot(src)


def test_a_damaged_stream_fails_and_leaves_the_root_as_it_was(tmp_path: Path, unpacker: str) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src)
    dest.mkdir()
    (dest / "mine.txt").write_text("stays\n")
    data, _ = archive(src)
    damaged = data[:1024] + b"\x07" * 512 + data[1536:]  # the second member's header
    with pytest.raises(ExtractError):
        receive(dest, damaged)
    assert sorted(os.listdir(dest)) == ["mine.txt"]


def test_an_aborted_stream_leaves_no_staging_area(tmp_path: Path, unpacker: str) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src)
    dest.mkdir()
    data, _ = archive(src)
    root = Root(str(dest))
    try:
        job = Receive(root, Scanner(str(dest)), m.TarReceive(1, "", False))
        job.feed(data[: len(data) // 2])
        job.abort()
    finally:
        root.close()
    assert os.listdir(dest) == []


# ---- scan_staged: what GNU tar left, as TarExtractor would have staged it ----------------

STAGED_CASES = [
    # (name, ignored patterns, paths made, paths expected to stay)
    ("plain", [], ["a.txt", "d/", "d/b.txt"], ["a.txt", "d", "d/b.txt"]),
    ("ignored file", ["*.log"], ["d/", "d/x.log", "d/y.txt"], ["d", "d/y.txt"]),
    ("ignored directory", ["node_modules/"], ["node_modules/", "node_modules/p/", "node_modules/p/i.js", "m.js"],
     ["m.js"]),
    ("nested ignore keeps siblings", ["d/e/"], ["d/", "d/e/", "d/e/f", "d/g"], ["d", "d/g"]),
]


@pytest.mark.parametrize(("patterns", "made", "stays"), [c[1:] for c in STAGED_CASES], ids=[c[0] for c in STAGED_CASES])
def test_scan_staged_lists_and_prunes(tmp_path: Path, patterns: list[str], made: list[str], stays: list[str]) -> None:
    staging = tmp_path / staging_name("t")
    staging.mkdir()
    for rel in made:
        if rel.endswith("/"):
            (staging / rel).mkdir()
        else:
            (staging / rel).write_text(rel)
    stamps = {}
    for rel in sorted(made, reverse=True):  # as tar sets directory times last
        os.utime(staging / rel, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000 + len(rel)))
        stamps[rel.rstrip("/")] = 1_500_000_000_000_000_000 + len(rel)
    entries, skipped = scan_staged(str(staging), Rules(patterns).is_ignored)
    assert sorted(entries) == sorted(stays) and skipped == []
    for rel, entry in entries.items():
        assert entry.mtime_ns == stamps[rel] == os.lstat(staging / rel).st_mtime_ns, rel
    assert sorted(str(p.relative_to(staging)) for p in staging.rglob("*")) == sorted(stays)


def test_scan_staged_removes_special_files_with_a_reason(tmp_path: Path) -> None:
    staging = tmp_path / "s"
    (staging / "d").mkdir(parents=True)
    os.mkfifo(staging / "d" / "fifo")
    (staging / "d" / "ok").write_text("ok")
    (staging / "link").symlink_to("d/ok")
    entries, skipped = scan_staged(str(staging))
    assert sorted(entries) == ["d", "d/ok", "link"]
    assert entries["link"].kind == m.SYMLINK and entries["link"].target == "d/ok"
    assert [(s.path, s.reason) for s in skipped] == [("d/fifo", SPECIAL)]
    assert not (staging / "d" / "fifo").exists()


def test_without_gnu_tar_on_the_path_the_agent_unpacks_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "tar"
    fake.write_text("#!/bin/sh\necho 'tar (busybox) 1.36'\n")
    fake.chmod(0o755)
    monkeypatch.setattr(gnu_tar, "_found", gnu_tar._unset)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert gnu_tar.find_gnu_tar() is None
    monkeypatch.setattr(gnu_tar, "_found", gnu_tar._unset)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert gnu_tar.find_gnu_tar() is None


def test_the_agent_says_a_push_is_in_place_before_it_lists_what_it_placed(tmp_path: Path, unpacker: str) -> None:
    """TarPlaced (the summary, and the directories kept) comes first, the TarResult chunks
    listing the entries placed after it: the daemon answers whoever waits on the former."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src)
    dest.mkdir()
    (dest / "gone" / "node_modules").mkdir(parents=True)  # kept: it holds an ignored entry
    (dest / "gone" / "node_modules" / "x.js").write_text("ignored\n")
    (dest / "stale.txt").write_text("deleted\n")
    data, producer = archive(src)
    messages: list[object] = [m.Open(1, str(dest), Rules(["node_modules/"]).to_wire(), False, False),
                              m.TarReceive(2, "", False)]
    messages += [m.TarData(2, data[i:i + 100_000]) for i in range(0, len(data), 100_000)]
    replies, status = converse(messages + [m.TarEnd(2, ()), m.Bye()])
    assert status == 0
    stream = [r for r in replies if getattr(r, "req", None) == 2]
    placed, *listing = stream
    assert isinstance(placed, m.TarPlaced), stream
    assert (placed.skipped, placed.deleted) == ((), 1)
    assert [e.path for e in placed.kept] == ["gone"]
    assert listing and all(isinstance(r, m.TarResult) and not r.skipped for r in listing), listing
    assert isinstance(listing[-1], m.TarResult) and listing[-1].done
    entries = [e for r in listing if isinstance(r, m.TarResult) for e in r.entries]
    assert sorted(e.path for e in entries) == sorted(e.path for e in producer.sent)
    on_disk(dest, entries)


def converse(messages: list[object]) -> tuple[list[object], int]:
    """Run a real Agent over pipes, send it ``messages`` after the handshake, and return
    what it answered and its exit status."""
    to_agent, agent_in = os.pipe()
    agent_out, from_agent = os.pipe()
    agent = Agent(to_agent, from_agent)
    replies: list[object] = []
    status: list[int] = []
    daemon = Connection("syncd test", ())

    def serve() -> None:
        status.append(agent.run())
        os.close(from_agent)

    def read() -> None:
        while chunk := os.read(agent_out, 1 << 16):
            replies.extend(daemon.receive_data(chunk))

    threads = [threading.Thread(target=serve), threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    try:
        write_all(agent_in, daemon.initiate())
        for message in messages:
            write_all(agent_in, daemon.send(message))
    except BrokenPipeError:
        pass  # the agent gave up: its answer says why
    finally:
        os.close(agent_in)
        for thread in threads:
            thread.join(30)
        os.close(agent_out)
    return replies, status[0]


def test_an_entry_block_that_is_not_one_is_a_protocol_error(tmp_path: Path) -> None:
    replies, status = converse([m.Open(1, str(tmp_path), Rules().to_wire(), False, False),
                                m.TarReceive(2, "", False, direct=True),
                                m.TarDigests(2, b"\x05\x00\x00\x00 not a block")])
    assert status == 2
    fatal = replies[-1]
    assert isinstance(fatal, m.Fatal) and "TarDigests" in fatal.message, replies
    assert not [n for n in os.listdir(tmp_path) if not n.startswith(".syncd-tmp")]
