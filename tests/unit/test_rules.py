"""syncd.rules: gitignore-syntax ignore and preserve-absent matching.

Table-driven; the last test compares with git itself on random trees when git is installed.
This file also runs under Python 3.8 (the agent's floor), like the module it tests.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest

from syncd.rules import DEFAULT_EXCLUDES, PatternSet, Rules, load_root_rules

# --------------------------------------------------------------------------- PatternSet

# (patterns, path, is_dir, expected): expected is PatternSet.match's verdict for the path
# itself (True ignored, False re-included by '!', None no pattern matched).
PATTERN_CASES: List[Tuple[Sequence[str], str, bool, Optional[bool]]] = [
    # blank lines and comments
    ([""], "a", False, None),
    (["   "], "a", False, None),
    (["#a"], "#a", False, None),
    (["# a"], "# a", False, None),
    (["\\#a"], "#a", False, True),
    (["a#"], "a#", False, True),
    # trailing spaces trimmed unless escaped; tabs are not trimmed
    (["a  "], "a", False, True),
    (["a\\ "], "a ", False, True),
    (["a\\ "], "a", False, None),
    (["a\\  "], "a ", False, True),
    (["a\t"], "a", False, None),
    (["a\t"], "a\t", False, True),
    # negation and its escape
    (["!a"], "a", False, False),
    (["\\!a"], "!a", False, True),
    (["\\!a"], "a", False, None),
    (["!"], "!", False, None),
    (["*.log", "!keep.log"], "keep.log", False, False),
    (["*.log", "!keep.log"], "x.log", False, True),
    (["!keep.log", "*.log"], "keep.log", False, True),  # the later pattern wins
    (["*.log", "!keep.log", "keep.*"], "keep.log", False, True),
    # no slash: any depth; a leading or middle slash anchors to the base
    (["a"], "a", False, True),
    (["a"], "x/y/a", False, True),
    (["a"], "x/a/y", False, None),  # PatternSet looks at the path itself only
    (["/a"], "a", False, True),
    (["/a"], "x/a", False, None),
    (["x/a"], "x/a", False, True),
    (["x/a"], "y/x/a", False, None),
    (["doc/frotz/"], "doc/frotz", True, True),
    (["doc/frotz/"], "a/doc/frotz", True, None),
    (["//a"], "a", False, None),
    # trailing slash: directories only
    (["build/"], "build", True, True),
    (["build/"], "build", False, None),
    (["build/"], "x/build", True, True),
    (["build"], "build", False, True),
    (["build"], "build", True, True),
    (["/"], "a", True, None),
    # '*' and '?' do not match '/'
    (["*.py"], "a/b.py", False, True),
    (["*.py"], "b.py", False, True),
    (["*.py"], ".py", False, True),
    (["/*.py"], "a/b.py", False, None),
    (["a/*.py"], "a/b/c.py", False, None),
    (["a/*"], "a/b", True, True),
    (["a/*"], "a", True, None),
    (["*"], ".hidden", False, True),
    (["?.c"], "a.c", False, True),
    (["?.c"], "ab.c", False, None),
    (["x/a?b"], "x/a/b", False, None),
    (["x/a*b"], "x/a/b", False, None),
    (["x/a*b"], "x/aZZb", False, True),
    # bracket expressions
    (["[abc].txt"], "b.txt", False, True),
    (["[abc].txt"], "d.txt", False, None),
    (["[!abc].txt"], "b.txt", False, None),
    (["[!abc].txt"], "d.txt", False, True),
    (["[^abc].txt"], "d.txt", False, True),
    (["[a-c]x"], "bx", False, True),
    (["[a-c]x"], "dx", False, None),
    (["[]]"], "]", False, True),
    (["[!]]"], "a", False, True),
    (["[!]]"], "]", False, None),
    (["[a-]"], "-", False, True),
    (["[z-a]"], "z", False, True),  # as in git: the start of an empty range still counts
    (["[z-a]"], "m", False, None),
    (["[[:digit:]]*"], "1abc", False, True),
    (["[[:digit:]]*"], "abc", False, None),
    (["[[:alpha:][:digit:]]"], "7", False, True),
    (["[![:lower:]]"], "a", False, None),
    (["[![:lower:]]"], "A", False, True),
    (["[[:nope:]]"], "n", False, None),  # unknown class: never matches
    (["[abc"], "[abc", False, None),  # unterminated: never matches
    (["[abc"], "a", False, None),
    (["x/a[/]b"], "x/a/b", False, None),  # a class never matches '/'
    (["x/a[!b]b"], "x/a/b", False, None),
    (["[\\]]"], "]", False, True),
    (["[&&]"], "&", False, True),
    # backslash escapes
    (["\\*"], "*", False, True),
    (["\\*"], "a", False, None),
    (["\\?"], "?", False, True),
    (["\\[a]"], "[a]", False, True),
    (["a\\"], "a", False, None),  # trailing backslash: never matches
    # '**'
    (["**/foo"], "foo", False, True),
    (["**/foo"], "a/b/foo", False, True),
    (["**/foo/bar"], "foo/bar", False, True),
    (["**/foo/bar"], "x/y/foo/bar", False, True),
    (["**/foo/bar"], "x/foo/baz", False, None),
    (["abc/**"], "abc/x", False, True),
    (["abc/**"], "abc/x/y", True, True),
    (["abc/**"], "abc", True, None),
    (["a/**/b"], "a/b", False, True),
    (["a/**/b"], "a/x/b", False, True),
    (["a/**/b"], "a/x/y/b", False, True),
    (["a/**/b"], "a/xb", False, None),
    (["a/**/b"], "b", False, None),
    (["**"], "x/y", False, True),
    (["x/**/"], "x/y", True, True),
    (["x/**/"], "x/y", False, None),
    (["a**b"], "axxb", False, True),  # not a whole component: a plain '*'
    (["a**b"], "a/x/b", False, None),
    (["x/a**b"], "x/a/y/b", False, None),
    (["x/a**/b"], "x/a/y/b", False, True),  # git quirk: '**' right after the literal prefix
    (["x/a**/b"], "x/ab", False, True),
    (["/a**"], "ab/c", False, True),  # same quirk
    (["/x/a**"], "x/ab/c", False, True),
    (["/x/*a**"], "x/ba/c", False, None),  # the prefix ends at '*', so the second '**' is '*'
    # names that are not UTF-8 (surrogate-escaped) and other odd characters
    (["caf\udce9"], "x/caf\udce9", False, True),
    (["caf?"], "caf\udce9", False, True),
    (["*.txt"], "\udcff.txt", False, True),
    (["[\udce9]"], "\udce9", False, True),
    (["*"], "a\nb", False, True),
    (["x/**"], "x/a\nb", False, True),
    (["a"], "a\n", False, None),
    (["a.b"], "axb", False, None),
    (["a+b(c)"], "a+b(c)", False, True),
    (["é*"], "éa", False, True),
    (["CASE"], "case", False, None),  # case-sensitive
]


@pytest.mark.parametrize("patterns, path, is_dir, expected", PATTERN_CASES)
def test_pattern_set_match(patterns: Sequence[str], path: str, is_dir: bool, expected: Optional[bool]) -> None:
    assert PatternSet(patterns).match(path, is_dir) is expected


# (patterns, base, path, is_dir, expected): patterns of a nested .gitignore in `base`.
BASE_CASES: List[Tuple[Sequence[str], str, str, bool, Optional[bool]]] = [
    (["*.o"], "sub", "sub/a.o", False, True),
    (["*.o"], "sub", "sub/x/y/a.o", False, True),
    (["*.o"], "sub", "a.o", False, None),
    (["*.o"], "sub", "other/a.o", False, None),
    (["*.o"], "sub", "subx/a.o", False, None),
    (["sub"], "sub", "sub", True, None),  # the base itself is not below the base
    (["/a"], "sub", "sub/a", False, True),
    (["/a"], "sub", "sub/x/a", False, None),
    (["/a"], "sub", "a", False, None),
    (["x/a"], "sub", "sub/x/a", False, True),
    (["x/a"], "sub", "x/a", False, None),
    (["**/a"], "s/t", "s/t/a", False, True),
    (["**/a"], "s/t", "s/t/u/a", False, True),
    (["**/a"], "s/t", "s/a", False, None),
    (["a/**"], "s.t", "s.t/a/b", False, True),
    (["a/**"], "s.t", "sxt/a/b", False, None),  # the base is literal, not a pattern
    (["!keep"], "sub", "sub/keep", False, False),
]


@pytest.mark.parametrize("patterns, base, path, is_dir, expected", BASE_CASES)
def test_pattern_set_base(
    patterns: Sequence[str], base: str, path: str, is_dir: bool, expected: Optional[bool]
) -> None:
    assert PatternSet(patterns, base=base).match(path, is_dir) is expected


def test_pattern_set_keeps_its_input() -> None:
    ps = PatternSet(["# c", "*.o", "!a.o"], base="sub")
    assert ps.patterns == ("# c", "*.o", "!a.o")
    assert ps.base == "sub"
    assert bool(ps)
    assert not PatternSet(["", "# only a comment"])


# --------------------------------------------------------------------------- Rules

# (gitignores {directory: text}, info/exclude text, user ignore patterns, path, is_dir,
#  expected is_ignored). Default excludes are the module's defaults.
RULES_CASES: List[Tuple[Dict[str, str], str, Sequence[str], str, bool, bool]] = [
    # the root and .git are not ignored by default; AppleDouble files are
    ({}, "", [], "", True, False),
    ({}, "", [], ".git", True, False),
    ({}, "", [], ".git/config", False, False),
    ({}, "", [], ".git/info/exclude", False, False),
    ({}, "", [], "._foo", False, True),
    ({}, "", [], "x/._foo", False, True),
    ({}, "", [], "foo", False, False),
    # a path under an ignored directory stays ignored, whatever re-includes it
    ({"": "build/\n!build/keep.txt\n"}, "", [], "build/keep.txt", False, True),
    ({"": "build/\n!build/keep.txt\n"}, "", [], "build", True, True),
    ({"": "build/\n"}, "", [], "build/a/b/c.o", False, True),
    ({"": "build/\n"}, "", [], "src/build/c.o", False, True),
    ({"": "build/\n"}, "", [], "build", False, False),  # a file (or symlink) named build
    ({"": "node_modules/\n"}, "", [], "a/node_modules/x/y.js", False, True),
    ({"": "node_modules/\n"}, "", [], "a/node_modules", True, True),
    ({"": "/x\n"}, "", ["!x/y"], "x/y", False, True),
    # ... but '/*' + '!' can re-include a directory and some of its content
    ({"": "/*\n!/foo\n/foo/*\n!/foo/bar\n"}, "", [], "foo/bar", False, False),
    ({"": "/*\n!/foo\n/foo/*\n!/foo/bar\n"}, "", [], "foo/bar/deep", False, False),
    ({"": "/*\n!/foo\n/foo/*\n!/foo/bar\n"}, "", [], "foo/baz", False, True),
    ({"": "/*\n!/foo\n/foo/*\n!/foo/bar\n"}, "", [], "foo", True, False),
    ({"": "/*\n!/foo\n/foo/*\n!/foo/bar\n"}, "", [], "other", False, True),
    ({"": "*\n!*/\n!*.py\n"}, "", [], "src", True, False),
    ({"": "*\n!*/\n!*.py\n"}, "", [], "src/a.py", False, False),
    ({"": "*\n!*/\n!*.py\n"}, "", [], "src/a.txt", False, True),
    ({"": "secrets/**\n!secrets/public\n"}, "", [], "secrets/public", False, False),
    ({"": "secrets/**\n!secrets/public\n"}, "", [], "secrets/other", False, True),
    # nested .gitignore: applies below its directory only, and overrides shallower ones
    ({"": "*.log\n", "sub": "!keep.log\n"}, "", [], "sub/keep.log", False, False),
    ({"": "*.log\n", "sub": "!keep.log\n"}, "", [], "sub/x/keep.log", False, False),
    ({"": "*.log\n", "sub": "!keep.log\n"}, "", [], "keep.log", False, True),
    ({"": "*.log\n", "sub": "!keep.log\n"}, "", [], "other/keep.log", False, True),
    ({"": "*.log\n", "sub": "!keep.log\n"}, "", [], "sub/x.log", False, True),
    ({"sub": "/only\n"}, "", [], "sub/only", False, True),
    ({"sub": "/only\n"}, "", [], "sub/x/only", False, False),
    ({"sub": "/only\n"}, "", [], "only", False, False),
    ({"sub": "sub\n"}, "", [], "sub", True, False),
    ({"sub": "*\n"}, "", [], "sub", True, False),
    ({"sub": "*\n"}, "", [], "sub/a", False, True),
    ({"sub": "*\n"}, "", [], "subway/a", False, False),
    ({"a": "*.md\n", "a/b": "!x.md\n"}, "", [], "a/b/x.md", False, False),
    ({"a": "*.md\n", "a/b": "!x.md\n"}, "", [], "a/b/y.md", False, True),
    ({"a": "*.md\n", "a/b": "!x.md\n"}, "", [], "a/x.md", False, True),
    ({"a": "!*.md\n", "": "*.md\n"}, "", [], "a/b/x.md", False, False),  # deeper wins
    ({"a": "x/\n"}, "", [], "a/b/x/f", False, True),
    ({"a": "x/\n"}, "", [], "b/x/f", False, False),
    # .git/info/exclude: above the defaults, below every .gitignore
    ({}, "*.tmp\n", [], "a/b.tmp", False, True),
    ({"": "!a.tmp\n"}, "*.tmp\n", [], "a.tmp", False, False),
    ({}, "!._keep\n", [], "._keep", False, False),
    ({}, "!._keep\n", [], "._other", False, True),
    ({"": "*.tmp\n"}, "!a.tmp\n", [], "a.tmp", False, True),
    # user (command line) patterns come last and win
    ({"": "!*.log\n"}, "", ["*.log"], "x.log", False, True),
    ({"": "*.log\n"}, "", ["!x.log"], "x.log", False, False),
    ({"": "*.log\n"}, "", ["!x.log"], "y.log", False, True),
    ({"sub": "!x.log\n"}, "", ["*.log"], "sub/x.log", False, True),
    ({}, "", ["node_modules/", "*.o"], "lib/node_modules/a/b.js", False, True),
    ({}, "", ["node_modules/", "*.o"], "lib/a.o", False, True),
    ({}, "", ["node_modules/", "*.o"], "lib/a.c", False, False),
    # CRLF line ends and a UTF-8 BOM, as git reads them
    ({"": "\ufeff*.o\r\nbuild/\r\n"}, "", [], "x.o", False, True),
    ({"": "\ufeff*.o\r\nbuild/\r\n"}, "", [], "build", True, True),
    ({"": "Icon\r\r\n"}, "", [], "Icon\r", False, True),
]


def make_rules(gitignores: Dict[str, str], info: str, user: Sequence[str]) -> Rules:
    rules = Rules(ignore=user)
    for directory, text in gitignores.items():
        rules.add_gitignore(directory, text)
    rules.set_info_exclude(info)
    return rules


@pytest.mark.parametrize("gitignores, info, user, path, is_dir, expected", RULES_CASES)
def test_is_ignored(
    gitignores: Dict[str, str],
    info: str,
    user: Sequence[str],
    path: str,
    is_dir: bool,
    expected: bool,
) -> None:
    rules = make_rules(gitignores, info, user)
    assert rules.is_ignored(path, is_dir) is expected
    # Warm caches (the parent's verdict is cached by now) give the same answer.
    assert rules.is_ignored(path, is_dir) is expected


@pytest.mark.parametrize("gitignores, info, user, path, is_dir, expected", RULES_CASES)
def test_is_ignored_with_ancestors_queried_first(
    gitignores: Dict[str, str],
    info: str,
    user: Sequence[str],
    path: str,
    is_dir: bool,
    expected: bool,
) -> None:
    """A scanner asks about directories top-down; the cache must not change answers."""
    rules = make_rules(gitignores, info, user)
    parts = path.split("/")
    for depth in range(1, len(parts)):
        rules.is_ignored("/".join(parts[:depth]), True)
    assert rules.is_ignored(path, is_dir) is expected


# (preserve-absent patterns, path, is_dir, expected is_preserved)
PRESERVE = [".env", ".claude/", "secrets/**"]
PRESERVE_CASES: List[Tuple[Sequence[str], str, bool, bool]] = [
    (PRESERVE, ".env", False, True),
    (PRESERVE, "sub/.env", False, True),
    (PRESERVE, ".envrc", False, False),
    (PRESERVE, ".claude", True, True),
    (PRESERVE, ".claude", False, False),  # a file (or symlink) named .claude
    (PRESERVE, ".claude/settings.json", False, True),
    (PRESERVE, ".claude/a/b/c", False, True),
    (PRESERVE, ".claude/a", True, True),
    (PRESERVE, "x/.claude/settings.json", False, True),
    (PRESERVE, "secrets/key", False, True),
    (PRESERVE, "secrets/a/b", False, True),
    (PRESERVE, "secrets", True, False),  # 'secrets/**' is what is inside, not the directory
    (PRESERVE, "x/secrets/key", False, False),
    (PRESERVE, "src/a.py", False, False),
    (PRESERVE, "", True, False),
    ([".claude/", "!.claude/tmp"], ".claude/tmp", False, True),  # parent wins, as for ignore
    (["keep/*", "!keep/tmp"], "keep/tmp", False, False),
    ([], ".env", False, False),
]


@pytest.mark.parametrize("patterns, path, is_dir, expected", PRESERVE_CASES)
def test_is_preserved(patterns: Sequence[str], path: str, is_dir: bool, expected: bool) -> None:
    rules = Rules(preserve_absent=patterns)
    assert rules.is_preserved(path, is_dir) is expected
    assert rules.is_preserved(path, is_dir) is expected


def test_preserve_and_ignore_are_independent() -> None:
    rules = Rules(ignore=["*.log"], preserve_absent=[".env"])
    assert rules.is_ignored("a.log", False) and not rules.is_preserved("a.log", False)
    assert rules.is_preserved(".env", False) and not rules.is_ignored(".env", False)


# --------------------------------------------------------------------------- updates


def test_add_gitignore_replaces_and_remove_forgets() -> None:
    rules = Rules()
    assert not rules.is_ignored("sub/a.o", False)
    rules.add_gitignore("sub", "*.o\n")
    assert rules.is_ignored("sub/a.o", False)
    assert rules.is_ignored("sub/x", True) is False
    rules.add_gitignore("sub", "x/\n")  # replaces, does not add
    assert not rules.is_ignored("sub/a.o", False)
    assert rules.is_ignored("sub/x", True)
    assert rules.is_ignored("sub/x/y.c", False)
    rules.remove_gitignore("sub")
    assert not rules.is_ignored("sub/x/y.c", False)
    assert rules.gitignore_dirs == ()
    rules.remove_gitignore("never-added")


def test_root_gitignore_and_dir_spellings() -> None:
    rules = Rules()
    rules.add_gitignore("", "*.o\n")
    assert rules.is_ignored("a/b.o", False)
    rules.add_gitignore(".", "*.c\n")  # "." is the root too
    assert rules.is_ignored("a/b.c", False) and not rules.is_ignored("a/b.o", False)
    rules.add_gitignore("sub/", "*.h\n")
    assert rules.gitignore_dirs == ("", "sub")
    assert rules.is_ignored("sub/b.h", False) and not rules.is_ignored("b.h", False)


def test_cached_directory_verdicts_follow_updates() -> None:
    rules = Rules()
    assert not rules.is_ignored("a/b/c.txt", False)  # caches a and a/b as not ignored
    rules.add_gitignore("a", "b/\n")
    assert rules.is_ignored("a/b/c.txt", False)
    rules.set_info_exclude("/a\n")
    rules.add_gitignore("a", "")
    assert rules.is_ignored("a/b/c.txt", False)
    rules.set_info_exclude("")
    assert not rules.is_ignored("a/b/c.txt", False)


def test_nested_then_flat_again() -> None:
    rules = Rules()
    rules.add_gitignore("", "*.o\n")
    assert rules.is_ignored("x/a.o", False)
    rules.add_gitignore("x", "!a.o\n")
    assert not rules.is_ignored("x/a.o", False)
    assert rules.is_ignored("y/a.o", False)
    rules.remove_gitignore("x")
    assert rules.is_ignored("x/a.o", False)


def test_deep_paths_do_not_recurse() -> None:
    rules = Rules(ignore=["d7/"])
    deep = "/".join("d%d" % (i % 7) for i in range(3000))
    assert not rules.is_ignored(deep + "/f", False)
    assert rules.is_ignored(deep + "/d7/f", False)


def test_wrong_argument_types() -> None:
    with pytest.raises(TypeError):
        Rules(ignore="*.log")  # one string is not a list of patterns
    with pytest.raises(TypeError):
        Rules(preserve_absent=[b".env"])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        PatternSet("*.o")
    with pytest.raises(TypeError):
        Rules().add_gitignore("", b"*.o")  # type: ignore[arg-type]


def test_default_excludes() -> None:
    assert DEFAULT_EXCLUDES == ("._*",)
    assert Rules().default_excludes == DEFAULT_EXCLUDES
    none = Rules(default_excludes=())
    assert not none.is_ignored("._foo", False)
    custom = Rules(default_excludes=[".DS_Store"])
    assert custom.is_ignored("a/.DS_Store", False) and not custom.is_ignored("._foo", False)


# --------------------------------------------------------------------------- wire


def test_wire_round_trip() -> None:
    rules = Rules(
        ignore=["*.o", "!keep.o", "build/"],
        preserve_absent=[".env", ".claude/", "secrets/**"],
        default_excludes=["._*", ".DS_Store"],
    )
    rules.add_gitignore("", "*.log\n")  # not sent: each side reads its own tree
    data = rules.to_wire()
    assert data == {
        "ignore": ["*.o", "!keep.o", "build/"],
        "preserve_absent": [".env", ".claude/", "secrets/**"],
        "default_excludes": ["._*", ".DS_Store"],
    }
    assert all(type(v) is list and all(type(s) is str for s in v) for v in data.values())
    again = Rules.from_wire(json.loads(json.dumps(data)))
    assert again.to_wire() == data
    for path, is_dir in [
        ("a.o", False),
        ("keep.o", False),
        ("x/build", True),
        (".DS_Store", False),
        (".claude/x", False),
        ("secrets/k", False),
        ("a.log", False),
    ]:
        assert again.is_preserved(path, is_dir) == rules.is_preserved(path, is_dir)
        if path != "a.log":
            assert again.is_ignored(path, is_dir) == rules.is_ignored(path, is_dir)
    assert not again.is_ignored("a.log", False)


def test_from_wire_defaults_and_errors() -> None:
    assert Rules.from_wire({}).to_wire() == {
        "ignore": [],
        "preserve_absent": [],
        "default_excludes": list(DEFAULT_EXCLUDES),
    }
    with pytest.raises(ValueError):
        Rules.from_wire({"ignore": ["a"], "bogus": []})
    with pytest.raises(ValueError):
        Rules.from_wire({"ignore": "*.o"})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        Rules.from_wire({"ignore": [1]})  # type: ignore[list-item]
    with pytest.raises(ValueError):
        Rules.from_wire([])  # type: ignore[arg-type]


def test_wire_keys_are_load_root_rules_keywords(tmp_path: Path) -> None:
    (tmp_path / "a.o").write_text("")
    data = Rules(ignore=["*.o"], preserve_absent=[".env"]).to_wire()
    rules = load_root_rules(str(tmp_path), **data)
    assert rules.is_ignored("a.o", False) and rules.is_preserved(".env", False)


# --------------------------------------------------------------------------- load_root_rules


def write(root: Path, rel: str, content: bytes = b"") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    write(root, ".git/config", b"[core]\n")
    write(root, ".git/info/exclude", b"# git's template comment\n*.secret\n")
    write(root, ".git/.gitignore", b"*\n")  # git never reads this; neither do we
    write(root, ".gitignore", b"node_modules/\n*.log\n!keep.log\n/build/\nraw\xff\n")
    write(root, "keep.log")
    write(root, "top.log")
    write(root, "a.secret")
    write(root, "raw\udcff")  # the name b"raw\xff", as os.fsdecode gives it
    write(root, "caf\udce9.log")
    write(root, "src/.gitignore", b"*.gen\n!important.log\n")
    write(root, "src/a.py")
    write(root, "src/b.gen")
    write(root, "src/important.log")
    write(root, "src/x.log")
    write(root, "src/deep/.gitignore", b"/local\n")
    write(root, "src/deep/local")
    write(root, "src/deep/x/local")
    write(root, "src/build/out.o")  # '/build/' is anchored at the root
    # Ignored directories: their .gitignore files must not even be read.
    write(root, "node_modules/pkg/.gitignore", b"!*\n")
    write(root, "node_modules/pkg/index.js")
    write(root, "build/.gitignore", b"!*\n")
    write(root, "build/out.o")
    # Symlinks are not followed: not to a directory, not as a .gitignore.
    os.symlink("src", str(root / "link"))
    write(root, "other/real-ignore", b"*\n")
    os.symlink("real-ignore", str(root / "other" / ".gitignore"))
    write(root, "other/file")
    return root


def test_load_root_rules(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scanned: List[str] = []
    real_scandir = os.scandir

    def recording_scandir(path: str) -> Any:
        scanned.append(os.path.relpath(path, str(tree)))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", recording_scandir)
    rules = load_root_rules(str(tree), ignore=["*.py"], preserve_absent=[".env"])
    monkeypatch.undo()

    assert rules.gitignore_dirs == ("", "src", "src/deep")
    assert sorted(scanned) == [".", "other", "src", "src/build", "src/deep", "src/deep/x"]

    expected = {
        ("keep.log", False): False,
        ("top.log", False): True,
        ("a.secret", False): True,  # .git/info/exclude
        ("raw\udcff", False): True,  # a non-UTF-8 pattern matches the non-UTF-8 name
        ("caf\udce9.log", False): True,
        ("src/a.py", False): True,  # user pattern
        ("src/b.gen", False): True,
        ("src/important.log", False): False,
        ("src/x.log", False): True,
        ("src/deep/local", False): True,
        ("src/deep/x/local", False): False,
        ("src/build/out.o", False): False,
        ("build", True): True,
        ("build/out.o", False): True,
        ("node_modules", True): True,
        ("node_modules/pkg/index.js", False): True,
        ("link", False): False,
        ("other/file", False): False,
        (".git", True): False,
        (".git/config", False): False,
        (".gitignore", False): False,
    }
    got = {key: rules.is_ignored(*key) for key in expected}
    assert got == expected
    assert rules.is_preserved(".env", False)


def test_load_root_rules_without_git_dir(tmp_path: Path) -> None:
    write(tmp_path, "a.o")
    write(tmp_path, "b.c")
    rules = load_root_rules(str(tmp_path), ignore=["*.o"])
    assert rules.is_ignored("a.o", False) and not rules.is_ignored("b.c", False)
    assert rules.gitignore_dirs == ()


def test_load_root_rules_git_file_is_not_a_git_dir(tmp_path: Path) -> None:
    # A worktree or submodule has a '.git' file pointing elsewhere: no info/exclude here.
    write(tmp_path, ".git", b"gitdir: /elsewhere\n")
    write(tmp_path, "x.tmp")
    assert not load_root_rules(str(tmp_path)).is_ignored("x.tmp", False)


def test_load_root_rules_missing_root(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        load_root_rules(str(tmp_path / "nope"))


# --------------------------------------------------------------------------- speed


def test_fifty_thousand_paths_are_fast() -> None:
    gitignore = "\n".join(
        ["# build output", "__pycache__/", "*.py[cod]", "build/", "dist/", "*.egg-info/"]
        + ["node_modules/", ".venv", "*.log", "!keep.log", "/site", "**/generated/**"]
        + ["*.tmp", ".coverage.*", "docs/_build/", ".mypy_cache/", "*.so", "coverage.xml"]
    )
    rules = Rules(ignore=["*.bak", "!important.bak"], preserve_absent=[".env", ".claude/"])
    rules.add_gitignore("", gitignore)
    rules.add_gitignore("pkg3", "*.md\n!README.md\n")
    exts = ["py", "txt", "log", "js", "pyc", "md"]
    paths = ["pkg%d/sub%d/mod%d/f%d.%s" % (i % 7, i % 31, i % 97, i, exts[i % len(exts)]) for i in range(50_000)]
    start = time.process_time()
    ignored = sum(rules.is_ignored(p, False) for p in paths)
    elapsed = time.process_time() - start
    assert 0 < ignored < len(paths)
    # Typically ~0.1 s; the bound only catches a pathological regression.
    assert elapsed < 2.0, elapsed


# --------------------------------------------------------------------------- versus git

NAMES = ["a", "b", "ab", "a.py", "b.txt", "x", ".h", "a b", "]", "#x", "!a", "[", "c"]
TOKENS = ["a", "b", "ab", "x", ".py", "*", "?", "**", "[ab]", "[!a]", "[a-b]", "*.py"]
TOKENS += ["a*", "*b", "a**", "**a", "[", "[[:alpha:]]", "[]a]", "[z-a]", "\\*", "\\", "a "]
TOKENS += ["#", "\\#", "\\!", "a\\ ", "[a-]", "***"]


def _random_pattern(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 3)):
        parts.append("".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 2))))
    pattern = "/".join(parts)
    if rng.random() < 0.2:
        pattern = "/" + pattern
    if rng.random() < 0.2:
        pattern += "/"
    if rng.random() < 0.25:
        pattern = "!" + pattern
    if rng.random() < 0.1:
        pattern = "**/" + pattern.lstrip("!")
    return pattern


def _random_tree(rng: random.Random, root: Path) -> Tuple[List[str], List[str]]:
    files: List[str] = []
    dirs: List[str] = []

    def fill(rel: str, depth: int) -> None:
        for name in rng.sample(NAMES, rng.randint(1, 4)):
            path = rel + "/" + name if rel else name
            if depth < 3 and rng.random() < 0.5:
                (root / path).mkdir()
                dirs.append(path)
                fill(path, depth + 1)
            else:
                (root / path).write_bytes(b"")
                files.append(path)

    fill("", 0)
    return files, dirs


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.parametrize("seed", range(40))
def test_agrees_with_git(seed: int, tmp_path: Path) -> None:
    """The files git lists as ignored are exactly those is_ignored reports."""
    rng = random.Random(seed)
    root = tmp_path / "repo"
    env = dict(os.environ, HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    subprocess.run(["git", "init", "-q", str(root)], check=True, env=env)
    files, dirs = _random_tree(rng, root)
    for directory in [""] + rng.sample(dirs, min(len(dirs), rng.randint(0, 2))):
        lines = [_random_pattern(rng) for _ in range(rng.randint(1, 5))]
        (root / directory / ".gitignore").write_text("\n".join(lines) + "\n")
        files.append(directory + "/.gitignore" if directory else ".gitignore")
    info = [_random_pattern(rng) for _ in range(rng.randint(0, 2))]
    (root / ".git" / "info").mkdir(exist_ok=True)
    (root / ".git" / "info" / "exclude").write_text("\n".join(info) + "\n")
    # Command-line patterns (-x) skip the line syntax: no comments, no trimming.
    user = [_random_pattern(rng) for _ in range(rng.randint(0, 2))]
    user = [u for u in user if not u.startswith("#") and not u.endswith(" ")]
    cmd = ["git", "-C", str(root), "ls-files", "-z", "-o", "-i", "--exclude-standard"]
    for pattern in user:
        cmd += ["-x", pattern]
    out = subprocess.run(cmd, check=True, capture_output=True, env=env).stdout
    by_git = {os.fsdecode(p) for p in out.split(b"\0") if p}

    rules = load_root_rules(str(root), ignore=user, default_excludes=())
    by_us = {f for f in files if rules.is_ignored(f, False)}
    assert by_us == by_git
