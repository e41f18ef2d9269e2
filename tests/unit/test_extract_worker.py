"""The child process that extracts a pulled tar stream: a real subprocess fed real archives."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path

import pytest

from syncd.protocol import messages as m
from syncd.scan import Scanner
from syncd.session.extract_worker import ExtractWorker
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


def test_a_malformed_stream_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()

    async def go() -> None:
        with pytest.raises(ExtractError, match="malformed tar stream"):
            await run_worker(b"this is not a tar stream" * 100, root / ".syncd-tmp-1-x", root, NO_RULES)
        assert list(root.iterdir()) == []

    asyncio.run(go())


def test_garbage_after_good_members_stops_the_stream_with_the_childs_reason(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    data = archive_of_one(tmp_path)[:-1024] + os.urandom(8 << 20)  # the end marker replaced

    async def go() -> None:
        with pytest.raises(ExtractError, match="malformed tar stream"):
            await run_worker(data, root / ".syncd-tmp-1-x", root, NO_RULES, piece=64 * 1024)
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
        await worker.close()
        assert worker.proc.returncode is not None
        assert list(root.iterdir()) == []

    asyncio.run(go())
