"""End-to-end: a push's direct tar stream (the archiving child -> OpenSSH ``ssh`` -> the
remote's GNU tar, beside the session channel) when it cannot start, when it breaks
mid-stream, and the host key pin that keeps it on the host the session verified.

The daemon here finds a stand-in ``ssh`` first on its PATH (``direct_argv`` looks ``ssh``
up with ``shutil.which``); a ``mode`` file beside it says what the stand-in does:
refuse to connect, print the ready line and then die, cut the stream short in front of
the real ``ssh``, or just ``exec`` the real one. Everything else is real: the daemon, the
CLI, sshd, the agent, GNU tar on the "remote" (a directory on this machine).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from syncd.agent.gnu_tar import find_gnu_tar
from syncd.transport import ssh
from syncd.transport.options import SshOptions
from tests.e2e.daemon_util import DaemonProc, describe, ok_json, wait_until
from tests.e2e.test_resync import (
    DIRECT_PULLS,
    EXIT_ERROR,
    LIVE,
    SUMMARY_FIELDS,
    add_session,
    assert_same,
    ignored_by_default,
    make_rich_tree,
    pause,
    read,
    remove_session,
    snapshot,
    spec_for,
    status,
    temp_names,
    wait_state,
    write,
)
from tests.sshd import SshServer, sshd_missing_reason

REAL_SSH = shutil.which("ssh")
FAKE_SSH = """#!/bin/sh
# A stand-in for OpenSSH's ssh. ./mode says what it does (line 1) and, for the broken
# streams, which remote root to report on (line 2): what the staging area held when the
# stream broke, written to ./staged before the daemon can learn of the break.
here=$(dirname "$0")
mode=$(sed -n 1p "$here/mode" 2>/dev/null)
root=$(sed -n 2p "$here/mode" 2>/dev/null)
echo "${mode:-real}" >>"$here/calls"
report() {
    { ls -d "$root"/.syncd-tmp-*-tar-* 2>/dev/null | wc -l
      find "$root" -path '*/.syncd-tmp-*' -type f -size +0 | wc -l; } >"$here/staged"
}
case "$mode" in
refuse)
    echo "ssh: connect to host 127.0.0.1 port 1: Connection refused" >&2
    exit 255 ;;
cut)  # the remote command ran, then the link died with 64 KiB read
    # The ready line on both streams: the daemon looks for it on one (stderr today: a
    # pull's stdout carries the archive) and a push's process has nothing else on stdout.
    printf 'syncd-direct\\n'
    printf 'syncd-direct\\n' >&2
    head -c 65536 >/dev/null
    report
    echo "client_loop: send disconnect: Broken pipe" >&2
    echo "a second line of complaint" >&2
    exit 3 ;;
truncate)  # the real remote tar gets a stream that stops mid-block
    head -c 300001 | {real} "$@"
    status=$?
    report
    exit $status ;;
deaf)  # the remote command ran, then the link died before the daemon cued it
    printf 'syncd-direct\\n' >&2
    exec 0<&-
    sleep 1
    echo "client_loop: the link went away before its cue" >&2
    exit 5 ;;
head)  # a pull's archive stops mid-block, and the process still exits 0
    {real} "$@" | head -c 300001
    exit 0 ;;
note)  # the real ssh, noting its pid and whether the agent had made a staging area yet
    echo $$ >>"$here/pids"
    ls -d "$root"/.syncd-tmp-*-tar-* 2>/dev/null | wc -l >>"$here/staging-at-start" ;;
esac
exec {real} "$@"
"""


def _missing() -> str | None:
    if REAL_SSH is None:
        return "OpenSSH client not installed"
    if find_gnu_tar() is None:
        return "GNU tar not installed (the direct stream needs it on the remote)"
    return sshd_missing_reason()


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


class FakeSsh:
    """The stand-in ``ssh`` on the daemon's PATH and its control files."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        bin_dir.mkdir(parents=True, exist_ok=True)
        script = bin_dir / "ssh"
        script.write_text(FAKE_SSH.replace("{real}", shlex.quote(str(REAL_SSH))))
        script.chmod(0o755)
        self.set("real")

    def set(self, mode: str, root: Path | None = None) -> None:
        (self.bin_dir / "mode").write_text(f"{mode}\n{root or ''}\n")
        (self.bin_dir / "staged").unlink(missing_ok=True)

    def staged(self) -> tuple[int, int]:
        """(staging directories, files with data in them) when the stream broke."""
        dirs, files = (self.bin_dir / "staged").read_text().split()
        return int(dirs), int(files)

    def noted(self, what: str) -> list[str]:
        """What the ``note`` mode wrote to ./``what`` (``pids``, ``staging-at-start``), one per call."""
        try:
            return (self.bin_dir / what).read_text().split()
        except FileNotFoundError:
            return []

    def calls(self) -> list[str]:
        try:
            return (self.bin_dir / "calls").read_text().split()
        except FileNotFoundError:
            return []


@pytest.fixture(scope="module")
def fake_ssh(tmp_path_factory: pytest.TempPathFactory) -> FakeSsh:
    return FakeSsh(tmp_path_factory.mktemp("fake-ssh-bin"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, fake_ssh: FakeSsh) -> Iterator[DaemonProc]:
    path = f"{fake_ssh.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = DaemonProc(tmp_path_factory.mktemp("direct-daemon"), env={"PATH": path, **DIRECT_PULLS})
    proc.start()
    yield proc
    code = proc.stop()
    assert code == 0, f"the daemon exited with {code} on SIGTERM:\n{proc.log()}"
    assert "Traceback" not in proc.log(), proc.log()


@pytest.fixture
def mode(fake_ssh: FakeSsh) -> Iterator[Callable[..., None]]:
    """Set the stand-in's behaviour; it goes back to the real ssh after the test."""
    yield fake_ssh.set
    fake_ssh.set("real")


def push(daemon: DaemonProc, name: str) -> dict[str, Any]:
    """A push through the real CLI; its JSON output is the summary."""
    summary = ok_json(daemon.cli("resync", name, "--push", "--json", timeout=120))
    assert isinstance(summary, dict) and set(summary) == SUMMARY_FIELDS, summary
    return summary


def remote_differs(remote: Path) -> None:
    """Remote contents the local side lacks or holds otherwise (a push must replace all)."""
    write(remote / "src/main.py", "the remote's own main\n", mode=0o755)
    write(remote / "remote-only.txt", "only on the remote\n")
    write(remote / "remote-dir/deep/x.txt", "deep, only on the remote\n")
    write(remote / "node_modules/pkg/index.js", "ignored: a push keeps it\n")


# ---------------------------------------------------------------------------------------
# 1. the direct stream does not start: the push goes over the session channel
# ---------------------------------------------------------------------------------------


def test_a_direct_stream_that_cannot_start_falls_back_to_the_channel(
        daemon: DaemonProc, sshd: SshServer, fake_ssh: FakeSsh, mode: Callable[..., None], tmp_path: Path) -> None:
    """``ssh`` refusing to connect (exit 255, no ready line) costs nothing but a warning:
    the push restarts the archive over the session channel and lands the whole tree."""
    name = "direct-refused"
    local, remote = add_session(daemon, sshd, tmp_path, name, ignore=["node_modules"])
    try:
        make_rich_tree(local, "local")
        remote_differs(remote)
        ignored_before = {rel: v for rel, v in snapshot(remote).items() if ignored_by_default(rel)}
        mode("refuse")
        calls_before, log_before = len(fake_ssh.calls()), len(daemon.log())

        summary = push(daemon, name)

        assert summary["direct"] is False, summary
        assert fake_ssh.calls()[calls_before:] == ["refuse"]  # tried once, then never again
        assert summary["skipped"] == [] and summary["files"] == len(snapshot(local)), summary
        assert_same(snapshot(local), snapshot(remote, ignored_by_default))
        assert {rel: v for rel, v in snapshot(remote).items() if ignored_by_default(rel)} == ignored_before
        assert temp_names(remote) == []
        log = daemon.log()[log_before:]
        assert "the direct stream did not start" in log, log
        assert "Connection refused" in log, log  # the warning says why
        assert wait_state(daemon, name, LIVE)["halt_reason"] == ""
    finally:
        remove_session(daemon, name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_push_logs_in_for_its_direct_stream_while_the_agent_starts(
        daemon: DaemonProc, sshd: SshServer, fake_ssh: FakeSsh, mode: Callable[..., None], tmp_path: Path) -> None:
    """The push's ``ssh`` starts as soon as the session's connection is verified, before the
    agent has made the staging area it will unpack into (the path comes on its stdin
    later), and it is the only login the stream needs."""
    name = "direct-early"
    local, remote = add_session(daemon, sshd, tmp_path, name, ignore=["node_modules"])
    try:
        make_rich_tree(local, "local")
        remote_differs(remote)
        mode("note", remote)
        calls_before, noted_before = len(fake_ssh.calls()), len(fake_ssh.noted("staging-at-start"))

        summary = push(daemon, name)

        assert summary["direct"] is True and summary["skipped"] == [], summary
        assert fake_ssh.calls()[calls_before:] == ["note"]
        assert fake_ssh.noted("staging-at-start")[noted_before:] == ["0"]  # no staging area yet
        assert_same(snapshot(local), snapshot(remote, ignored_by_default))
        assert temp_names(remote) == []
    finally:
        remove_session(daemon, name)


def test_a_first_sync_into_a_remote_that_holds_files_drops_its_early_stream(
        daemon: DaemonProc, sshd: SshServer, fake_ssh: FakeSsh, mode: Callable[..., None], tmp_path: Path) -> None:
    """A first sync may push its tree as one stream, so its ``ssh`` logs in at once; when
    the agent then finds files in the remote root, that process is stopped (no staging
    area is made, nothing is unpacked) and the two trees are merged entry by entry."""
    name = "direct-early-dropped"
    local, remote = tmp_path / "local", tmp_path / "remote"
    write(local / "a/local.txt", "local\n")
    write(remote / "b/remote.txt", "remote\n")
    mode("note", remote)
    pids_before = len(fake_ssh.noted("pids"))
    daemon.rpc("add", {"name": name, "spec": spec_for(sshd, local, remote, [], [])})
    try:
        wait_state(daemon, name, LIVE)
        pids = [int(pid) for pid in fake_ssh.noted("pids")[pids_before:]]
        assert len(pids) == 1, pids
        wait_until(lambda: not _alive(pids[0]), 20, message=lambda: f"ssh {pids[0]} to stop")
        assert read(remote / "a/local.txt") == b"local\n" and read(local / "b/remote.txt") == b"remote\n"
        assert temp_names(remote) == [] and temp_names(local) == []
    finally:
        remove_session(daemon, name)


# ---------------------------------------------------------------------------------------
# 2. the direct stream breaks mid-stream: the push fails, the remote stays as it was
# ---------------------------------------------------------------------------------------

BREAKS = [
    # (mode, what the one-line error must say, whether tar had staged files by then)
    pytest.param("cut", ["the direct tar stream failed (status 3)", "Broken pipe", "a second line"], False,
                 id="ssh-dies-after-64KiB"),
    pytest.param("truncate", ["the direct tar stream failed (status 2)", "Unexpected EOF"], True,
                 id="remote-tar-gets-a-truncated-stream"),
]


@pytest.mark.parametrize(("broken", "says", "tar_ran"), BREAKS)
def test_a_direct_stream_broken_midway_fails_cleanly_and_the_next_push_works(
        daemon: DaemonProc, sshd: SshServer, fake_ssh: FakeSsh, mode: Callable[..., None], tmp_path: Path,
        broken: str, says: list[str], tar_ran: bool) -> None:
    """Once the remote command ran, a broken stream fails the push with one clear line (no
    fallback: tar may have unpacked part of it), the agent discards its staging directory
    on the cancel, the remote root is untouched, and a push on a working link then lands."""
    name = f"direct-{broken}"
    local, remote = add_session(daemon, sshd, tmp_path, name, ignore=["node_modules"])
    try:
        make_rich_tree(local, "local")  # > 3 MiB: far longer than what gets through
        remote_differs(remote)
        before = snapshot(remote)
        mode(broken, remote)
        calls_before = len(fake_ssh.calls())

        done = daemon.cli("resync", name, "--push", "--json", timeout=120)

        assert done.returncode == EXIT_ERROR, describe(done)
        assert len(done.stderr.strip().splitlines()) == 1, describe(done)  # one clear line
        for text in says:
            assert text in done.stderr, describe(done)
        assert "Traceback" not in done.stderr, describe(done)
        assert fake_ssh.calls()[calls_before:] == [broken]  # no second attempt, no fallback
        # The agent's staging directory was there when the stream broke (with what the real
        # tar had unpacked): the cancel is what removes it.
        dirs, files = fake_ssh.staged()
        assert dirs == 1 and (files > 0) is tar_ran, (dirs, files)
        wait_until(lambda: temp_names(remote) == [], 20,
                   message=lambda: f"the staging directory to go: {temp_names(remote)}")
        assert_same(before, snapshot(remote), ("before", "after"))
        assert status(daemon, name)["state"] == "paused"

        mode("real")
        summary = push(daemon, name)
        assert summary["direct"] is True and summary["skipped"] == [], summary
        assert_same(snapshot(local), snapshot(remote, ignored_by_default))
        assert read(remote / "node_modules/pkg/index.js") == b"ignored: a push keeps it\n"
        assert temp_names(remote) == []
    finally:
        remove_session(daemon, name)


# ---------------------------------------------------------------------------------------
# 3. a pull: the remote's GNU tar archives straight into syncd's extracting child
# ---------------------------------------------------------------------------------------


def pull(daemon: DaemonProc, name: str) -> dict[str, Any]:
    summary = ok_json(daemon.cli("resync", name, "--pull", "--json", timeout=120))
    assert isinstance(summary, dict) and set(summary) == SUMMARY_FIELDS, summary
    return summary


def local_differs(local: Path) -> None:
    write(local / "src/main.py", "the local's own main\n")
    write(local / "local-only.txt", "only here: a pull deletes it\n")
    write(local / "node_modules/pkg/index.js", "ignored: a pull keeps it\n")


def test_a_direct_pull_that_cannot_start_falls_back_to_the_channel(
        daemon: DaemonProc, sshd: SshServer, fake_ssh: FakeSsh, mode: Callable[..., None], tmp_path: Path) -> None:
    """As for a push: ``ssh`` refusing to connect leaves a warning, and the agent then
    streams the tree over the session channel."""
    name = "direct-pull-refused"
    local, remote = add_session(daemon, sshd, tmp_path, name, ignore=["node_modules"])
    try:
        make_rich_tree(remote, "remote")
        local_differs(local)
        mode("refuse")
        calls_before, log_before = len(fake_ssh.calls()), len(daemon.log())

        summary = pull(daemon, name)

        assert summary["direct"] is False and summary["skipped"] == [], summary
        assert fake_ssh.calls()[calls_before:] == ["refuse"]
        assert_same(snapshot(remote, ignored_by_default), snapshot(local, ignored_by_default))
        assert read(local / "node_modules/pkg/index.js") == b"ignored: a pull keeps it\n"
        assert temp_names(local) == [] and temp_names(remote) == []
        log = daemon.log()[log_before:]
        assert "the pull goes over the session channel" in log and "Connection refused" in log, log
    finally:
        remove_session(daemon, name)


def test_a_pull_the_base_says_is_small_goes_over_the_channel_and_a_push_still_goes_direct(
        sshd: SshServer, tmp_path: Path) -> None:
    """By default a pull of a tree the base says is small skips the direct way, whose
    second login would cost more than it saves (with no base to ask, a pull goes direct:
    its login overlaps the agent's start); a push's login overlaps the listing of the
    tree, so it goes direct whatever the size."""
    (tmp_path / "d").mkdir()
    own = DaemonProc(tmp_path / "d")  # the default threshold: no SYNCD_DIRECT_PULL_BYTES
    own.start()
    try:
        local, remote = add_session(own, sshd, tmp_path, "small", paused=False)
        make_rich_tree(remote, "remote")
        own.rpc("flush", {"name": "small", "timeout": 60.0}, timeout=70.0)  # the base now says small
        assert (local / "src/main.py").exists()
        pause(own, "small")
        write(remote / "src/main.py", "changed on the remote\n")
        write(local / "local-only.txt", "a pull deletes it\n")
        summary = pull(own, "small")
        assert summary["direct"] is False and summary["skipped"] == [], summary
        assert_same(snapshot(remote, ignored_by_default), snapshot(local, ignored_by_default))
        assert temp_names(remote) == [] and temp_names(local) == []
        write(local / "pushed.txt", "back\n")
        assert push(own, "small")["direct"] is True
        assert read(remote / "pushed.txt") == b"back\n"

        # A new session has no base to ask: its pull goes direct, however small the tree.
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        own.rpc("add", {"name": "fresh", "spec": spec_for(sshd, fresh, remote), "paused": True})
        summary = pull(own, "fresh")
        assert summary["direct"] is True and summary["skipped"] == [], summary
        assert_same(snapshot(remote, ignored_by_default), snapshot(fresh, ignored_by_default))
    finally:
        own.stop()


@pytest.mark.parametrize("kind", ["local", "exec"])
def test_local_and_exec_sessions_stream_directly_through_a_second_shell(
        daemon: DaemonProc, tmp_path: Path, kind: str) -> None:
    """A ``local:`` session runs the direct script with /bin/sh, an ``exec:`` one with its
    own command (here ``env``, standing in for ``docker exec -i box``) plus ``sh -c``: the
    stream skips the agent both ways, and the trees come out identical."""
    name = f"direct-{kind}"
    local, remote = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    remote.mkdir()
    url = f"local:{remote}" if kind == "local" else f'exec:"env"::{remote}'
    daemon.rpc("add", {"name": name, "spec": {"local": str(local), "remote": url}})
    try:
        wait_state(daemon, name, LIVE)
        pause(daemon, name)
        make_rich_tree(local, "local")
        summary = push(daemon, name)
        assert summary["direct"] is True and summary["skipped"] == [], summary
        assert_same(snapshot(local, ignored_by_default), snapshot(remote, ignored_by_default))
        write(remote / "from-remote.txt", "made on the remote\n")
        (remote / "src/main.py").unlink()
        summary = pull(daemon, name)
        assert summary["direct"] is True and summary["skipped"] == [], summary
        assert_same(snapshot(remote, ignored_by_default), snapshot(local, ignored_by_default))
        assert temp_names(local) == [] and temp_names(remote) == []
    finally:
        remove_session(daemon, name)


def test_where_the_agent_has_no_gnu_tar_a_push_started_early_goes_over_the_channel(tmp_path: Path) -> None:
    """The push's direct process starts before the agent says whether its host has GNU
    tar; when it has none (here a ``tar`` that is not GNU first on the PATH of a ``local:``
    agent), that process is stopped unused and the archive is made again for the session
    channel, without a warning: a first sync and a resync both land the whole tree."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "tar").write_text("#!/bin/sh\necho 'bsdtar 3.6.2 - libarchive 3.6.2'\nexit 0\n")
    (fake_bin / "tar").chmod(0o755)
    (tmp_path / "d").mkdir()
    own = DaemonProc(tmp_path / "d", env={"PATH": f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}"})
    own.start()
    local, remote = tmp_path / "local", tmp_path / "remote"
    make_rich_tree(local, "local")
    remote.mkdir()
    try:
        own.rpc("add", {"name": "no-gnu-tar", "spec": {"local": str(local), "remote": f"local:{remote}"}})
        wait_state(own, "no-gnu-tar", LIVE)
        assert_same(snapshot(local, ignored_by_default), snapshot(remote, ignored_by_default))
        assert "as one stream" in own.log(), own.log()  # the first sync did stream, by the channel
        pause(own, "no-gnu-tar")
        write(local / "added.txt", "after the first sync\n")
        summary = push(own, "no-gnu-tar")
        assert summary["direct"] is False and summary["skipped"] == [], summary
        assert read(remote / "added.txt") == b"after the first sync\n"
        assert_same(snapshot(local, ignored_by_default), snapshot(remote, ignored_by_default))
        assert temp_names(remote) == [] and temp_names(local) == []
        assert "did not start" not in own.log() and "Traceback" not in own.log(), own.log()
    finally:
        own.stop()


PULL_BREAKS = [
    # (mode, what the one-line error must say)
    pytest.param("cut", ["the direct tar stream failed (status 3)", "Broken pipe"], id="ssh-dies-midway"),
    pytest.param("head", ["malformed tar stream"], id="archive-cut-short-but-exit-0"),
    pytest.param("deaf", ["the direct tar stream failed (status 5)", "before its cue"], id="ssh-gone-before-the-cue"),
]


@pytest.mark.parametrize(("broken", "says"), PULL_BREAKS)
def test_a_direct_pull_broken_midway_fails_cleanly_and_the_local_stays(
        daemon: DaemonProc, sshd: SshServer, fake_ssh: FakeSsh, mode: Callable[..., None], tmp_path: Path,
        broken: str, says: list[str]) -> None:
    """A pull whose archive breaks fails with one line and places nothing, even when the
    process that carried it exits 0: syncd's extractor wants the archive's end."""
    name = f"direct-pull-{broken}"
    local, remote = add_session(daemon, sshd, tmp_path, name, ignore=["node_modules"])
    try:
        make_rich_tree(remote, "remote")  # > 3 MiB
        local_differs(local)
        before = snapshot(local)
        mode(broken, remote)

        done = daemon.cli("resync", name, "--pull", "--json", timeout=120)

        assert done.returncode == EXIT_ERROR, describe(done)
        assert len(done.stderr.strip().splitlines()) == 1, describe(done)
        for text in says:
            assert text in done.stderr, describe(done)
        assert_same(before, snapshot(local), ("before", "after"))
        assert temp_names(local) == []
        mode("real")
        summary = pull(daemon, name)
        assert summary["direct"] is True and summary["skipped"] == [], summary
        assert_same(snapshot(remote, ignored_by_default), snapshot(local, ignored_by_default))
    finally:
        remove_session(daemon, name)


# ---------------------------------------------------------------------------------------
# 4. the direct process trusts only the host key the session verified
# ---------------------------------------------------------------------------------------


def _with_port(argv: list[str], port: int) -> list[str]:
    at = [i for i, arg in enumerate(argv) if arg == "-p"]
    assert len(at) == 1, argv
    return [*argv[: at[0] + 1], str(port), *argv[at[0] + 2:]]


PIN_DIRS = [
    pytest.param("", id="default-tmpdir"),
    # OpenSSH splits UserKnownHostsFile on whitespace and expands %-tokens in it: under
    # such a TMPDIR the pin must go elsewhere, or OpenSSH would look for another file,
    # know no key and refuse every direct stream (each push falling back to the channel).
    pytest.param("tmp with space", id="tmpdir-with-a-space"),
    pytest.param("tmp%dpercent", id="tmpdir-with-a-percent"),
]


@pytest.mark.parametrize("pin_dir", PIN_DIRS)
def test_the_direct_command_trusts_only_the_host_key_the_session_verified(
        sshd: SshServer, sshd_factory: Callable[..., SshServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        pin_dir: str) -> None:
    """``direct_argv`` reaches the host the session's connection verified, wherever the
    pinned known_hosts file is made; the same command line pointed at a server with
    another host key (which accepts the same client key) is refused by OpenSSH before
    anything runs there."""
    if pin_dir:
        (tmp_path / pin_dir).mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / pin_dir))  # where the pin file goes
    other = sshd_factory(client_key=sshd.client_key)  # same user and client key, another host key
    opts = SshOptions(port=sshd.port, identity=str(sshd.client_key), known_hosts=str(sshd.known_hosts))
    run: dict[str, Any] = {"stdin": subprocess.DEVNULL, "capture_output": True, "timeout": 30, "check": False}

    async def go() -> tuple[list[str], subprocess.CompletedProcess[bytes], subprocess.CompletedProcess[bytes]]:
        channel = await ssh.open_channel(sshd.host, sshd.user, opts, "cat")
        try:
            argv = channel.direct_argv("printf ok")
            assert argv is not None
            good = await asyncio.to_thread(subprocess.run, argv, **run)
            bad = await asyncio.to_thread(subprocess.run, _with_port(argv, other.port), **run)
            return argv, good, bad
        finally:
            await channel.close()

    argv, good, bad = asyncio.run(go())

    pinned = next(a.split("=", 1)[1] for a in argv if a.startswith("UserKnownHostsFile="))
    assert (good.returncode, good.stdout) == (0, b"ok"), good
    assert bad.returncode != 0 and bad.stdout == b"", bad
    assert b"Host key verification failed" in bad.stderr, bad
    # Only the pin made the difference: that server answers with its own known_hosts.
    own = subprocess.run([*other.ssh_argv(), "printf ok"], **run)
    assert (own.returncode, own.stdout) == (0, b"ok"), own
    # The pinned known_hosts file goes with the channel.
    assert not Path(pinned.strip('"')).exists(), pinned
