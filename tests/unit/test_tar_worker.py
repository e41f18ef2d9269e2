"""The child processes of a resync's tar stream: real subprocesses on real trees."""

from __future__ import annotations

import asyncio
import io
import os
import time
from pathlib import Path

import pytest

from syncd.protocol import messages as m
from syncd.scan import Scanner
from syncd.session.tar_worker import ExtractWorker, ProduceWorker
from syncd.tarstream import ExtractError, TarExtractor, TarProducer

NO_RULES: dict[str, list[str]] = {}


def make_tree(root: Path, files: int = 1200) -> None:
    for i in range(files):
        sub = root / f"d{i % 7}" / f"e{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i}.txt").write_bytes(b"line %d\n" % i * (i % 50 + 1))
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "link").symlink_to("run.sh")
    (root / "build").mkdir()
    (root / "build" / "out.o").write_bytes(b"\0" * 100)


def archive(root: Path) -> bytes:
    producer = TarProducer(str(root), Scanner(str(root)).scan_all(hash_files=False))
    try:
        return b"".join(producer.chunks())
    finally:
        producer.close()


async def run_worker(data: bytes, staging: Path, root: Path, rules: dict[str, list[str]],
                     piece: int = 256 * 1024) -> tuple[ExtractWorker, list[tuple[int, int]]]:
    reports: list[tuple[int, int]] = []
    worker = await ExtractWorker.start(str(staging), str(root), rules, lambda f, b: reports.append((f, b)))
    try:
        for i in range(0, len(data), piece):
            await worker.feed(data[i:i + piece])
        await worker.finish()
    except BaseException:
        await worker.close()  # as the pull does: the staging goes
        raise
    return worker, reports


def test_stages_what_an_in_process_extractor_stages(tmp_path: Path) -> None:
    src, root = tmp_path / "src", tmp_path / "root"
    make_tree(src)
    root.mkdir()
    data = archive(src)
    reference = TarExtractor(str(tmp_path / "reference"))
    reference.extract(io.BytesIO(data))

    async def go() -> None:
        worker, reports = await run_worker(data, root / ".syncd-tmp-1-x", root, NO_RULES)
        try:
            strip = {p: (e.kind, e.mode, e.size, e.mtime_ns, e.target) for p, e in worker.entries.items()}
            assert strip == {p: (e.kind, e.mode, e.size, e.mtime_ns, e.target) for p, e in reference.entries.items()}
            assert worker.bytes == reference.bytes
            assert sum(f for f, _ in reports) == len(reference.entries)  # every member counted
            assert sum(b for _, b in reports) == reference.bytes
            assert len(reports) > 1  # reported while it ran, not only at the end
            staged = root / ".syncd-tmp-1-x"
            assert (staged / "d6" / "e1" / "f1000.txt").read_bytes() == (src / "d6" / "e1" / "f1000.txt").read_bytes()
            assert os.readlink(staged / "link") == "run.sh"
            assert worker.entries["run.sh"].mode == 0o755
        finally:
            await worker.close()
        assert not (root / ".syncd-tmp-1-x").exists()

    asyncio.run(go())


def test_staged_entries_come_back_while_the_stream_runs(tmp_path: Path) -> None:
    """A pull takes the staged entries as they come, not all after the stream; each ends
    as the staging holds it (a directory's once its metadata is set, at the end)."""
    src, root = tmp_path / "src", tmp_path / "root"
    make_tree(src, files=3000)
    root.mkdir()
    data = archive(src)
    staging = root / ".syncd-tmp-1-x"

    async def go() -> None:
        worker = await ExtractWorker.start(str(staging), str(root), NO_RULES, lambda f, b: None)
        try:
            half = len(data) // 2
            await worker.feed(data[:half])
            for _ in range(200):  # the child reports what it staged so far
                if len(worker.entries) > 500:
                    break
                await asyncio.sleep(0.01)
            midway = len(worker.entries)
            await worker.feed(data[half:])
            await worker.finish()
            assert 500 < midway < 3000
            for rel, entry in worker.entries.items():
                st = (staging / rel).lstat()
                assert (entry.ino, entry.mtime_ns) == (st.st_ino, st.st_mtime_ns), rel
        finally:
            await worker.close()

    asyncio.run(go())


def test_applies_the_roots_ignore_rules(tmp_path: Path) -> None:
    src, root = tmp_path / "src", tmp_path / "root"
    make_tree(src, files=20)
    root.mkdir()
    (root / ".gitignore").write_text("*.sh\n")  # the destination root's own .gitignore counts

    async def go() -> None:
        worker, _ = await run_worker(archive(src), root / ".syncd-tmp-1-x", root, {"ignore": ["build/"]})
        try:
            assert "build" not in worker.entries and "build/out.o" not in worker.entries
            assert "run.sh" not in worker.entries
            assert worker.entries["d0/e0/f0.txt"].kind == m.FILE
        finally:
            await worker.close()

    asyncio.run(go())


@pytest.mark.parametrize("case", ["not a tar stream", "garbage after good members"])
def test_a_malformed_stream_is_a_clear_error(tmp_path: Path, case: str) -> None:
    """Refused at once, or (the end marker replaced by garbage, fed in pieces) when the
    child stops reading and says why."""
    root = tmp_path / "root"
    root.mkdir()
    if case == "not a tar stream":
        data, piece = b"this is not a tar stream" * 100, 256 * 1024
    else:
        data, piece = archive_of_one(tmp_path)[:-1024] + os.urandom(8 << 20), 64 * 1024

    async def go() -> None:
        with pytest.raises(ExtractError, match="malformed tar stream"):
            await run_worker(data, root / ".syncd-tmp-1-x", root, NO_RULES, piece=piece)
        assert list(root.iterdir()) == []

    asyncio.run(go())


def test_an_unusable_staging_directory_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()

    async def go() -> None:
        with pytest.raises(ExtractError, match="No such file"):
            await run_worker(archive_of_one(tmp_path), root / "missing" / ".syncd-tmp-1-x", root, NO_RULES)

    asyncio.run(go())


def archive_of_one(tmp_path: Path) -> bytes:
    src = tmp_path / "one"
    src.mkdir()
    (src / "f").write_text("x")
    return archive(src)


def test_close_mid_stream_stops_the_child_and_removes_the_staging(tmp_path: Path) -> None:
    src, root = tmp_path / "src", tmp_path / "root"
    make_tree(src)
    root.mkdir()
    data = archive(src)

    async def go() -> None:
        worker = await ExtractWorker.start(str(root / ".syncd-tmp-1-x"), str(root), NO_RULES, lambda f, b: None)
        await worker.feed(data[: len(data) // 2])
        await asyncio.wait_for(worker.close(), 20)
        assert worker.proc.returncode is not None
        assert list(root.iterdir()) == []

    asyncio.run(go())


async def produce(root: Path, rules: dict[str, list[str]]) -> tuple[ProduceWorker, tuple[int, int], bytes,
                                                                  list[tuple[int, int]]]:
    reports: list[tuple[int, int]] = []
    worker = await ProduceWorker.start(str(root), rules, lambda f, b: reports.append((f, b)))
    try:
        totals = await worker.announced()
        data = b"".join([chunk async for chunk in worker.chunks()])
        await worker.finish()
    finally:
        await worker.close()
    return worker, totals, data, reports


def _read_to_end(fd: int) -> bytes:
    parts = []
    while data := os.read(fd, 1 << 16):
        parts.append(data)
    return b"".join(parts)


def test_the_archiving_child_streams_only_once_told_to_go_and_the_lead_first(tmp_path: Path) -> None:
    """Handed to another process (take_stream), the stream stays empty after the listing
    until ``go``; then the lead comes first and the archive right after it. A second
    ``go`` changes nothing."""
    src = tmp_path / "src"
    make_tree(src, 60)
    expected = archive(src)

    async def go() -> bytes:
        worker = await ProduceWorker.start(str(src), NO_RULES, lambda f, b: None)
        fd = worker.take_stream()
        try:
            await worker.announced()
            await asyncio.sleep(0.3)
            os.set_blocking(fd, False)
            with pytest.raises(BlockingIOError):
                os.read(fd, 1)  # listed, and waiting
            os.set_blocking(fd, True)
            worker.go(b"cue\n")
            worker.go(b"another lead\n")
            data = await asyncio.to_thread(_read_to_end, fd)
            await worker.finish()
            return data
        finally:
            os.close(fd)
            await worker.close()

    assert asyncio.run(go()) == b"cue\n" + expected


def test_produces_the_archive_an_in_process_producer_makes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    reference = TarProducer(str(src), Scanner(str(src)).scan_all(hash_files=False), hash_files=False)
    expected = b"".join(reference.chunks())
    reference.close()

    async def go() -> None:
        worker, totals, data, reports = await produce(src, NO_RULES)
        assert data == expected  # byte for byte
        files = [e for e in reference.sent if e.kind == m.FILE]
        assert totals == (len(reference.sent), sum(e.size for e in files))
        assert sorted(worker.entries.values(), key=lambda e: e.path) == sorted(reference.sent, key=lambda e: e.path)
        assert all(worker.entries[e.path].digest is None for e in files)  # recorded later, by the session
        assert sum(f for f, _ in reports) == len(reference.sent) and len(reports) > 1
        assert worker.skipped == []

    asyncio.run(go())


def test_archived_files_come_back_while_the_stream_runs(tmp_path: Path) -> None:
    """A push shares the entries as the files go, not after the stream: the daemon can
    take each archived entry (once) before the archive ends."""
    src = tmp_path / "src"
    make_tree(src, files=3000)

    async def go() -> None:
        counted: list[int] = []
        worker = await ProduceWorker.start(str(src), NO_RULES, lambda f, b: counted.append(f))
        taken: list[m.Entry] = []
        after_first_chunk = -1
        chunks = 0
        try:
            await worker.announced()
            async for _chunk in worker.chunks():
                chunks += 1
                await asyncio.sleep(0.01)  # let the reports in
                taken.extend(worker.take_sent())
                if after_first_chunk < 0:
                    after_first_chunk = len(taken)
            await worker.finish()
            taken.extend(worker.take_sent())
        finally:
            await worker.close()
        assert chunks > 2 and 0 < after_first_chunk < len(worker.entries)
        assert len(worker.entries) == sum(counted)
        assert sorted(e.path for e in taken) == sorted(worker.entries)  # each once
        assert all(e == worker.entries[e.path] for e in taken)
        assert worker.take_sent() == []

    asyncio.run(go())


def test_take_sent_waits_for_enough_of_them(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, files=20)

    async def go() -> None:
        worker, _totals, _data, _reports = await produce(src, NO_RULES)
        assert worker.take_sent(1000) == []  # fewer than asked: kept for later
        assert len(worker.take_sent(1)) == len(worker.entries)

    asyncio.run(go())


def test_produce_lists_under_the_roots_rules_and_reports_special_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, files=10)
    (src / ".gitignore").write_text("*.sh\n")
    (src / "d1" / ".gitignore").write_text("e2/\n")  # nested: it counts below d1 only
    (src / ".git" / "info").mkdir(parents=True)
    (src / ".git" / "info" / "exclude").write_text("/d2/e2/\n")
    os.mkfifo(src / "pipe")

    async def go() -> None:
        worker, (files, _), data, _ = await produce(src, {"ignore": ["build/"]})
        paths = set(worker.entries)
        assert "run.sh" not in paths and "build" not in paths and "build/out.o" not in paths
        assert ".gitignore" in paths and "d0/e0/f0.txt" in paths
        assert "d1/.gitignore" in paths and "d1/e1/f1.txt" in paths and "d5/e2/f5.txt" in paths
        assert not [p for p in paths if p.startswith(("d1/e2", "d2/e2"))], sorted(paths)
        assert "d2/e0/f9.txt" in paths and ".git/info/exclude" in paths
        assert files == len(paths)
        assert [(s.path, s.reason) for s in worker.skipped] == [("pipe", "special")]
        extractor = TarExtractor(str(tmp_path / "out"))
        extractor.extract(io.BytesIO(data))
        assert set(extractor.entries) == paths

    asyncio.run(go())


def test_produce_of_a_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    async def go() -> None:
        worker = await ProduceWorker.start(str(tmp_path / "gone"), NO_RULES, lambda f, b: None)
        try:
            with pytest.raises(ExtractError, match="No such file|gone"):
                await worker.announced()
        finally:
            await worker.close()

    asyncio.run(go())


def test_closing_a_producer_mid_stream_stops_it(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    (src / "big.bin").write_bytes(os.urandom(8 << 20))  # more than the pipes hold

    async def go() -> None:
        worker = await ProduceWorker.start(str(src), NO_RULES, lambda f, b: None)
        await worker.announced()
        async for _ in worker.chunks():
            break  # the daemon stops reading (a pause, a lost link)
        await asyncio.sleep(1.0)  # the pipe and the reader's buffer fill up meanwhile
        await asyncio.wait_for(worker.close(), 20)
        assert worker.proc.returncode is not None

    asyncio.run(go())


def test_the_agents_input_pipe_is_large_only_while_a_stream_arrives(tmp_path: Path) -> None:
    """Large pipes count against a per-user limit: the agent sizes them up for a stream only."""
    import fcntl
    import threading

    from syncd.agent.main import Agent
    from syncd.protocol.codec import Connection

    get_size = getattr(fcntl, "F_GETPIPE_SZ", 1032)
    src, root = tmp_path / "src", tmp_path / "root"
    make_tree(src, files=30)
    root.mkdir()
    to_agent_r, to_agent_w = os.pipe()
    from_agent_r, from_agent_w = os.pipe()
    agent = Agent(to_agent_r, from_agent_w)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    daemon = Connection("test")
    replies: list[object] = []

    def send(message: object) -> None:
        os.write(to_agent_w, daemon.send(message))

    def wait_for(kind: type) -> object:
        while not any(isinstance(r, kind) for r in replies):
            replies.extend(daemon.receive_data(os.read(from_agent_r, 1 << 20)))
        return next(r for r in replies if isinstance(r, kind))

    try:
        os.write(to_agent_w, daemon.initiate())
        send(m.Open(1, str(root), {}, False, False))
        wait_for(m.Opened)
        assert fcntl.fcntl(to_agent_r, get_size) == 1 << 16
        send(m.TarReceive(2, "", False))
        send(m.TarData(2, archive(src)))
        deadline = time.monotonic() + 10
        while fcntl.fcntl(to_agent_r, get_size) != 1 << 20:
            assert time.monotonic() < deadline, "the pipe was not made larger for the stream"
        send(m.TarEnd(2, ()))
        result = wait_for(m.TarResult)
        assert isinstance(result, m.TarResult) and result.done
        assert fcntl.fcntl(to_agent_r, get_size) == 1 << 16
        assert (root / "run.sh").exists()
    finally:
        os.write(to_agent_w, daemon.send(m.Bye()))
        thread.join(10)
        for fd in (to_agent_r, to_agent_w, from_agent_r, from_agent_w):
            os.close(fd)
