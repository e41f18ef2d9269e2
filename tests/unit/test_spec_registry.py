"""Session declarations (SessionSpec) and the daemon's persisted registry (sessions.toml)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from syncd.daemon.registry import ConfigError, Registry, parse_sessions, read_toml
from syncd.daemon.toml_out import dumps_tables
from syncd.session.spec import SessionSpec, SpecError

BASE: dict[str, Any] = {"local": "/srv/work", "remote": "local:/srv/mirror"}

FULL = SessionSpec(
    name="full", local="/srv/work", remote="ssh://me@host:2222/srv/w", ignore=("*.o", "build/"),
    preserve_absent=(".env",), mode="pull", conflict_winner="newer", port=2200, identity="/k/id",
    known_hosts="/k/known", ssh_config="/k/cfg", remote_python="/usr/bin/python3.12",
)


def spec(**changes: Any) -> dict[str, Any]:
    return {**BASE, **changes}


# ---------------------------------------------------------------------------------------
# SessionSpec.from_dict
# ---------------------------------------------------------------------------------------

GOOD_REMOTES = ["local:/x", "host:/x", "me@host:/x", "ssh://host/x", "ssh://me@host:22/x",
                'exec:"docker exec -i box"::/work', "[::1]:/x"]


@pytest.mark.parametrize("remote", GOOD_REMOTES)
def test_from_dict_accepts_remote_forms(remote: str) -> None:
    assert SessionSpec.from_dict("w", spec(remote=remote)).remote == remote


@pytest.mark.parametrize("name", ["w", "W0", "a.b", "a_b-c", "9", "a" * 64])
def test_from_dict_accepts_names(name: str) -> None:
    assert SessionSpec.from_dict(name, BASE).name == name


def test_from_dict_defaults() -> None:
    got = SessionSpec.from_dict("w", BASE)
    assert got == SessionSpec("w", "/srv/work", "local:/srv/mirror")
    assert (got.mode, got.conflict_winner, got.remote_python, got.port) == ("two-way", "remote", "python3", None)
    assert got.ignore == () and got.preserve_absent == ()


REJECT: list[tuple[str, str, Any, str]] = [
    # (label, name, data, words in the message)
    ("empty name", "", BASE, "session name"),
    ("name with a space", "a b", BASE, "session name"),
    ("name with a slash", "a/b", BASE, "session name"),
    ("name starting with a dot", ".a", BASE, "session name"),
    ("name starting with a dash", "-a", BASE, "session name"),
    ("name too long", "a" * 65, BASE, "session name"),
    ("name not ascii", "café", BASE, "session name"),
    ("data not a map", "w", ["local", "/x"], "expected a table"),
    ("data None", "w", None, "expected a table"),
    ("no local", "w", {"remote": "local:/x"}, "local is required"),
    ("no remote", "w", {"local": "/x"}, "remote is required"),
    ("empty local", "w", spec(local=""), "local is required"),
    ("relative local", "w", spec(local="work/dir"), "must be absolute"),
    ("dot local", "w", spec(local="."), "must be absolute"),
    ("remote without path", "w", spec(remote="host:"), "cannot parse remote"),
    ("remote bare word", "w", spec(remote="justahost"), "cannot parse remote"),
    ("remote local: without path", "w", spec(remote="local:"), "local: needs a path"),
    ("remote ssh without host", "w", spec(remote="ssh:///x"), "no host"),
    ("remote ssh bad port", "w", spec(remote="ssh://h:99999/x"), "bad port"),
    ("remote ssh no path", "w", spec(remote="ssh://h"), "no path"),
    ("remote exec without path", "w", spec(remote="exec:docker exec -i b"), "exec: needs"),
    ("remote exec bad quoting", "w", spec(remote='exec:"docker::/x'), "exec command"),
    ("bad mode", "w", spec(mode="sideways"), "mode 'sideways'"),
    ("mode None", "w", spec(mode=None), "mode None"),
    ("bad winner", "w", spec(conflict_winner="both"), "conflict_winner"),
    ("unknown key", "w", spec(colour="blue"), "unknown setting 'colour'"),
    ("name as a key", "w", spec(name="other"), "unknown setting 'name'"),
    ("paused is not a spec key", "w", spec(paused=True), "unknown setting 'paused'"),
    ("local an int", "w", spec(local=5), "local must be a string"),
    ("remote a list", "w", spec(remote=["local:/x"]), "remote must be a string"),
    ("mode an int", "w", spec(mode=1), "mode must be a string"),
    ("identity bytes", "w", spec(identity=b"/k"), "identity must be a string"),
    ("ignore a string", "w", spec(ignore="*.o"), "ignore must be a list of strings"),
    ("ignore with an int", "w", spec(ignore=["*.o", 1]), "ignore must be a list of strings"),
    ("preserve_absent a map", "w", spec(preserve_absent={"a": 1}), "preserve_absent must be a list"),
    ("port a string", "w", spec(port="22"), "port must be an integer"),
    ("port a bool", "w", spec(port=True), "port must be an integer"),
    ("port a float", "w", spec(port=22.0), "port must be an integer"),
    ("port zero", "w", spec(port=0), "out of range"),
    ("port too big", "w", spec(port=65536), "out of range"),
    ("port negative", "w", spec(port=-1), "out of range"),
]


@pytest.mark.parametrize(("label", "name", "data", "words"), REJECT, ids=[r[0] for r in REJECT])
def test_from_dict_rejects(label: str, name: str, data: Any, words: str) -> None:
    with pytest.raises(SpecError) as info:
        SessionSpec.from_dict(name, data)
    assert words in str(info.value)


def test_from_dict_rejects_a_name_with_a_trailing_newline() -> None:
    with pytest.raises(SpecError):
        SessionSpec.from_dict("w\n", BASE)


@pytest.mark.parametrize("value", [None, ""], ids=["none", "empty"])
def test_from_dict_rejects_an_unset_remote_python(value: Any) -> None:
    with pytest.raises(SpecError):
        SessionSpec.from_dict("w", spec(remote_python=value))


@pytest.mark.parametrize("optional", ["identity", "known_hosts", "ssh_config", "port"])
def test_from_dict_optional_fields_accept_none(optional: str) -> None:
    assert getattr(SessionSpec.from_dict("w", spec(**{optional: None})), optional) is None


@pytest.mark.parametrize("value", [FULL, SessionSpec("min", "/a", "local:/b"),
                                   SessionSpec("uni", "/tmp/é ü/\"q\"\\b", "local:/ü", ignore=("ä*",))],
                         ids=["full", "minimal", "unicode"])
def test_to_dict_from_dict_round_trip(value: SessionSpec) -> None:
    data = value.to_dict()
    assert "name" not in data
    assert all(v is not None for v in data.values())
    assert all(not isinstance(v, tuple) for v in data.values())  # lists: plain data for msgpack / TOML
    assert SessionSpec.from_dict(value.name, data) == value


def test_to_dict_leaves_unset_options_out() -> None:
    data = SessionSpec("w", "/a", "local:/b").to_dict()
    assert set(data) == {"local", "remote", "ignore", "preserve_absent", "mode", "conflict_winner", "remote_python"}


def test_specs_compare_by_value() -> None:
    """The daemon's `add` idempotency compares specs with ==."""
    a = SessionSpec.from_dict("w", spec(ignore=["a", "b"]))
    assert a == SessionSpec.from_dict("w", spec(ignore=("a", "b")))
    assert a != SessionSpec.from_dict("w", spec(ignore=["b", "a"]))
    assert a != SessionSpec.from_dict("w", spec(ignore=["a", "b"], mode="push"))


# ---------------------------------------------------------------------------------------
# Registry: sessions.toml
# ---------------------------------------------------------------------------------------


AWKWARD = [
    'double "quotes" inside',
    "single 'quotes' inside",
    "back\\slash\\\\es and \\n not a newline",
    "tab\there",
    "newline\nand\rreturn",
    "unicode é ü ß 中文",
    "trailing backslash\\",
    "= [table] # not a comment",
    '"""triple"""',
    "control \x01\x1f",
]


def test_registry_round_trip(tmp_path: Path) -> None:
    registry = Registry(str(tmp_path))
    sessions = {
        "full": (FULL, False),
        "paused.one": (SessionSpec("paused.one", "/srv/p", "local:/srv/q"), True),
    }
    for i, text in enumerate(AWKWARD):
        name = f"awk-{i}"
        sessions[name] = (SessionSpec(name, f"/srv/{text}", f"local:/m/{text}", ignore=(text, "plain"),
                                      preserve_absent=(text,), identity=f"/k/{text}"), i % 2 == 0)
    registry.save(sessions)
    assert registry.load() == sessions
    text = (tmp_path / "sessions.toml").read_text()
    assert text.startswith("# Managed by syncd")
    assert tomllib.loads(text)["sessions"]["paused.one"]["paused"] is True
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_registry_empty_and_missing(tmp_path: Path) -> None:
    registry = Registry(str(tmp_path))
    assert registry.load() == {}  # no file yet
    registry.save({"a": (SessionSpec("a", "/a", "local:/b"), False)})
    registry.save({})
    assert registry.load() == {}


def test_registry_save_replaces(tmp_path: Path) -> None:
    registry = Registry(str(tmp_path))
    registry.save({"a": (SessionSpec("a", "/a", "local:/b"), False)})
    registry.save({"b": (SessionSpec("b", "/b", "local:/c"), True)})
    assert registry.load() == {"b": (SessionSpec("b", "/b", "local:/c"), True)}


def test_registry_round_trip_outside_the_bmp(tmp_path: Path) -> None:
    registry = Registry(str(tmp_path))
    sessions = {"emoji": (SessionSpec("emoji", "/srv/🙂 work", "local:/srv/𝄞", ignore=("*.🙂",)), False)}
    registry.save(sessions)
    assert registry.load() == sessions


def test_dumps_tables_output_is_valid_toml() -> None:
    text = dumps_tables({"sessions": {"a.b": {"x": 1, "y": True, "z": [1, "s"], "f": 1.5}}})
    assert tomllib.loads(text) == {"sessions": {"a.b": {"x": 1, "y": True, "z": [1, "s"], "f": 1.5}}}
    with pytest.raises(TypeError):
        dumps_tables({"sessions": {"a": {"x": {"nested": 1}}}})


# ---------------------------------------------------------------------------------------
# malformed files
# ---------------------------------------------------------------------------------------

MALFORMED_TOML = [
    ("unterminated string", '[sessions.a]\nlocal = "/a\n'),
    ("missing value", "[sessions.a]\nlocal =\n"),
    ("duplicate key", '[sessions.a]\nlocal = "/a"\nlocal = "/b"\n'),
    ("duplicate table", '[sessions.a]\nlocal = "/a"\n[sessions.a]\nremote = "local:/b"\n'),
    ("not toml at all", "{ this is json: true }\n"),
    ("binary", "\x00\x01\x02"),
]


@pytest.mark.parametrize(("label", "text"), MALFORMED_TOML, ids=[m[0] for m in MALFORMED_TOML])
def test_malformed_toml_names_the_file(tmp_path: Path, label: str, text: str) -> None:
    path = tmp_path / "sessions.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        Registry(str(tmp_path)).load()
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert "not valid TOML" in message
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_toml(str(path))


def test_unreadable_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sessions.toml"
    path.mkdir()  # a directory where the file should be: IsADirectoryError
    with pytest.raises(ConfigError) as info:
        read_toml(str(path))
    assert str(path) in str(info.value)


BAD_STRUCTURE: list[tuple[str, str, str]] = [
    ("sessions not a table", "sessions = 1\n", "[sessions] must be a table of tables"),
    ("session not a table", "[sessions]\na = 1\n", "sessions.a must be a table"),
    ("paused not a bool", '[sessions.a]\nlocal = "/a"\nremote = "local:/b"\npaused = "yes"\n',
     "sessions.a.paused must be true or false"),
    ("unknown key", '[sessions.a]\nlocal = "/a"\nremote = "local:/b"\nspeed = 3\n', "unknown setting 'speed'"),
    ("bad name", '[sessions."bad name"]\nlocal = "/a"\nremote = "local:/b"\n', "session name"),
    ("relative local", '[sessions.a]\nlocal = "a"\nremote = "local:/b"\n', "must be absolute"),
    ("no remote", '[sessions.a]\nlocal = "/a"\n', "remote is required"),
    ("port a string", '[sessions.a]\nlocal = "/a"\nremote = "h:/b"\nport = "22"\n', "port must be an integer"),
]


@pytest.mark.parametrize(("label", "text", "words"), BAD_STRUCTURE, ids=[b[0] for b in BAD_STRUCTURE])
def test_parse_sessions_structure_errors(tmp_path: Path, label: str, text: str, words: str) -> None:
    path = tmp_path / "syncd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        parse_sessions(str(path), read_toml(str(path)))
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert words in message, message


def test_parse_sessions_reads_paused_and_ignores_other_tables(tmp_path: Path) -> None:
    text = ('[daemon]\nsocket = "/run/x.sock"\n\n[sessions.a]\nlocal = "/a"\nremote = "local:/b"\n'
            'ignore = ["*.o"]\npaused = true\n\n[sessions.b]\nlocal = "/c"\nremote = "h:/d"\nport = 2222\n')
    got = parse_sessions("cfg", tomllib.loads(text))
    assert got == {
        "a": (SessionSpec("a", "/a", "local:/b", ignore=("*.o",)), True),
        "b": (SessionSpec("b", "/c", "h:/d", port=2222), False),
    }
    assert parse_sessions("cfg", {}) == {}
