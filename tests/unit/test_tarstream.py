"""Tar streams: producing from a tree, extracting safely into staging, mirroring into a root."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from syncd import tarformat
from syncd.fsops import Root
from syncd.protocol import messages as m
from syncd.scan import Scanner, digest_bytes, is_temp_name
from syncd.tarformat import parse_mtime, pax_mtime
from syncd.tarstream import (
    CHANGED,
    EXISTS,
    SPECIAL,
    UNREADABLE,
    UNSAFE,
    VANISHED,
    ChunkReader,
    ExtractError,
    TarExtractor,
    TarProducer,
    merge_in,
    mirror,
    path_key,
    staging_name,
    unstage,
    walk_following,
)

NON_UTF8 = os.fsdecode(b"caf\xe9.txt")
LONG = "/".join(["d" * 40] * 3) + "/" + "f" * 60  # over 100 bytes: needs a pax path


def make_tree(root: Path) -> None:
    (root / "src").mkdir(parents=True)
    (root / "src" / "main.py").write_text("print('hi')\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "empty").mkdir()
    (root / "link").symlink_to("src/main.py")
    (root / "dangling").symlink_to("../nowhere")
    (root / NON_UTF8).write_bytes(b"\xe9")
    long_path = root / LONG
    long_path.parent.mkdir(parents=True)
    long_path.write_bytes(b"x" * 5000)
    (root / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "hard1").write_text("same inode\n")
    os.link(root / "hard1", root / "hard2")
    os.utime(root / "src" / "main.py", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    (root / "ro").mkdir()
    (root / "ro" / "f").write_text("in a read-only dir\n")
    (root / "ro").chmod(0o555)


def archive(root: Path, **kwargs: object) -> tuple[bytes, TarProducer]:
    producer = TarProducer(str(root), Scanner(str(root)).scan_all(hash_files=False), **kwargs)  # type: ignore[arg-type]
    try:
        return b"".join(producer.chunks()), producer
    finally:
        producer.close()


def extract(data: bytes, dest: Path, **kwargs: object) -> TarExtractor:
    ex = TarExtractor(str(dest / staging_name("t")), **kwargs)  # type: ignore[arg-type]
    ex.extract(io.BytesIO(data))  # type: ignore[arg-type]
    return ex


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """path -> (kind, mode, content or target, mtime_ns for files)."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            if is_temp_name(rel):
                continue
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), full.read_bytes(), st.st_mtime_ns)
    return out


def mirror_into(dest: Path, ex: TarExtractor, keep: Callable[[str, int], bool] = lambda p, k: False,
                leave: tuple[str, ...] = ()) -> object:
    root = Root(str(dest))
    try:
        existing = Scanner(str(dest)).scan_all(hash_files=False)
        staging_rel = os.path.basename(ex.staging)
        return mirror(root, staging_rel, ex.entries, existing, keep, leave)
    finally:
        root.close()
        ex.close()


def test_round_trip_keeps_content_modes_mtimes_links_and_odd_names(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src)
    dest.mkdir()
    data, producer = archive(src)
    assert producer.skipped == []
    ex = extract(data, dest)
    assert ex.skipped == []
    result = mirror_into(dest, ex)
    assert snapshot(dest) == snapshot(src)
    assert (dest / "hard1").stat().st_ino == (dest / "hard2").stat().st_ino
    assert (dest / "src" / "main.py").stat().st_mtime_ns == 1_600_000_000_123_456_789
    assert not [p for p in os.listdir(dest) if is_temp_name(p)], "the staging directory is gone"
    # Every file the producer sent carries a digest for the base index.
    assert all(e.digest for e in producer.sent if e.kind == m.FILE)
    assert {e.path for e in result.entries} == {e.path for e in producer.sent}  # type: ignore[attr-defined]


@pytest.mark.parametrize("hash_files", [True, False])
def test_a_producer_hashes_what_it_archives_unless_told_not_to(tmp_path: Path, hash_files: bool) -> None:
    """The agent's producer hashes (a channel pull sends the digests with the entries);
    the daemon's does not (the session records them once the tree is in place). The
    extractor never does. Hard links carry their first name's digest."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src)
    dest.mkdir()
    data, producer = archive(src, hash_files=hash_files)
    sent = {e.path: e.digest for e in producer.sent if e.kind == m.FILE}
    expected = {rel: digest_bytes((src / rel).read_bytes()) if hash_files else None for rel in sent}
    assert sent == expected
    ex = extract(data, dest)
    assert {p: e.digest for p, e in ex.entries.items() if e.kind == m.FILE} == dict.fromkeys(sent)
    ex.close()


def test_empty_tree_round_trip_and_mirror_removes_everything_synced(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    make_tree(dest)
    data, producer = archive(src)
    assert producer.sent == [] and len(data) == 1024
    result = mirror_into(dest, extract(data, dest))
    assert snapshot(dest) == {}
    assert result.deleted > 10  # type: ignore[attr-defined]


@pytest.mark.parametrize("tar_args", [["."], ["src", "run.sh", "empty", "link"]], ids=["dot-entry", "no-dot-entry"])
def test_archives_from_system_tar_with_and_without_a_root_entry(tmp_path: Path, tar_args: list[str]) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src)
    (src / "ro").chmod(0o755)
    dest.mkdir()
    dest.chmod(0o751)
    data = subprocess.run(["tar", "-C", str(src), "-cf", "-", *tar_args], check=True, capture_output=True).stdout
    ex = extract(data, dest)
    staging_mode = stat.S_IMODE(os.stat(ex.staging).st_mode)
    assert staging_mode == 0o700, "the archive's own root entry must not touch the directory extracted into"
    mirror_into(dest, ex)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o751
    assert (dest / "src" / "main.py").read_text() == "print('hi')\n"
    assert os.readlink(dest / "link") == "src/main.py"
    assert (dest / "run.sh").stat().st_mode & 0o111


def _tar_with(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return out.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o644
    return info


HOSTILE = [
    ("dotdot", [(_info("../escaped"), b"x")]),
    ("dotdot-inside", [(_info("a/../../escaped"), b"x")]),
    ("absolute", [(_info("/tmp/escaped-abs"), b"x")]),
    ("through-symlink", [(_info("out", tarfile.SYMTYPE, ".."), b""), (_info("out/escaped"), b"x")]),
    ("hardlink-outside", [(_info("h", tarfile.LNKTYPE, "../outside.txt"), b"")]),
    ("hardlink-to-symlink", [(_info("s", tarfile.SYMTYPE, "../outside.txt"), b""),
                             (_info("h", tarfile.LNKTYPE, "s"), b"")]),
]


@pytest.mark.parametrize("members", [c[1] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_member_names_are_skipped_and_nothing_lands_outside(
        tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (tmp_path / "outside.txt").write_text("untouched")
    before = snapshot(tmp_path)
    ex = extract(_tar_with(members), dest)
    assert any(s.reason == UNSAFE for s in ex.skipped)
    mirror_into(dest, ex)
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("dest/")} == \
        {k: v for k, v in before.items() if not k.startswith("dest/")}
    assert not (tmp_path / "escaped").exists()
    assert (tmp_path / "outside.txt").read_text() == "untouched"


def test_special_files_are_skipped_with_a_reason(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    os.mkfifo(src / "fifo")
    (src / "f").write_text("ok")
    data = subprocess.run(["tar", "-C", str(src), "-cf", "-", "fifo", "f"], check=True, capture_output=True).stdout
    ex = extract(data, dest)
    assert [(s.path, s.reason) for s in ex.skipped] == [("fifo", SPECIAL)]
    scanner = Scanner(str(src))
    scanner.scan_all(hash_files=False)
    assert [p for p, _ in scanner.skipped] == ["fifo"]
    ex.close()


def test_a_file_changing_while_archived_is_reported_not_trusted(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "growing").write_bytes(b"a" * (3 * 1024 * 1024))
    (src / "stable").write_text("stable")
    producer = TarProducer(str(src), Scanner(str(src)).scan_all(hash_files=False))
    pieces = []
    for i, chunk in enumerate(producer.chunks()):
        pieces.append(chunk)
        if i == 0:
            with open(src / "growing", "ab") as fh:
                fh.write(b"more")
    producer.close()
    assert [(s.path, s.reason) for s in producer.skipped] == [("growing", CHANGED)]
    assert [e.path for e in producer.sent] == ["stable"]
    # The stream is still well formed: the slot was filled with the announced size.
    ex = extract(b"".join(pieces), tmp_path)
    assert set(ex.entries) == {"growing", "stable"}
    ex.close()


def _archive_with_a_file_changing(src: Path) -> tuple[bytes, TarProducer]:
    """src/d/growing grows while it is archived: the producer reports it untrusted."""
    (src / "d" / "sub").mkdir(parents=True)
    (src / "d" / "growing").write_bytes(b"a" * (3 * 1024 * 1024))
    (src / "d" / "sub" / "stable").write_text("stable")
    producer = TarProducer(str(src), Scanner(str(src)).scan_all(hash_files=False))
    pieces = []
    for i, chunk in enumerate(producer.chunks()):
        pieces.append(chunk)
        if i == 0:
            with open(src / "d" / "growing", "ab") as fh:
                fh.write(b"more")
    producer.close()
    assert [(s.path, s.reason) for s in producer.skipped] == [("d/growing", CHANGED)]
    return b"".join(pieces), producer


@pytest.mark.parametrize("place", ["mirror", "merge"])
def test_an_untrusted_file_inside_a_directory_moved_in_whole_does_not_land(tmp_path: Path, place: str) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    dest.mkdir()
    data, producer = _archive_with_a_file_changing(src)
    ex = extract(data, dest)
    staged_d = ex.entries["d"]
    staging_rel = os.path.basename(ex.staging)
    root = Root(str(dest))
    try:
        unstage(root, staging_rel, ex.entries, [s.path for s in producer.skipped])
        if place == "mirror":
            result = mirror(root, staging_rel, ex.entries, [], lambda p, k: False)
        else:
            result = merge_in(root, staging_rel, ex.entries)
    finally:
        root.close()
        ex.close()
    # "d" moved in whole: the half-read file must not come with it, unrecorded (the next
    # cycle would take it for the destination's own file and let it win).
    assert not (dest / "d" / "growing").exists()
    assert (dest / "d" / "sub" / "stable").read_text() == "stable"
    assert {e.path for e in result.entries} == {"d", "d/sub", "d/sub/stable"}
    # Every directory reported is what the root holds, and "d" kept the archived mtime.
    for entry in result.entries:
        st = (dest / entry.path).lstat()
        assert (st.st_ino, st.st_mtime_ns) == (entry.ino, entry.mtime_ns), entry.path
    assert (dest / "d").lstat().st_mtime_ns == staged_d.mtime_ns == (src / "d").lstat().st_mtime_ns


def test_vanished_and_unreadable_files_are_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("gone", "locked", "fine"):
        (src / name).write_text(name)
    entries = Scanner(str(src)).scan_all(hash_files=False)
    (src / "gone").unlink()
    producer = TarProducer(str(src), entries)
    real_open = producer._open

    def deny(rel: str) -> int:
        if rel == "locked":
            raise PermissionError(13, "Permission denied")
        return real_open(rel)

    monkeypatch.setattr(producer, "_open", deny)
    b"".join(producer.chunks())
    producer.close()
    assert sorted((s.path, s.reason) for s in producer.skipped) == [("gone", VANISHED), ("locked", UNREADABLE)]
    assert [e.path for e in producer.sent] == ["fine"]


def test_mirror_keeps_preserved_and_left_entries_and_their_directories(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    (src / "app").mkdir(parents=True)
    (src / "app" / "main.py").write_text("new")
    (dest / "app" / "cfg").mkdir(parents=True)
    (dest / "app" / "main.py").write_text("old")
    (dest / "app" / "cfg" / ".env").write_text("secret")
    (dest / "app" / "cfg" / "other").write_text("synced, goes")
    (dest / "stale").mkdir()
    (dest / "stale" / "x").write_text("goes")
    (dest / "unreadable-on-source").write_text("stays")
    data, _ = archive(src)
    result = mirror_into(dest, extract(data, dest), keep=lambda p, k: p.endswith(".env"),
                         leave=("unreadable-on-source",))
    assert snapshot(dest).keys() == {"app", "app/main.py", "app/cfg", "app/cfg/.env", "unreadable-on-source"}
    assert (dest / "app" / "main.py").read_text() == "new"
    assert result.deleted == 3  # type: ignore[attr-defined]


def _dir_with_file(p: Path) -> None:
    (p / "x").mkdir()
    (p / "x" / "in").write_text("")


TYPE_CHANGES = [
    # (source builder, destination builder, expected snapshot kind at "x")
    ("file-over-dir", lambda p: (p / "x").write_text("file"), _dir_with_file, "file"),
    ("dir-over-file", _dir_with_file, lambda p: (p / "x").write_text("f"), "dir"),
    ("link-over-dir", lambda p: (p / "x").symlink_to("t"), lambda p: (p / "x").mkdir(), "link"),
    ("dir-over-link", lambda p: (p / "x").mkdir(), lambda p: (p / "x").symlink_to("t"), "dir"),
]


@pytest.mark.parametrize(("build_src", "build_dest", "kind"), [c[1:] for c in TYPE_CHANGES],
                         ids=[c[0] for c in TYPE_CHANGES])
def test_mirror_handles_type_changes(tmp_path: Path, build_src: Callable[[Path], object],
                                     build_dest: Callable[[Path], object], kind: str) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    build_src(src)
    build_dest(dest)
    data, _ = archive(src)
    mirror_into(dest, extract(data, dest))
    assert snapshot(dest) == snapshot(src)
    assert snapshot(dest)["x"][0] == kind


def test_mirror_over_a_full_tree_puts_every_file_in_its_own_place(tmp_path: Path) -> None:
    """Files replace files one rename each, keeping the directory descriptors they walked
    through; a directory moving in whole, or one removed for a file, must not leave a
    later file placed through a descriptor of the wrong directory."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    for tree, tag in ((src, "new"), (dest, "old")):
        for d in ("a/b/c", "a/b2", "m", "z/y"):
            (tree / d).mkdir(parents=True, exist_ok=True)
        for f in ("a/top", "a/b/c/deep", "a/b/c/deep2", "a/b2/f", "m/g", "z/y/h", "root"):
            (tree / f).write_text(f"{tag} {f}\n")
    (src / "a" / "b" / "new" / "inner").mkdir(parents=True)  # moves in whole, before a/b/c's files
    (src / "a" / "b" / "new" / "inner" / "n").write_text("in a new tree\n")
    (dest / "m" / "x").mkdir()  # a directory where the source has a file, before m/g
    (dest / "m" / "x" / "old").write_text("goes\n")
    (src / "m" / "x").write_text("a file now\n")
    data, _ = archive(src)
    result = mirror_into(dest, extract(data, dest))
    assert snapshot(dest) == snapshot(src)
    assert result.skipped == []  # type: ignore[attr-defined]


def test_a_directory_holding_a_preserved_entry_is_not_replaced_by_a_file(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    (src / "x").write_text("file")
    (dest / "x").mkdir(parents=True)
    (dest / "x" / ".env").write_text("secret")
    data, _ = archive(src)
    result = mirror_into(dest, extract(data, dest), keep=lambda p, k: p.endswith(".env"))
    assert (dest / "x" / ".env").read_text() == "secret"
    assert [s.reason for s in result.skipped] == ["kept"]  # type: ignore[attr-defined]


def test_malformed_and_truncated_streams_fail_cleanly(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(100_000))
    data, _ = archive(src)
    for bad in (b"garbage" * 200, data[:50_000]):
        ex = TarExtractor(str(tmp_path / staging_name("bad")))
        with pytest.raises(ExtractError):
            ex.extract(io.BytesIO(bad))  # type: ignore[arg-type]
        ex.close()
        assert not (tmp_path / staging_name("bad")).exists()


def test_chunk_reader_skips_empty_chunks_and_slices_without_losing_bytes() -> None:
    chunks = [b"abc", b"", b"defgh", None]
    reader = ChunkReader(lambda: chunks.pop(0))
    assert reader.read(2) == b"ab"
    assert reader.read(10) == b"c"
    assert reader.read(10) == b"defgh"
    assert reader.read(10) == b""


def test_pax_mtime_keeps_nanoseconds_and_negative_times() -> None:
    for ns in (1_700_000_000_123_456_789, 0, -5 * 10**9):
        assert parse_mtime(pax_mtime(ns)) == ns


def test_walk_following_resolves_links_and_stops_loops(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "real").mkdir(parents=True)
    (src / "real" / "f").write_text("content")
    (src / "dirlink").symlink_to("real")
    (src / "filelink").symlink_to("real/f")
    (src / "loop").symlink_to(".")
    (src / "broken").symlink_to("nowhere")
    (src / "._junk").write_text("apple double")
    entries, skipped = walk_following(str(src), lambda rel, is_dir: rel.rsplit("/", 1)[-1].startswith("._"))
    kinds = {e.path: e.kind for e in entries}
    assert kinds == {"real": m.DIR, "real/f": m.FILE, "dirlink": m.DIR, "dirlink/f": m.FILE, "filelink": m.FILE}
    assert sorted((s.path, s.reason) for s in skipped) == [("broken", "dangling"), ("loop", "unsafe")]


def test_stale_staging_directories_of_dead_processes_are_reaped(tmp_path: Path) -> None:
    stale = tmp_path / ".syncd-tmp-999999999-resync"
    (stale / "a").mkdir(parents=True)
    (stale / "a" / "f").write_text("left by a killed resync")
    mine = tmp_path / staging_name("live")
    mine.mkdir()
    Scanner(str(tmp_path)).scan_all(hash_files=False)
    assert not stale.exists()
    assert mine.exists(), "a staging directory of a live process stays"
    assert is_temp_name(".syncd-tmp-1-resync/a/f")


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT],
                         ids=["gnu", "pax", "ustar"])
def test_archives_written_by_tarfile_in_every_format_extract(tmp_path: Path, fmt: int) -> None:
    src = tmp_path / "src"
    src.mkdir()
    name = ("n" * 90 + "/") * 2 + "f.txt" if fmt != tarfile.USTAR_FORMAT else "p" * 90 + "/f.txt"
    (src / name).parent.mkdir(parents=True)
    (src / name).write_bytes(b"payload" * 1000)
    (src / "l").symlink_to("t" * 150 if fmt != tarfile.USTAR_FORMAT else "t")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        tar.add(src, arcname=".")
    ex = extract(out.getvalue(), tmp_path)
    assert ex.skipped == []
    assert (Path(ex.staging) / name).read_bytes() == b"payload" * 1000
    assert os.readlink(Path(ex.staging) / "l") == os.readlink(src / "l")
    ex.close()


def test_our_archives_read_back_with_tarfile(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    data, producer = archive(src)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape") as tar:
        names = {info.name.rstrip("/") for info in tar.getmembers()}
        assert names == {e.path for e in producer.sent}
        info = tar.getmember(LONG)
        assert info.size == 5000 and tar.extractfile(info).read() == b"x" * 5000  # type: ignore[union-attr]
        assert tar.getmember("hard2").islnk() or tar.getmember("hard1").islnk()


def test_a_damaged_header_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    data, _ = archive(src)
    damaged = data[:1030] + b"X" + data[1031:]  # inside the member's ustar header
    ex = TarExtractor(str(tmp_path / staging_name("bad")))
    with pytest.raises(ExtractError, match="checksum"):
        ex.extract(io.BytesIO(damaged))  # type: ignore[arg-type]
    ex.close()


def test_the_agent_sends_no_further_ahead_than_its_credit(tmp_path: Path) -> None:
    """Flow control of a tree sent to the daemon: the sender stops at the window and goes
    on as credit (TarAck) comes back; memory on both ends is bounded by it."""
    import time

    from syncd.agent.tar_jobs import Send

    for i in range(6):
        (tmp_path / f"f{i}").write_bytes(os.urandom(1 << 20))
    sent: list[object] = []

    def data_bytes() -> int:
        return sum(len(msg.data) for msg in sent if isinstance(msg, m.TarData))

    def settle() -> int:
        last = -1
        while data_bytes() != last:
            last = data_bytes()
            time.sleep(0.2)
        return last

    root = Root(str(tmp_path))
    job = Send(root, Scanner(str(tmp_path)), m.TarSend(1, 2 << 20), sent.append)
    try:
        first = settle()
        assert 0 < first <= (2 << 20) + (1 << 20), "sent past its window"
        assert not job.done()
        job.ack(first)
        assert settle() > first, "credit did not release the sender"
        job.ack(1 << 40)
        job.thread.join(10)
        assert job.done()
        assert isinstance(sent[-1], m.TarResult) and sent[-1].done
        assert data_bytes() > 6 << 20
    finally:
        job.stop()
        root.close()


def merge_into(dest: Path, ex: TarExtractor) -> object:
    root = Root(str(dest))
    try:
        return merge_in(root, os.path.basename(ex.staging), ex.entries)
    finally:
        root.close()
        ex.close()


def test_merge_into_an_empty_root_places_the_whole_tree(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src)
    dest.mkdir()
    data, producer = archive(src)
    result = merge_into(dest, extract(data, dest))
    assert snapshot(dest) == snapshot(src)
    assert (dest / "hard1").stat().st_ino == (dest / "hard2").stat().st_ino
    assert result.skipped == [] and result.deleted == 0  # type: ignore[attr-defined]
    assert {e.path for e in result.entries} == {e.path for e in producer.sent}  # type: ignore[attr-defined]
    # Each entry reported is what the root now holds there (the base records its inode).
    for entry in result.entries:  # type: ignore[attr-defined]
        assert (dest / entry.path).lstat().st_ino == entry.ino, entry.path
    assert not [p for p in os.listdir(dest) if is_temp_name(p)], "the staging directory is gone"


MERGES = [
    # (case, what the destination gained while the stream ran, paths it must keep as they are,
    #  skipped paths (EXISTS), paths of the source that must land)
    ("file-where-a-file-appeared", lambda p: (p / "top.txt").write_text("theirs"), {"top.txt": "theirs"},
     {"top.txt"}, {"d/in.txt", "d/sub/deep.txt", "link"}),
    ("dir-where-a-dir-appeared", lambda p: (p / "d" / "sub").mkdir(parents=True), {},
     set(), {"top.txt", "d/in.txt", "d/sub/deep.txt", "link"}),
    ("file-inside-a-dir-that-appeared", lambda p: ((p / "d").mkdir(), (p / "d" / "in.txt").write_text("theirs")),
     {"d/in.txt": "theirs"}, {"d/in.txt"}, {"top.txt", "d/sub/deep.txt", "link"}),
    ("dir-where-a-file-appeared", lambda p: (p / "d").write_text("theirs"), {"d": "theirs"},
     {"d"}, {"top.txt", "link"}),
    ("link-where-a-link-appeared", lambda p: (p / "link").symlink_to("elsewhere"), {},
     {"link"}, {"top.txt", "d/in.txt", "d/sub/deep.txt"}),
    ("ignored-only-entries-stay", lambda p: (p / "node_modules").mkdir(), {},
     set(), {"top.txt", "d/in.txt", "d/sub/deep.txt", "link"}),
]


@pytest.mark.parametrize(("gained", "kept", "skipped", "landed"), [c[1:] for c in MERGES], ids=[c[0] for c in MERGES])
def test_merge_never_replaces_or_deletes_what_the_destination_holds(
        tmp_path: Path, gained: Callable[[Path], object], kept: dict[str, str], skipped: set[str],
        landed: set[str]) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    (src / "d" / "sub").mkdir(parents=True)
    (src / "top.txt").write_text("ours")
    (src / "d" / "in.txt").write_text("ours")
    (src / "d" / "sub" / "deep.txt").write_text("ours")
    (src / "link").symlink_to("top.txt")
    dest.mkdir()
    data, _ = archive(src)
    ex = extract(data, dest)
    gained(dest)  # after the stream arrived, before it is placed
    before = snapshot(dest)
    result = merge_into(dest, ex)
    after = snapshot(dest)
    for rel, value in before.items():
        assert after[rel] == value, f"{rel} was changed"
    for rel, text in kept.items():
        assert (dest / rel).read_text() == text
    assert {s.path for s in result.skipped} == skipped  # type: ignore[attr-defined]
    assert all(s.reason == EXISTS for s in result.skipped)  # type: ignore[attr-defined]
    for rel in landed:
        assert after[rel] == snapshot(src)[rel], rel
    reported = {e.path for e in result.entries}  # type: ignore[attr-defined]
    assert landed <= reported and not (reported & skipped)
    assert not [p for p in os.listdir(dest) if is_temp_name(p)]


# Pairs (a, b) where a directory's contents must come right after it: a < b in path_key
# order exactly when a's components sort before b's.
PATH_ORDER = [
    ("a", "a/b"),  # a directory before its contents
    ("a/b", "a.txt"),  # ... and its contents before a sibling that sorts after it as a string
    ("a/zzz", "a b"),
    ("a/b/c", "a-b"),
    ("a", "ab"),
    ("a/x", "ab"),
    ("", "a"),
    ("a/b", "a/b/c"),
    ("a/\udcff", "a\udcfe"),  # names that are not UTF-8 (surrogate escapes)
    ("\udcfe/a", "\udcfe\udcff"),
]


@pytest.mark.parametrize(("first", "second"), PATH_ORDER)
def test_path_key_puts_a_directory_right_before_its_contents(first: str, second: str) -> None:
    assert path_key(first) < path_key(second)
    assert tuple(first.split("/")) < tuple(second.split("/"))  # the component-wise order it stands for
    names = [second, first, "a/b/c/d", "a.txt/x", "b", "a/b.c"]
    assert sorted(names, key=path_key) == sorted(names, key=lambda p: tuple(p.split("/")))


@pytest.mark.parametrize("block", [
    bytes(512),
    b"\xff" * 512,  # the largest sum: each half stays below Adler-32's modulus
    bytes(range(256)) * 2,
    os.urandom(512),
    b"a.txt" + bytes(95) + b"0000644\0" + bytes(404),
], ids=["zeros", "all 0xff", "every byte value", "random", "a header"])
@pytest.mark.parametrize("with_zlib", [True, False])
def test_header_byte_sum_is_the_plain_sum(block: bytes, with_zlib: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not with_zlib:
        monkeypatch.setattr(tarformat, "zlib", None)
    assert tarformat._byte_sum(block) == sum(block)
