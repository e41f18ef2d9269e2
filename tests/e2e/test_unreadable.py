"""End-to-end: a synced file or directory that its side can no longer read is not a
deletion. The remote agent runs as ``nobody`` here, so a root-owned mode-000 file or
directory is really unreadable to it. The other side keeps its copy, through live cycles
and a restart's full scan, and gets the new content once it can be read again.
"""

from __future__ import annotations

import os
import pwd
import time
from pathlib import Path

from syncd.engine.model import Agreed, Intent
from syncd.protocol.messages import FILE
from syncd.scan import digest_bytes
from tests.e2e.helpers import start_session, wait_until
from tests.e2e.twoway_util import add_intent, wait_quiescent
from tests.sshd import SshServer

WAIT = 30.0


def text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def roots(unprivileged_sshd: tuple[SshServer, Path, pwd.struct_passwd]) -> tuple[SshServer, Path, Path]:
    """The server and two fresh roots, the remote one owned by the agent's user."""
    server, area, nobody = unprivileged_sshd
    local, remote = area / "local", area / "remote"
    local.mkdir()
    remote.mkdir()
    os.chown(remote, nobody.pw_uid, nobody.pw_gid)
    return server, local, remote


def test_a_file_turned_unreadable_is_kept_on_the_other_side(
        unprivileged_sshd: tuple[SshServer, Path, pwd.struct_passwd], tmp_path: Path) -> None:
    server, local, remote = roots(unprivileged_sshd)
    (local / "locked.txt").write_text("v1\n")
    (local / "marker.txt").write_text("m0\n")
    (local / "box").mkdir()
    (local / "box" / "inside.txt").write_text("in a directory the agent will not list\n")
    (local / "box" / "sub").mkdir()
    (local / "box" / "sub" / "deep.txt").write_text("below it\n")
    state = tmp_path / "state"
    session = start_session(server, local, remote, state, name="s1")
    try:
        wait_quiescent(local, remote, session, what="initial push")

        # New content the agent cannot read, then a readable change as a witness that
        # the cycles after it ran.
        locked = remote / "locked.txt"
        locked.write_text("v2, written where the agent cannot read it\n")
        os.chown(locked, 0, 0)
        os.chmod(locked, 0)
        box = remote / "box"
        os.chown(box, 0, 0)
        os.chmod(box, 0)
        (remote / "marker.txt").write_text("m1\n")
        wait_until(lambda: text(local / "marker.txt") == "m1\n", WAIT, message="the marker's change", session=session)
        time.sleep(0.5)
        assert text(local / "locked.txt") == "v1\n", session.describe()

        # A restart scans both sides in full: still no deletion.
        session.stop()
        session = start_session(server, local, remote, state, name="s2")
        (remote / "marker.txt").write_text("m2\n")
        wait_until(lambda: text(local / "marker.txt") == "m2\n", WAIT,
                   message="the marker's change after the restart", session=session)
        time.sleep(0.5)
        assert text(local / "locked.txt") == "v1\n", session.describe()
        assert text(local / "box" / "inside.txt") == "in a directory the agent will not list\n", session.describe()
        assert text(local / "box" / "sub" / "deep.txt") == "below it\n", session.describe()
        assert locked.exists()

        # Readable again: the new content comes over.
        os.chmod(locked, 0o644)
        os.chmod(box, 0o755)
        wait_quiescent(local, remote, session, what="the file readable again")
        assert text(local / "locked.txt") == "v2, written where the agent cannot read it\n"
    finally:
        session.stop()
        for path in (remote / "locked.txt", remote / "box"):
            if path.exists():
                os.chmod(path, 0o755)


def test_a_directory_that_cannot_be_listed_survives_a_plain_full_scan(
        unprivileged_sshd: tuple[SshServer, Path, pwd.struct_passwd], tmp_path: Path) -> None:
    """After a cut, pending intents make the restart scan every path without fingerprints
    (and a dirty directory may be walked the same way): a directory met there that cannot
    be listed has unknown contents, which must not be taken for deletions either."""
    server, local, remote = roots(unprivileged_sshd)
    (local / "marker.txt").write_text("m0\n")
    (local / "box" / "sub").mkdir(parents=True)
    (local / "box" / "inside.txt").write_text("inside\n")
    (local / "box" / "sub" / "deep.txt").write_text("deep\n")
    state = tmp_path / "state"
    session = start_session(server, local, remote, state, name="s1")
    try:
        wait_quiescent(local, remote, session, what="initial push")
        session.stop()

        # An operation left unconfirmed by a cut (it did land: adopting it changes nothing).
        marker = remote / "marker.txt"
        st = marker.stat()
        row = Agreed("marker.txt", FILE, st.st_mode & 0o7777, st.st_size, st.st_mtime_ns,
                     digest_bytes(marker.read_bytes()), None, (local / "marker.txt").stat().st_ino, 0)
        add_intent(state, Intent("remote", "marker.txt", row))
        box = remote / "box"
        os.chown(box, 0, 0)
        os.chmod(box, 0)

        session = start_session(server, local, remote, state, name="s2")
        marker.write_text("m1\n")
        wait_until(lambda: text(local / "marker.txt") == "m1\n", WAIT,
                   message="the marker's change after the restart", session=session)
        time.sleep(0.5)
        assert text(local / "box" / "inside.txt") == "inside\n", session.describe()
        assert text(local / "box" / "sub" / "deep.txt") == "deep\n", session.describe()

        os.chmod(box, 0o755)
        wait_quiescent(local, remote, session, what="the directory readable again")
    finally:
        session.stop()
        if (remote / "box").exists():
            os.chmod(remote / "box", 0o755)


def test_changes_made_while_a_directory_was_unreadable_arrive_once_it_is_readable(
        unprivileged_sshd: tuple[SshServer, Path, pwd.struct_passwd], tmp_path: Path) -> None:
    """The agent still hears of changes inside a directory it can no longer search, but
    cannot look at them; when the directory opens again, the only event names the
    directory itself. The changes must arrive then, not at the next periodic rescan
    (300 s away here)."""
    server, local, remote = roots(unprivileged_sshd)
    (local / "marker.txt").write_text("m0\n")
    (local / "box").mkdir()
    (local / "box" / "edit.txt").write_text("e0\n")
    (local / "box" / "gone.txt").write_text("g0\n")
    session = start_session(server, local, remote, tmp_path / "state", name="s1")
    box = remote / "box"
    try:
        wait_quiescent(local, remote, session, what="initial push")
        os.chown(box, 0, 0)
        os.chmod(box, 0)
        (box / "edit.txt").write_text("e1, while the agent could not look\n")
        (box / "new.txt").write_text("n1\n")
        (box / "gone.txt").unlink()
        (remote / "marker.txt").write_text("m1\n")
        wait_until(lambda: text(local / "marker.txt") == "m1\n", WAIT, message="the marker's change", session=session)
        time.sleep(0.5)  # the cycles that heard of the changes in box have run
        assert text(local / "box" / "edit.txt") == "e0\n", session.describe()
        assert (local / "box" / "gone.txt").exists(), session.describe()

        os.chmod(box, 0o755)
        wait_until(lambda: (text(local / "box" / "edit.txt") == "e1, while the agent could not look\n"
                            and text(local / "box" / "new.txt") == "n1\n"
                            and not (local / "box" / "gone.txt").exists()),
                   WAIT, message="the changes made while the directory was unreadable", session=session)
        session.assert_alive()
    finally:
        session.stop()
        if box.exists():
            os.chmod(box, 0o755)
