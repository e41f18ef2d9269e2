"""The pieces of a push's direct tar stream that need no daemon: the OpenSSH command line
(``openssh_argv``), the remote script (``tar_script``), and the agent's side of it
(``DirectStaging``: tar unpacks there by a way of its own, the agent only lists the
result; TarData after all falls back to a TarProcess).

The end-to-end behaviour (fallback, mid-stream failure, the pinned host key) is in
tests/e2e/test_resync_direct.py.
"""

from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Optional

import pytest

from syncd.agent import gnu_tar
from syncd.agent.gnu_tar import DirectStaging
from syncd.agent.tar_jobs import Receive
from syncd.fsops import Root
from syncd.protocol import messages as m
from syncd.rules import Rules
from syncd.scan import Scanner
from syncd.session.direct import (
    READY_LINE,
    cue_lines,
    tar_create_script_on_cue,
    tar_script,
    tar_script_on_cue,
)
from syncd.tarstream import CHANGED, in_place, scan_staged, staging_name
from syncd.transport.options import SshOptions
from syncd.transport.ssh import PIN_ALIAS, openssh_argv
from tests.unit.test_tarstream import archive, make_tree, snapshot

GNU_TAR = gnu_tar.find_gnu_tar()
needs_gnu_tar = pytest.mark.skipif(GNU_TAR is None, reason="GNU tar not installed")
HOME = os.path.expanduser("~")
PIN = "/run/pin dir/known_hosts"


# ---- openssh_argv ----------------------------------------------------------------------


def option_values(argv: list[str], flag: str) -> list[str]:
    """The values given to ``flag`` (``-p``, ``-o``, ...) before the ``--``."""
    head = argv[: argv.index("--")]
    return [head[i + 1] for i, arg in enumerate(head[:-1]) if arg == flag]


ARGV_CASES = [
    # (name, port, user, identity, ssh_config, host, expected: -p, -l, -i, -F)
    ("defaults", None, None, None, None, "example.org", [], [], [], []),
    ("port", 2222, None, None, None, "example.org", ["2222"], [], [], []),
    ("user", None, "agent", None, None, "example.org", [], ["agent"], [], []),
    ("identity expanded", None, None, "~/.ssh/id_sandbox", None, "example.org", [], [],
     [f"{HOME}/.ssh/id_sandbox"], []),
    ("ssh_config expanded", None, None, None, "~/cfg", "sandbox-alias", [], [], [], [f"{HOME}/cfg"]),
    ("everything", 22, "root", "/keys/id", "/etc/syncd/ssh_config", "10.0.0.7", ["22"], ["root"], ["/keys/id"],
     ["/etc/syncd/ssh_config"]),
    ("host that looks like an option", 2200, None, None, None, "-oProxyCommand=touch /tmp/x", ["2200"], [], [], []),
]


@pytest.mark.parametrize(("port", "user", "identity", "ssh_config", "host", "want_p", "want_l", "want_i", "want_f"),
                         [c[1:] for c in ARGV_CASES], ids=[c[0] for c in ARGV_CASES])
def test_openssh_argv_carries_the_session_options_and_trusts_only_the_pin(
        port: Optional[int], user: Optional[str], identity: Optional[str], ssh_config: Optional[str], host: str,
        want_p: list[str], want_l: list[str], want_i: list[str], want_f: list[str]) -> None:
    """Each session option becomes its OpenSSH option (and only when given); the command
    never prompts, trusts only the pinned known_hosts under PIN_ALIAS, and ends with
    ``-- HOST`` so that no host name is read as an option."""
    opts = SshOptions(port=port, identity=identity, ssh_config=ssh_config, known_hosts="/ignored/known_hosts")
    argv = openssh_argv("/usr/bin/ssh", host, user, opts, PIN)

    assert argv[0] == "/usr/bin/ssh"
    assert argv[-2:] == ["--", host] and argv.count("--") == 1
    assert option_values(argv, "-p") == want_p
    assert option_values(argv, "-l") == want_l
    assert option_values(argv, "-i") == want_i
    assert option_values(argv, "-F") == want_f
    settings = option_values(argv, "-o")
    keys = [s.split("=", 1)[0] for s in settings]
    assert len(keys) == len(set(keys)), settings  # OpenSSH takes the first of two: none may be doubled
    got = dict(s.split("=", 1) for s in settings)
    assert got["BatchMode"] == "yes" and got["StrictHostKeyChecking"] == "yes"
    assert got["UserKnownHostsFile"] == PIN  # not the session's --known-hosts: the pin replaces it
    assert got["GlobalKnownHostsFile"] == "/dev/null" and got["HostKeyAlias"] == PIN_ALIAS
    assert ("IdentitiesOnly" in got) is bool(identity) and got.get("IdentitiesOnly", "yes") == "yes"


def test_openssh_reads_the_command_line_as_meant(tmp_path: Path) -> None:
    """The installed OpenSSH accepts the command line (every option and cipher name) and
    resolves it to the intended settings (``ssh -G`` prints them without connecting)."""
    ssh = shutil.which("ssh")
    if ssh is None:
        pytest.skip("OpenSSH client not installed")
    config = tmp_path / "ssh_config"
    config.write_text("Host *\n    ConnectTimeout 99\n")
    identity = tmp_path / "id_test"
    identity.write_text("")  # OpenSSH drops an -i file that does not exist
    pin = tmp_path / "pinned_known_hosts"  # (-G prints a list of files space-separated)
    opts = SshOptions(port=2022, identity=str(identity), ssh_config=str(config))
    argv = openssh_argv(ssh, "sandbox.example", "worker", opts, str(pin))
    out = subprocess.run([argv[0], "-G", *argv[1:]], capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr

    resolved: dict[str, list[str]] = {}
    for line in out.stdout.splitlines():
        key, _, value = line.partition(" ")
        resolved.setdefault(key, []).append(value)
    assert resolved["hostname"] == ["sandbox.example"] and resolved["port"] == ["2022"]
    assert resolved["user"] == ["worker"]
    assert resolved["identityfile"] == [str(identity)] and resolved["identitiesonly"] == ["yes"]
    assert resolved["batchmode"] == ["yes"] and resolved["stricthostkeychecking"] == ["true"]
    assert resolved["hostkeyalias"] == [PIN_ALIAS]
    assert resolved["globalknownhostsfile"] == ["/dev/null"] and resolved["userknownhostsfile"] == [str(pin)]
    assert resolved["connecttimeout"] == ["15"]  # the command line beats the config file


# ---- tar_script ------------------------------------------------------------------------

ODD_STAGING = "/srv/my root/it's \"quoted\" $HOME `id` ;rm -rf x \\ caf\udce9/.syncd-tmp-1-tar-2"


def ready_then(out: subprocess.CompletedProcess[bytes]) -> bytes:
    """The script's stdout once READY_LINE has been printed first (on stderr, where a
    pull's stdout carries the archive; on stdout before that was so)."""
    if out.stderr == READY_LINE:
        return out.stdout
    assert out.stdout.startswith(READY_LINE) and out.stderr == b"", out
    return out.stdout[len(READY_LINE):]


def _fake_tar(tmp_path: Path) -> str:
    """A ``tar`` that prints its arguments, each followed by a NUL."""
    bin_dir = tmp_path / "bin dir"
    bin_dir.mkdir()
    fake = bin_dir / "tar"
    fake.write_text("#!/bin/sh\nprintf '%s\\0' \"$@\"\n")
    fake.chmod(0o755)
    return str(fake)


@pytest.mark.parametrize("layers", [1, 2], ids=["sh -c", "ssh's sh -c 'sh -c ...'"])
def test_tar_script_hands_tar_the_staging_path_exactly(tmp_path: Path, layers: int) -> None:
    """Spaces, quotes, ``$``, backquotes, backslashes and a byte that is not UTF-8 in the
    staging path reach tar as one argument, byte for byte: run by ``/bin/sh -c`` (a local
    endpoint), and run as SshChannel.direct_argv wraps it for the remote login shell."""
    tar = _fake_tar(tmp_path)
    script = tar_script(tar, ODD_STAGING)
    if layers == 2:
        script = shlex.join(["sh", "-c", script])  # what direct_argv sends; sshd runs it with $SHELL -c
    out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, timeout=30, check=True)

    args = ready_then(out).split(b"\0")[:-1]
    assert args[-2:] == [b"-C", os.fsencode(ODD_STAGING)], args
    assert b"-x" in args and b"-p" in args and b"--no-same-owner" in args
    assert [a for a in args if a == b"-"] == [b"-"]  # the archive comes on stdin


@pytest.mark.parametrize("layers", [1, 2], ids=["sh -c", "ssh's sh -c 'sh -c ...'"])
def test_an_early_push_script_hands_tar_the_cued_paths_exactly(tmp_path: Path, layers: int) -> None:
    """A push's command started before the agent made the staging directory reads the
    tar to run and the staging path as two lines on stdin (cue_lines): the odd path
    reaches tar as one argument, byte for byte, and tar's stdin starts right after the cue."""
    tar = _fake_tar(tmp_path)
    with open(tar, "a") as fake:
        fake.write('cat >"$(dirname "$0")/stdin"\n')
    cue = cue_lines(tar, ODD_STAGING)
    assert cue is not None
    script = tar_script_on_cue()
    if layers == 2:
        script = shlex.join(["sh", "-c", script])
    out = subprocess.run(["/bin/sh", "-c", script], input=cue + b"the archive\n", capture_output=True, timeout=30,
                         check=True)
    args = ready_then(out).split(b"\0")[:-1]
    assert args[-2:] == [b"-C", os.fsencode(ODD_STAGING)], args
    assert b"-x" in args and b"-p" in args and b"--no-same-owner" in args
    assert [a for a in args if a == b"-"] == [b"-"]
    assert (Path(tar).parent / "stdin").read_bytes() == b"the archive\n"


@needs_gnu_tar
@pytest.mark.parametrize("cut", [None, 0, 1], ids=["whole cue", "stdin ends at once", "stdin ends after one line"])
def test_an_early_push_script_unpacks_only_once_cued(tmp_path: Path, cut: int | None) -> None:
    """With the cue, GNU tar unpacks the archive that follows it into the staging
    directory; without both lines it unpacks nothing and exits non-zero."""
    assert GNU_TAR is not None
    src, staging = tmp_path / "src", tmp_path / "staging dir"
    make_tree(src)
    staging.mkdir()
    cue = cue_lines(GNU_TAR, str(staging))
    assert cue is not None
    stdin = cue + archive(src)[0] if cut is None else b"".join(cue.splitlines(keepends=True)[:cut])
    out = subprocess.run(["/bin/sh", "-c", tar_script_on_cue()], input=stdin, capture_output=True, timeout=60,
                         check=False)
    assert out.stderr.startswith(READY_LINE), out
    if cut is None:
        assert out.returncode == 0, out
        assert snapshot(staging) == snapshot(src)
    else:
        assert out.returncode != 0
        assert list(staging.iterdir()) == []


@pytest.mark.parametrize(("tar", "staging"), [("", "/s"), ("tar", ""), ("tar", "/a\nb"), ("/bin/t\nar", "/s")],
                         ids=["no tar", "no staging", "newline in the staging path", "newline in the tar path"])
def test_paths_that_cannot_be_one_line_are_not_cued(tar: str, staging: str) -> None:
    assert cue_lines(tar, staging) is None


NAMES = [b"a file", b"odd \xff name", b"sub", b"sub/line\nbreak", b"sub/deep"]


@needs_gnu_tar
@pytest.mark.parametrize("case", ["cued", "stdin ends", "one line only"])
def test_a_pull_script_archives_the_names_that_follow_its_cue(tmp_path: Path, case: str) -> None:
    """The pull's command starts before the agent runs: it says it runs, then reads the
    tar and the root, then archives the names that follow (NUL-ended, verbatim, no
    recursion) as they come. Without both lines, nothing is archived."""
    assert GNU_TAR is not None
    root = tmp_path / "root $x `y` 'q'"
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "sub" / "deep" / "not named").write_text("left out\n")
    for name in (b"a file", b"odd \xff name", b"sub/line\nbreak"):
        (Path(os.fsdecode(os.path.join(os.fsencode(root), name)))).write_bytes(name + b"\n")
    cue = cue_lines(GNU_TAR, str(root))
    assert cue is not None
    stdin = {"cued": cue + b"".join(n + b"\0" for n in NAMES), "stdin ends": b"",
             "one line only": cue.split(b"\n")[0] + b"\n"}[case]
    out = subprocess.run(["/bin/sh", "-c", tar_create_script_on_cue()], input=stdin, capture_output=True,
                         timeout=30, check=False)
    assert out.stderr.startswith(READY_LINE), out
    if case != "cued":
        assert out.returncode != 0 and out.stdout == b"", out
        return
    assert out.returncode == 0, out
    # tar -t quotes what it prints; a Python reader gives the names back as they are.
    with tarfile.open(fileobj=io.BytesIO(out.stdout), encoding="utf-8", errors="surrogateescape") as archive:
        got = [os.fsencode(member.name) for member in archive.getmembers()]
        pax = [member.pax_headers for member in archive.getmembers()]
    assert got == NAMES
    # Each member's nanosecond mtime rides in its pax header; the atime and ctime GNU tar
    # adds by default do not (every header would carry them, for nothing).
    assert all("." in h["mtime"] and "atime" not in h and "ctime" not in h for h in pax), pax


# ---- DirectStaging ---------------------------------------------------------------------


def _unpack_as_the_daemon_does(tar: str, staging: Path, data: bytes) -> None:
    """What the daemon's direct process runs on the remote: tar_script, the archive on stdin."""
    out = subprocess.run(["/bin/sh", "-c", tar_script(tar, str(staging))], input=data, capture_output=True,
                         timeout=60, check=False)
    assert out.returncode == 0 and ready_then(out) == b"", out


def _ignored_tree(src: Path) -> Rules:
    """make_tree plus entries the receiving root's rules ignore (the daemon's scan had
    other rules, so it archived them)."""
    make_tree(src)
    (src / "build").mkdir()
    (src / "build" / "out.o").write_text("object\n")
    (src / "src" / "debug.log").write_text("log\n")
    return Rules(["*.log", "build/"])


@needs_gnu_tar
def test_direct_staging_lists_what_tar_unpacked_as_a_full_scan_would(tmp_path: Path) -> None:
    """With the daemon's entries given (expect), ``end`` lists the staging area without a
    stat or rule lookup per entry, and must find exactly what a full scan of it finds;
    entries the receiving root ignores are taken out of the staging area."""
    assert GNU_TAR is not None
    src = tmp_path / "src"
    rules = _ignored_tree(src)
    data, producer = archive(src)
    assert {"build", "build/out.o", "src/debug.log"} <= {e.path for e in producer.sent}
    staging = tmp_path / staging_name("tar-1")
    job = DirectStaging(GNU_TAR, str(staging), rules.is_ignored)
    try:
        assert staging.is_dir() and os.listdir(staging) == []  # made, empty, before any stream
        _unpack_as_the_daemon_does(GNU_TAR, staging, data)
        for entry in producer.sent:
            job.expect(entry)
        job.expect(m.Entry("never/archived.txt", m.FILE, 0o644, 1, 0, 0))  # listed, not unpacked

        entries, skipped = job.end()

        assert skipped == []
        assert not (staging / "build").exists() and not (staging / "src" / "debug.log").exists()
        assert "never/archived.txt" not in entries
        assert (entries, skipped) == scan_staged(str(staging))  # the slow way, from the disk alone
        want = {e.path for e in producer.sent} - {"build", "build/out.o", "src/debug.log"}
        assert set(entries) == want
        expected_snapshot = snapshot(src)
        for rel in ("build", "build/out.o", "src/debug.log"):
            del expected_snapshot[rel]
        assert snapshot(staging) == expected_snapshot
    finally:
        job.close()
    assert not staging.exists()


@needs_gnu_tar
def test_direct_staging_takes_what_tar_staged_from_the_whole_list(tmp_path: Path) -> None:
    """Where the daemon says it named every member (``shared`` equals the entries
    expected), ``end`` takes the staged entries from that list, walking nothing: the same
    staging area as the walk leaves (ignored entries and what lies below them taken out,
    their directory's mtime kept), the same entries but for their inodes, which are the
    daemon's until read in place. A count that differs falls back to the walk."""
    assert GNU_TAR is not None
    src = tmp_path / "src"
    rules = _ignored_tree(src)
    data, producer = archive(src)
    src_dir_mtime = (src / "src").stat().st_mtime_ns
    ignored = {"build", "build/out.o", "src/debug.log"}
    results = {}
    for way, shared in (("list", len(producer.sent)), ("walk", len(producer.sent) - 1)):
        staging = tmp_path / staging_name(f"tar-{way}")
        job = DirectStaging(GNU_TAR, str(staging), rules.is_ignored)
        try:
            _unpack_as_the_daemon_does(GNU_TAR, staging, data)
            for entry in producer.sent:
                job.expect(entry)
            entries, skipped = job.end(shared)
            assert skipped == []
            assert job.listed_in_place == (way == "list")
            assert set(entries) == {e.path for e in producer.sent} - ignored
            assert not (staging / "build").exists() and not (staging / "src" / "debug.log").exists()
            assert (staging / "src").stat().st_mtime_ns == src_dir_mtime  # as tar set it
            results[way] = {rel: e._replace(ino=0) for rel, e in entries.items()}
            placed = in_place(str(staging), list(entries.values()))
            assert {e.path: e for e in placed} == scan_staged(str(staging))[0]  # the inodes on disk
        finally:
            job.close()
    assert results["list"] == results["walk"]


def test_in_place_reads_the_inodes_and_leaves_out_what_changed(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("f\n")
    (tmp_path / "g").write_text("g\n")
    os.symlink("g", tmp_path / "l")
    (tmp_path / "now-a-dir").mkdir()
    entries = [m.Entry("d", m.DIR, 0o755, 0, 0, 1), m.Entry("d/f", m.FILE, 0o644, 2, 0, 2),
               m.Entry("g", m.FILE, 0o644, 2, 0, 3), m.Entry("l", m.SYMLINK, 0o777, 0, 0, 4, None, "g"),
               m.Entry("gone", m.FILE, 0o644, 2, 0, 5), m.Entry("now-a-dir", m.FILE, 0o644, 2, 0, 6),
               m.Entry("missing/x", m.FILE, 0o644, 2, 0, 7)]
    placed = in_place(str(tmp_path), entries)
    still = ("d", "d/f", "g", "l")
    assert [(e.path, e.ino) for e in placed] == [(rel, os.lstat(tmp_path / rel).st_ino) for rel in still]


@needs_gnu_tar
def test_direct_staging_fed_after_all_unpacks_through_its_own_tar(tmp_path: Path) -> None:
    """The daemon's direct process never ran tar, so the stream comes as TarData: ``feed``
    starts a TarProcess on a fresh staging directory and ``end`` lists what it staged."""
    assert GNU_TAR is not None
    src = tmp_path / "src"
    rules = _ignored_tree(src)
    data, producer = archive(src)
    staging = tmp_path / staging_name("tar-2")
    job = DirectStaging(GNU_TAR, str(staging), rules.is_ignored)
    try:
        (staging / "stray").write_text("must not survive the fallback\n")
        for i in range(0, len(data), 100_000):  # in pieces, as TarData arrives
            job.feed(data[i:i + 100_000])
        assert job.inner is not None  # the fallback took over

        entries, skipped = job.end()

        assert skipped == []
        expected_snapshot = snapshot(src)
        for rel in ("build", "build/out.o", "src/debug.log"):
            del expected_snapshot[rel]
        assert snapshot(staging) == expected_snapshot  # "stray" is gone, ignored entries too
        assert set(entries) == set(expected_snapshot) == {e.path for e in producer.sent} - {
            "build", "build/out.o", "src/debug.log"}
    finally:
        job.close()
    assert not staging.exists()


@needs_gnu_tar
@pytest.mark.parametrize("listed", [False, True], ids=["walked", "from-the-list"])
def test_a_direct_receive_lands_the_tree_and_a_cancelled_one_leaves_nothing(tmp_path: Path, listed: bool) -> None:
    """The agent's whole direct receive (TarReceive(direct=True)): tar unpacks into the job's
    staging directory from outside, TarDigests name the members, the end places them in
    the root. A cancelled one (TarEnd(cancel=True) -> abort) leaves the root as it was."""
    assert GNU_TAR is not None
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src)
    dest.mkdir()
    (dest / "stale.txt").write_text("not in the source\n")
    data, producer = archive(src)
    shared = len(producer.sent) if listed else -1

    root = Root(str(dest))
    try:
        cancelled = Receive(root, Scanner(str(dest)), m.TarReceive(1, "", False, direct=True))
        assert isinstance(cancelled.unpack, DirectStaging) and cancelled.tar == GNU_TAR
        _unpack_as_the_daemon_does(cancelled.tar, Path(cancelled.staging), data)
        cancelled.abort()
        assert os.listdir(dest) == ["stale.txt"]

        job = Receive(root, Scanner(str(dest)), m.TarReceive(2, "", False, direct=True))
        _unpack_as_the_daemon_does(job.tar, Path(job.staging), data)
        job.known(tuple(producer.sent))
        placed, _kept, skipped, deleted = job.finish((), shared)
        assert job.listed_in_place == (shared > 0)
        if job.listed_in_place:
            placed = in_place(str(dest), placed)
    finally:
        root.close()
    assert snapshot(dest) == snapshot(src)
    assert (skipped, deleted) == ([], 1)
    assert sorted(e.path for e in placed) == sorted(e.path for e in producer.sent)
    for e in placed:  # what is reported is what is on disk (the base index is built from it)
        st = os.lstat(dest / e.path)
        assert (st.st_ino, st.st_mode & 0o7777) == (e.ino, e.mode), e.path
        if e.kind == m.FILE:
            assert (st.st_size, st.st_mtime_ns) == (e.size, e.mtime_ns), e.path


@needs_gnu_tar
def test_a_member_the_daemon_does_not_trust_is_not_placed_from_the_list(tmp_path: Path) -> None:
    """A file that changed while it was archived is in the archive but not on the list
    (the daemon reports it skipped): taken from the list, the staging area still holds
    it, and it must not ride into the root with its directory."""
    assert GNU_TAR is not None
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src)
    dest.mkdir()
    data, producer = archive(src)
    untrusted = next(e for e in producer.sent if e.kind == m.FILE and "/" in e.path)
    listed = [e for e in producer.sent if e is not untrusted]
    root = Root(str(dest))
    try:
        job = Receive(root, Scanner(str(dest)), m.TarReceive(1, "", False, direct=True))
        _unpack_as_the_daemon_does(job.tar, Path(job.staging), data)
        job.known(tuple(listed))
        placed, _kept, _skipped, _deleted = job.finish(
            (m.Skip(untrusted.path, CHANGED, "changed while it was archived"),), len(listed))
        assert job.listed_in_place
    finally:
        root.close()
    assert not (dest / untrusted.path).exists()
    want = snapshot(src)
    del want[untrusted.path]
    assert snapshot(dest) == want
    assert sorted(e.path for e in placed) == sorted(e.path for e in listed)


# ---- the agent's side of a direct pull ------------------------------------------------


def test_a_direct_send_names_its_tar_then_the_entries_as_it_walks_then_the_totals(tmp_path: Path) -> None:
    """TarReady (the tar, no list file) before anything is walked, the entries in chunks
    while the walk goes on, and only then TarStart with the totals and the last
    TarResult with the skips; the root is left as it was."""
    from syncd.agent.tar_jobs import RESULT_CHUNK, send_listed

    count = RESULT_CHUNK + RESULT_CHUNK // 2
    for i in range(count):
        (tmp_path / f"d{i % 7}").mkdir(exist_ok=True)
        (tmp_path / f"d{i % 7}" / f"f{i}").write_text("x" * (i % 5))
    (tmp_path / "ignored.log").write_text("never listed\n")
    before = sorted(os.listdir(tmp_path))
    rules = Rules(["*.log"])
    sent: list[object] = []
    walked: list[int] = []  # entries found when each message went

    def send(msg: object) -> None:
        sent.append(msg)
        walked.append(len(entries_so_far))

    entries_so_far: list[object] = []

    class Counting(Scanner):
        def _entry(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
            entry = super()._entry(*args, **kwargs)  # type: ignore[arg-type]
            entries_so_far.append(entry)
            return entry

    scanner = Counting(str(tmp_path), rules.is_ignored)
    send_listed(Root(str(tmp_path)), scanner, 5, "/usr/bin/tar", send)

    assert sent[0] == m.TarReady(5, "", "/usr/bin/tar") and walked[0] == 0
    chunks = [msg for msg in sent[1:-2] if isinstance(msg, m.TarResult)]
    assert len(chunks) == len(sent) - 3 >= 2 and not any(c.done or c.skipped for c in chunks)
    assert walked[1] < count + 7, "the first chunk waited for the whole walk"
    listed = [e for c in chunks for e in c.entries]
    assert sorted(e.path for e in listed) == sorted(
        [f"d{i}" for i in range(7)] + [f"d{i % 7}/f{i}" for i in range(count)])
    assert all(e.digest is None for e in listed)
    start, last = sent[-2], sent[-1]
    assert start == m.TarStart(5, count + 7, sum(i % 5 for i in range(count)))
    assert isinstance(last, m.TarResult) and last.done and last.entries == ()
    assert sorted(os.listdir(tmp_path)) == before
