"""``systemd-analyze verify`` on the shipped units (issue 4).

The units name /usr/local/bin/syncd (system) or %h/.local/bin/syncd (user), which need
not exist here, and verify checks that ExecStart= is executable: copies with the binary
replaced by the real ``syncd`` script are verified instead. The user unit is also verified
as shipped, with $HOME pointing at a directory whose .local/bin/syncd is that script.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.systemd_util import UNITS_DIR, parse_unit, real_syncd, unit_with_exec

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

pytestmark = [
    pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is missing (apt-get install systemd)"),
    pytest.mark.timeout(60),
]

# (shipped file, unit name verified, --user?)
UNITS = [
    ("syncd.service", "syncd.service", False),
    ("syncd@.service", "syncd@demo.service", False),
    ("syncd-user.service", "syncd-user.service", True),
]


def _syncd() -> str:
    path = real_syncd()
    if path is None:
        pytest.skip("no syncd console script (pip install -e .)")
    return path


def verify(unit_dir: Path, unit: str, *, user: bool, home: Path) -> tuple[int, list[str]]:
    """Run ``systemd-analyze verify`` on *unit* in *unit_dir*; (exit status, output lines)."""
    assert SYSTEMD_ANALYZE is not None
    runtime = home / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = dict(os.environ, HOME=str(home), XDG_RUNTIME_DIR=str(runtime), SYSTEMD_LOG_COLOR="0")
    argv = [SYSTEMD_ANALYZE, "verify", "--man=no", *(["--user"] if user else []), str(unit_dir / unit)]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=45,
                            stdin=subprocess.DEVNULL, check=False)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return result.returncode, lines


def ours(lines: list[str], unit_dir: Path, unit: str) -> list[str]:
    """The lines about our unit (others may be about unrelated units of this machine)."""
    template = unit.split("@")[0] + "@" if "@" in unit else unit
    return [line for line in lines if str(unit_dir) in line or unit in line or template in line
            or "syncd" in line]


def assert_clean(unit_dir: Path, unit: str, *, user: bool, home: Path) -> None:
    code, lines = verify(unit_dir, unit, user=user, home=home)
    problems = ours(lines, unit_dir, unit)
    text = "\n".join(lines)
    assert problems == [], f"systemd-analyze verify {unit} (exit {code}):\n{text}"
    # A failing status must come from unrelated units, which then said something.
    assert code == 0 or lines, f"systemd-analyze verify {unit} exited {code} without a message"
    if code != 0:
        pytest.fail(f"systemd-analyze verify {unit} exited {code}; other units' messages:\n{text}")


@pytest.mark.parametrize(("shipped", "unit", "user"), UNITS, ids=[u[1] for u in UNITS])
def test_shipped_unit_verifies(shipped: str, unit: str, user: bool, tmp_path: Path) -> None:
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    (unit_dir / shipped).write_text(unit_with_exec((UNITS_DIR / shipped).read_text(), _syncd()))
    assert_clean(unit_dir, unit, user=user, home=tmp_path)


def test_user_unit_verifies_as_shipped(tmp_path: Path) -> None:
    """ExecStart=%h/.local/bin/syncd resolves against $HOME: no rewrite needed."""
    bindir = tmp_path / ".local" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "syncd").symlink_to(_syncd())
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    shutil.copy(UNITS_DIR / "syncd-user.service", unit_dir / "syncd-user.service")
    assert_clean(unit_dir, "syncd-user.service", user=True, home=tmp_path)


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """Control: the check above would see a bad key or a missing binary."""
    text = unit_with_exec((UNITS_DIR / "syncd.service").read_text(), str(tmp_path / "no-such-syncd"))
    text = text.replace("[Service]\n", "[Service]\nNoSuchSetting=yes\n")
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    (unit_dir / "syncd.service").write_text(text)
    code, lines = verify(unit_dir, "syncd.service", user=False, home=tmp_path)
    text = "\n".join(lines)
    assert code != 0, text
    assert "NoSuchSetting" in text and "no-such-syncd" in text, text


@pytest.mark.parametrize("shipped", [u[0] for u in UNITS])
def test_shipped_unit_contract(shipped: str) -> None:
    """What issue 4 asks of every unit: notify, watchdog, restart on failure, reload, stop."""
    sections = dict(parse_unit((UNITS_DIR / shipped).read_text()))
    service = dict(sections["Service"])
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["Restart"] == "on-failure"
    assert service.get("WatchdogSec"), "no WatchdogSec="
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["ExecStart"].split()[1] == "daemon"
    assert "WantedBy" in dict(sections["Install"])
    if shipped != "syncd-user.service":
        assert service.get("RuntimeDirectory", "").startswith("syncd")
        assert service.get("StateDirectory", "").startswith("syncd")
