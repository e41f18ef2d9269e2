"""Ignore and preserve-absent rules with gitignore(5) syntax.

This module is shipped to remote hosts as part of the agent: it must run on Python 3.8
with the standard library only (no 3.9+ features outside annotations).

Paths are relative POSIX-style ``str`` paths from the sync root: '/' separators, no leading
or trailing slash (``src/a.py``, ``.git/info/exclude``). Names that are not UTF-8 arrive
surrogate-escaped (``os.fsdecode``) and are matched as they are, never encoded.

Patterns follow git's ``wildmatch`` with ``WM_PATHNAME``: ``*``, ``?`` and ``[...]`` never
match '/', ``**`` spans directories only when it is a whole path component (``**/x``,
``x/**``, ``x/**/y``); elsewhere it is a plain ``*`` (but see ``_translate`` for the one
place where git differs from its documentation). Matching is case-sensitive (git's default
on Linux). The behaviour was checked against ``git ls-files -o -i --exclude-standard`` on
thousands of random trees and pattern files.

Speed: ``is_ignored`` runs for every path of large trees. Patterns are compiled once;
consecutive patterns with the same sign form one step ("last match wins" only needs the
order of steps), tested cheapest first: literal names (a set), ``*.ext`` suffixes
(``str.endswith``), then one combined regex for the basename and one for the whole path.
Verdicts for directories are cached, so a file costs one dictionary look-up for its parent
plus a few steps.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from typing import Callable, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple

__all__ = ["DEFAULT_EXCLUDES", "PatternSet", "Rules", "load_root_rules"]

#: Patterns excluded unless the caller passes other defaults: AppleDouble files. The ``.git``
#: directory is deliberately not excluded: it is synced.
DEFAULT_EXCLUDES: Tuple[str, ...] = ("._*",)

#: Wire keys, also the keyword names of ``Rules`` and ``load_root_rules``.
_WIRE_KEYS = ("ignore", "preserve_absent", "default_excludes")

#: Same limit as git (``PATTERN_MAX_FILE_SIZE``): larger ignore files are not read.
_MAX_IGNORE_FILE_SIZE = 100 * 1024 * 1024

#: Bound on cached per-directory results; the cache is simply cleared when it is reached.
_CACHE_MAX = 1 << 18

_UTF8_BOM = b"\xef\xbb\xbf"

# ASCII character classes, as git's sane ctype defines them.
_POSIX_CLASSES = {
    "alnum": "0-9A-Za-z",
    "alpha": "A-Za-z",
    "blank": " \\t",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "\\x21-\\x7e",
    "lower": "a-z",
    "print": "\\x20-\\x7e",
    "punct": "\\x21-\\x2f\\x3a-\\x40\\x5b-\\x60\\x7b-\\x7e",
    "space": "\\t\\n\\x0b\\x0c\\r ",
    "upper": "A-Z",
    "xdigit": "0-9A-Fa-f",
}

_Matcher = Callable[[str], Optional["re.Match[str]"]]


# --------------------------------------------------------------------------- translation


def _class_char(c: str) -> str:
    """A single character as a member of a regex character class."""
    return re.escape(c)


def _translate_bracket(pat: str, i: int) -> Tuple[Optional[str], int]:
    """Translate the bracket expression whose '[' is at ``pat[i]``, as wildmatch parses it.

    Returns (regex or None if the pattern can never match, index after the closing ']').
    A class never matches '/'.
    """
    n = len(pat)
    i += 1
    negated = False
    if i < n and pat[i] in "!^":
        negated = True
        i += 1
    members: List[str] = []
    prev: Optional[str] = None  # previous literal, the possible start of a range
    first = True
    while True:
        if i >= n:
            return None, n  # unterminated: wildmatch aborts, the pattern never matches
        c = pat[i]
        if c == "]" and not first:
            break
        first = False
        if c == "\\":
            i += 1
            if i >= n:
                return None, n
            c = pat[i]
            members.append(_class_char(c))
            prev = c
        elif c == "-" and prev is not None and i + 1 < n and pat[i + 1] != "]":
            i += 1
            hi = pat[i]
            if hi == "\\":
                i += 1
                if i >= n:
                    return None, n
                hi = pat[i]
            # The start was already added as a literal: wildmatch matches it even when the
            # range is empty ("[z-a]" matches "z").
            if prev <= hi:
                members.append(_class_char(prev) + "-" + _class_char(hi))
            prev = None
        elif c == "[" and i + 1 < n and pat[i + 1] == ":":
            end = pat.find("]", i + 2)
            if end < 0:
                return None, n
            name_end = end - 1
            if name_end < i + 2 or pat[name_end] != ":":
                # No ":]": the '[' is an ordinary member; go on after it.
                members.append(_class_char("["))
                prev = "["
            else:
                cls = _POSIX_CLASSES.get(pat[i + 2 : name_end])
                if cls is None:
                    return None, n  # malformed [:class:]: wildmatch aborts
                members.append(cls)
                prev = None
                i = end
        else:
            members.append(_class_char(c))
            prev = c
        i += 1
    body = "".join(members)
    if negated:
        return "[^/" + body + "]", i + 1
    if not body:
        return "(?!)", i + 1
    return "(?!/)[" + body + "]", i + 1


def _translate(pat: str, anchored: bool) -> Optional[str]:
    """Translate a wildmatch pattern (WM_PATHNAME) to regex source; None if it can never match.

    Like git, an anchored pattern's literal prefix (up to the first of ``*?[\\``) is compared
    on its own and the rest handed to wildmatch, so a ``**`` right after that prefix counts
    as starting a component: ``/a**`` matches ``ab/c`` and ``foo**/bar`` matches
    ``foo/x/bar`` in git, whatever gitignore(5) says about "other consecutive asterisks".
    """
    out: List[str] = []
    i = 0
    n = len(pat)
    first_special = -1
    if anchored:
        first_special = next((k for k, ch in enumerate(pat) if ch in "*?[\\"), -1)
    while i < n:
        c = pat[i]
        if c == "*":
            j = i
            while j < n and pat[j] == "*":
                j += 1
            at_start = i == 0 or pat[i - 1] == "/" or i == first_special
            if j - i >= 2 and at_start and j < n and pat[j] == "/":
                out.append("(?:.*/)?")  # "**/": zero or more directories
                j += 1
            elif j - i >= 2 and at_start and (j == n or pat.startswith("\\/", j)):
                out.append(".*")  # trailing "/**" (or the whole pattern): anything
            else:
                out.append("[^/]*")
            i = j
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            cls, i = _translate_bracket(pat, i)
            if cls is None:
                return None
            out.append(cls)
        elif c == "\\":
            if i + 1 >= n:
                return None  # trailing backslash: never matches in git
            out.append(re.escape(pat[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


class _Pattern:
    """One effective gitignore line."""

    __slots__ = ("raw", "regex", "negated", "dir_only", "anchored")

    def __init__(self, raw: str, regex: str, negated: bool, dir_only: bool, anchored: bool):
        self.raw = raw  # the pattern text without '!', leading '/' and trailing '/'
        self.regex = regex
        self.negated = negated
        self.dir_only = dir_only
        self.anchored = anchored


def _trim_trailing_spaces(line: str) -> str:
    """Drop trailing spaces not escaped by a backslash (git's trim_trailing_spaces)."""
    last_space = -1
    i = 0
    n = len(line)
    while i < n:
        c = line[i]
        if c == " ":
            if last_space < 0:
                last_space = i
        elif c == "\\":
            i += 1
            if i >= n:
                return line
            last_space = -1
        else:
            last_space = -1
        i += 1
    return line[:last_space] if last_space >= 0 else line


def _parse(line: str) -> Optional[_Pattern]:
    """Parse one gitignore line; None for blanks, comments and patterns that never match."""
    if not line or line[0] == "#":
        return None
    line = _trim_trailing_spaces(line)
    negated = line[:1] == "!"
    if negated:
        line = line[1:]
    dir_only = line[-1:] == "/"
    if dir_only:
        line = line[:-1]
    anchored = "/" in line
    if line[:1] == "/":
        line = line[1:]
    if not line:
        return None
    regex = _translate(line, anchored)
    if regex is None:
        return None
    return _Pattern(line, regex, negated, dir_only, anchored)


def _split_lines(text: str) -> List[str]:
    """Lines of an ignore file as git reads them: BOM skipped, one CR before LF dropped."""
    if text[:1] == "\ufeff":
        text = text[1:]
    lines = text.split("\n")
    return [line[:-1] if line[-1:] == "\r" else line for line in lines]


def _has_wildcard(text: str) -> bool:
    return "*" in text or "?" in text or "[" in text or "\\" in text


# A run of consecutive patterns with the same sign, before compilation. Inside a run the
# order does not matter, so it is checked at once, with the cheapest tests first:
# (basename literals, basename suffixes ("*.log" -> ".log"), basename regexes,
#  full-path literals, full-path regexes, result).
# Floating patterns (no slash) look at the basename only: an evaluation chain only holds
# the pattern sets of the path's ancestors, so their base needs no check there.
_Spec = Tuple[FrozenSet[str], Tuple[str, ...], Tuple[str, ...], FrozenSet[str], Tuple[str, ...], bool]
# The compiled form of a _Spec: the regexes become one ``fullmatch`` each (or None).
_Step = Tuple[FrozenSet[str], Tuple[str, ...], Optional[_Matcher], FrozenSet[str], Optional[_Matcher], bool]
_Chain = Tuple[_Step, ...]


def _make_spec(prefix: str, run: Sequence[_Pattern], result: bool) -> Optional[_Spec]:
    if not run:
        return None
    names: List[str] = []
    suffixes: List[str] = []
    name_regexes: List[str] = []
    paths: List[str] = []
    path_regexes: List[str] = []
    for pat in run:
        raw = pat.raw
        if pat.anchored:
            if _has_wildcard(raw):
                path_regexes.append(pat.regex)
            else:
                paths.append(prefix + raw)
        elif not _has_wildcard(raw):
            names.append(raw)
        elif raw[0] == "*" and not _has_wildcard(raw[1:]):
            suffixes.append(raw[1:])
        else:
            name_regexes.append(pat.regex)
    path_sources: Tuple[str, ...] = ()
    if path_regexes:
        path_sources = (re.escape(prefix) + _alternation(_unique(path_regexes)),)
    return (
        frozenset(names),
        _unique(suffixes),
        _unique(name_regexes),
        frozenset(paths),
        path_sources,
        result,
    )


def _unique(items: Iterable[str]) -> Tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _alternation(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"


@functools.lru_cache(maxsize=4096)
def _compile(sources: Tuple[str, ...]) -> Optional[_Matcher]:
    if not sources:
        return None
    return re.compile(_alternation(sources), re.DOTALL).fullmatch


def _compile_chain(specs: Iterable[_Spec], only_true: bool = False) -> _Chain:
    """Compile specs (in evaluation order, last pattern first), merging neighbours with the
    same result: they would give the same answer, so one test is enough. ``only_true``:
    the caller tells False from None apart, so trailing '!' runs are dropped."""
    merged: List[_Spec] = []
    for spec in specs:
        if merged and merged[-1][5] == spec[5]:
            last = merged[-1]
            spec = (
                last[0] | spec[0],
                _unique(last[1] + spec[1]),
                _unique(last[2] + spec[2]),
                last[3] | spec[3],
                _unique(last[4] + spec[4]),
                spec[5],
            )
            merged[-1] = spec
        else:
            merged.append(spec)
    if only_true:
        while merged and not merged[-1][5]:
            merged.pop()
    return tuple(
        (names, suffixes, _compile(name_rx), paths, _compile(path_rx), result)
        for names, suffixes, name_rx, paths, path_rx, result in merged
    )


def _evaluate(chain: _Chain, path: str, name: str) -> Optional[bool]:
    """The result of the first step matching (``name`` is the basename of ``path``)."""
    for names, suffixes, name_match, paths, path_match, result in chain:
        if (
            name in names
            or name.endswith(suffixes)
            or path in paths
            or (name_match is not None and name_match(name) is not None)
            or (path_match is not None and path_match(path) is not None)
        ):
            return result
    return None


# --------------------------------------------------------------------------- PatternSet


class PatternSet:
    """An ordered list of gitignore-syntax patterns anchored at a base directory.

    ``base`` is the directory (relative path, "" for the root) the patterns are relative
    to, as for a nested ``.gitignore``: the patterns apply only to paths below it.
    Each item of ``patterns`` is one line of gitignore syntax (comments and blank lines
    are allowed and skipped).
    """

    __slots__ = ("patterns", "base", "_prefix", "_file_specs", "_dir_specs", "_chains")

    def __init__(self, patterns: Iterable[str], base: str = "") -> None:
        self.patterns: Tuple[str, ...] = _str_tuple(patterns, "patterns")
        self.base: str = _norm_dir(base)
        self._prefix = self.base + "/" if self.base else ""
        # Group consecutive patterns with the same sign; runs are evaluated last first.
        runs: List[List[_Pattern]] = []
        for line in self.patterns:
            pat = _parse(line)
            if pat is None:
                continue
            if runs and runs[-1][0].negated == pat.negated:
                runs[-1].append(pat)
            else:
                runs.append([pat])
        file_specs: List[_Spec] = []
        dir_specs: List[_Spec] = []
        for run in reversed(runs):
            result = not run[0].negated
            for_files = _make_spec(self._prefix, [p for p in run if not p.dir_only], result)
            for_dirs = _make_spec(self._prefix, run, result)
            if for_files is not None:
                file_specs.append(for_files)
            if for_dirs is not None:
                dir_specs.append(for_dirs)
        self._file_specs: Tuple[_Spec, ...] = tuple(file_specs)
        self._dir_specs: Tuple[_Spec, ...] = tuple(dir_specs)
        self._chains: Tuple[_Chain, _Chain] = (
            _compile_chain(self._file_specs),
            _compile_chain(self._dir_specs),
        )

    def __bool__(self) -> bool:
        """False when no line is an effective pattern."""
        return bool(self._dir_specs)

    def __repr__(self) -> str:
        return f"PatternSet({list(self.patterns)!r}, base={self.base!r})"

    def match(self, path: str, is_dir: bool) -> Optional[bool]:
        """The verdict of the last pattern matching ``path`` itself (not its parents).

        True: ignored (matched); False: explicitly re-included by a '!' pattern; None: no
        pattern matched. ``is_dir`` must be False for a symlink, even to a directory.
        """
        if self._prefix and not path.startswith(self._prefix):
            return None
        return _evaluate(self._chains[is_dir], path, path.rpartition("/")[2])


def _str_tuple(items: Iterable[str], what: str) -> Tuple[str, ...]:
    if isinstance(items, (str, bytes)):
        raise TypeError(f"{what} must be an iterable of str, not a single {type(items).__name__}")
    out = tuple(items)
    for item in out:
        if not isinstance(item, str):
            raise TypeError(f"{what} must contain only str, got {item!r}")
    return out


def _norm_dir(directory: str) -> str:
    if not isinstance(directory, str):
        raise TypeError(f"directory must be a str, got {directory!r}")
    directory = directory.strip("/")
    return "" if directory == "." else directory


def _ancestors(path: str) -> List[str]:
    """Proper ancestor directories of ``path``, root ("") first: a/b/c -> "", a, a/b."""
    out = [""]
    i = path.find("/")
    while i >= 0:
        out.append(path[:i])
        i = path.find("/", i + 1)
    return out


def _resolve_dir(cache: Dict[str, bool], directory: str, match_dir: Callable[[str], bool]) -> bool:
    """Whether ``directory`` or one of its ancestors matches, through ``cache``."""
    verdict = cache.get(directory)
    if verdict is not None:
        return verdict
    # Walk up to the nearest cached ancestor (iteratively: paths can be deep), then resolve
    # top-down; once a directory matches, everything below it does.
    pending = [directory]
    verdict = False
    parent = directory.rpartition("/")[0]
    while parent:
        cached = cache.get(parent)
        if cached is not None:
            verdict = cached
            break
        pending.append(parent)
        parent = parent.rpartition("/")[0]
    if len(cache) + len(pending) > _CACHE_MAX:
        cache.clear()
    for d in reversed(pending):
        if not verdict:
            verdict = match_dir(d)
        cache[d] = verdict
    return verdict


# --------------------------------------------------------------------------- Rules


class Rules:
    """Ignore rules for one sync root: user patterns + default excludes + .gitignore files
    + .git/info/exclude.

    As in git, later sources override earlier ones; the order (last match wins) is:
    default excludes, ``.git/info/exclude``, ``.gitignore`` files from the root down to the
    deepest directory holding the path, then the user's ignore patterns. A path is ignored
    when it matches or when any of its ancestor directories is ignored (a re-including '!'
    pattern cannot rescue a path whose parent directory is ignored).

    Preserve-absent patterns are a separate pattern set with the same syntax, anchored at
    the root: a path is preserved when it, or one of its ancestor directories, matches.

    ``is_dir`` arguments must be False for symlinks (even to directories): directory-only
    patterns ("build/") do not match symlinks, exactly as in git.
    """

    def __init__(
        self,
        ignore: Iterable[str] = (),
        preserve_absent: Iterable[str] = (),
        default_excludes: Iterable[str] = DEFAULT_EXCLUDES,
    ) -> None:
        self._user = PatternSet(_str_tuple(ignore, "ignore"))
        self._preserve = PatternSet(_str_tuple(preserve_absent, "preserve_absent"))
        self._default = PatternSet(_str_tuple(default_excludes, "default_excludes"))
        self._info = PatternSet(())
        self._gitignores: Dict[str, PatternSet] = {}
        self._gitignore_texts: Dict[str, str] = {}
        self._nested = False  # any .gitignore below the root?
        self.generation = 0  # counts changes of the .gitignore / info/exclude rules
        # Evaluation chains (last match first) per parent directory, built lazily.
        self._chains: Dict[str, Tuple[_Chain, _Chain]] = {}
        # Chains shared by all directories with the same applicable .gitignore files.
        self._chains_by_sets: Dict[Tuple[int, ...], Tuple[_Chain, _Chain]] = {}
        self._flat: Optional[Tuple[_Chain, _Chain]] = None
        self._flat_files: Optional[_Chain] = None  # file chain when no nested .gitignore
        # Per-directory verdicts "this directory or an ancestor is ignored / preserved".
        self._ignored_dirs: Dict[str, bool] = {}
        self._preserved_dirs: Dict[str, bool] = {}
        self._preserve_files = _compile_chain(self._preserve._file_specs, True)
        self._preserve_dirs = _compile_chain(self._preserve._dir_specs, True)

    def __repr__(self) -> str:
        return (
            f"Rules(ignore={list(self._user.patterns)!r}, "
            f"preserve_absent={list(self._preserve.patterns)!r}, "
            f"default_excludes={list(self._default.patterns)!r}, "
            f"gitignores={sorted(self._gitignores)!r})"
        )

    # ------------------------------------------------------------------ configuration

    @property
    def ignore_patterns(self) -> Tuple[str, ...]:
        return self._user.patterns

    @property
    def preserve_patterns(self) -> Tuple[str, ...]:
        return self._preserve.patterns

    @property
    def default_excludes(self) -> Tuple[str, ...]:
        return self._default.patterns

    @property
    def gitignore_dirs(self) -> Tuple[str, ...]:
        """Directories whose ``.gitignore`` has been added (and holds a pattern), sorted."""
        return tuple(sorted(self._gitignores))

    def add_gitignore(self, directory: str, text: str) -> None:
        """Set the content of ``<directory>/.gitignore`` ("" = the root's).

        Replaces any earlier text for that directory.
        """
        directory = _norm_dir(directory)
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self._gitignore_texts.get(directory) == text:
            return
        patterns = PatternSet(_split_lines(text), base=directory)
        self._gitignore_texts[directory] = text
        if patterns:
            self._gitignores[directory] = patterns
        else:
            self._gitignores.pop(directory, None)
        self._invalidate()

    def remove_gitignore(self, directory: str) -> None:
        """Forget ``<directory>/.gitignore`` (deleted); a no-op if it was never added."""
        directory = _norm_dir(directory)
        if self._gitignore_texts.pop(directory, None) is not None:
            self._gitignores.pop(directory, None)
            self._invalidate()

    def set_info_exclude(self, text: str) -> None:
        """Set the content of ``.git/info/exclude`` (patterns anchored at the root)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        self._info = PatternSet(_split_lines(text))
        self._invalidate()

    def ignore_file_read(self, rel_dir: str, name: str, text: str) -> None:
        """Take in an ignore file a scan met (``name``: ``.gitignore`` in ``rel_dir``, or
        ``.git/info/exclude``): the Scanner's ``on_gitignore``."""
        if name == ".gitignore":
            self.add_gitignore(rel_dir, text)
        else:
            self.set_info_exclude(text)

    def _invalidate(self) -> None:
        self.generation += 1
        self._nested = any(self._gitignores.keys() - {""})
        self._chains.clear()
        self._chains_by_sets.clear()
        self._flat = None
        self._flat_files = None
        self._ignored_dirs.clear()

    # ------------------------------------------------------------------ queries

    def is_ignored(self, path: str, is_dir: bool) -> bool:
        """True if ``path`` is ignored by itself or through an ignored ancestor directory."""
        if not path:
            return False  # the root itself
        parent, _, name = path.rpartition("/")
        if parent:
            verdict = self._ignored_dirs.get(parent)
            if verdict is None:
                verdict = _resolve_dir(self._ignored_dirs, parent, self._match_dir_ignored)
            if verdict:
                return True
        if is_dir:
            return _resolve_dir(self._ignored_dirs, path, self._match_dir_ignored)
        chain = self._flat_files
        if chain is None:
            chain = self._chain(parent)[0]
        return _evaluate(chain, path, name) is True

    def is_preserved(self, path: str, is_dir: bool) -> bool:
        """True if ``path`` matches a preserve-absent pattern or lies under a matching
        directory (e.g. any file under ``.claude/`` for the pattern ``.claude/``)."""
        if not path:
            return False
        parent, _, name = path.rpartition("/")
        if parent:
            verdict = self._preserved_dirs.get(parent)
            if verdict is None:
                verdict = _resolve_dir(self._preserved_dirs, parent, self._match_dir_preserved)
            if verdict:
                return True
        if is_dir:
            return _resolve_dir(self._preserved_dirs, path, self._match_dir_preserved)
        return _evaluate(self._preserve_files, path, name) is True

    def _match_dir_ignored(self, directory: str) -> bool:
        parent, _, name = directory.rpartition("/")
        return _evaluate(self._chain(parent)[1], directory, name) is True

    def _match_dir_preserved(self, directory: str) -> bool:
        return _evaluate(self._preserve_dirs, directory, directory.rpartition("/")[2]) is True

    def _chain(self, parent: str) -> Tuple[_Chain, _Chain]:
        """(file chain, dir chain) for the children of ``parent``, last match first."""
        if not self._nested:
            flat = self._flat
            if flat is None:
                flat = self._flat = self._build_chain([self._gitignores.get("")])
                self._flat_files = flat[0]
            return flat
        chains = self._chains.get(parent)
        if chains is None:
            dirs = _ancestors(parent) + [parent] if parent else [""]
            chains = self._build_chain([self._gitignores.get(d) for d in dirs])
            if len(self._chains) >= _CACHE_MAX:
                self._chains.clear()
            self._chains[parent] = chains
        return chains

    def _build_chain(self, gitignores: List[Optional[PatternSet]]) -> Tuple[_Chain, _Chain]:
        key = tuple(id(s) for s in gitignores if s is not None)
        chains = self._chains_by_sets.get(key)
        if chains is None:
            sets = [self._default, self._info]
            sets.extend(s for s in gitignores if s is not None)
            sets.append(self._user)
            sets.reverse()
            chains = (
                _compile_chain((spec for s in sets for spec in s._file_specs), True),
                _compile_chain((spec for s in sets for spec in s._dir_specs), True),
            )
            self._chains_by_sets[key] = chains
        return chains

    # ------------------------------------------------------------------ wire format

    def to_wire(self) -> dict[str, list[str]]:
        """Plain data for the remote agent: user ignore patterns, preserve-absent patterns
        and default excludes. The keys are the keyword names of ``Rules`` and
        ``load_root_rules``, so ``load_root_rules(root, **data)`` works. ``.gitignore``
        files are not sent: each side reads its own tree."""
        return {
            "ignore": list(self._user.patterns),
            "preserve_absent": list(self._preserve.patterns),
            "default_excludes": list(self._default.patterns),
        }

    @classmethod
    def from_wire(cls, data: dict[str, list[str]]) -> Rules:
        """Inverse of ``to_wire``. Raises ValueError on malformed data (unknown keys, values
        that are not lists of str); a missing key takes the constructor's default."""
        if not isinstance(data, Mapping):
            raise ValueError(f"rules: expected a mapping, got {type(data).__name__}")
        unknown = set(data) - set(_WIRE_KEYS)
        if unknown:
            raise ValueError(f"rules: unknown keys {', '.join(sorted(map(repr, unknown)))}")
        kwargs: Dict[str, Tuple[str, ...]] = {}
        for key in _WIRE_KEYS:
            if key not in data:
                continue
            value = data[key]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"rules: {key!r} must be a list of str")
            kwargs[key] = tuple(value)
        return cls(**kwargs)


# --------------------------------------------------------------------------- loading


def _read_ignore_file(path: str) -> Optional[str]:
    """Content of a regular ignore file (symlinks are not followed, like git), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_IGNORE_FILE_SIZE:
            return None
        chunks: List[bytes] = []
        remaining = _MAX_IGNORE_FILE_SIZE + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        if remaining <= 0:
            return None
    except OSError:
        return None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM) :]
    # Decoded like names (os.fsdecode), so patterns match surrogate-escaped names.
    return os.fsdecode(data)


def load_root_rules(
    root: str,
    ignore: Iterable[str] = (),
    preserve_absent: Iterable[str] = (),
    default_excludes: Iterable[str] = DEFAULT_EXCLUDES,
) -> Rules:
    """Build the Rules of the tree at ``root``: the given patterns plus
    ``.git/info/exclude`` and every ``.gitignore`` in the tree.

    Walks with ``os.scandir`` without following symlinks and without descending into
    ignored directories (their ``.gitignore`` files do not count, as in git) nor into
    ``.git`` directories (git reads no ``.gitignore`` there). Symlinked ``.gitignore`` files
    are not read (git >= 2.32 refuses them too). Unreadable or vanishing subdirectories are
    skipped; an unreadable root raises OSError.
    """
    rules = Rules(ignore, preserve_absent, default_excludes)
    root = os.fspath(root)
    try:
        git_dir_is_dir = stat.S_ISDIR(os.lstat(os.path.join(root, ".git")).st_mode)
    except OSError:
        git_dir_is_dir = False
    if git_dir_is_dir:  # not a gitdir link file nor a symlink
        info = _read_ignore_file(os.path.join(root, ".git", "info", "exclude"))
        if info is not None:
            rules.set_info_exclude(info)

    stack = [""]
    while stack:
        rel = stack.pop()
        abs_dir = os.path.join(root, rel) if rel else root
        subdirs: List[str] = []
        try:
            with os.scandir(abs_dir) as it:
                for entry in it:
                    name = entry.name
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            if name != ".git":
                                subdirs.append(name)
                        elif name == ".gitignore":
                            text = _read_ignore_file(entry.path)
                            if text is not None:
                                rules.add_gitignore(rel, text)
                    except OSError:
                        continue
        except OSError:
            if not rel:
                raise
            continue
        # The directory's own .gitignore is known now: it decides about its children.
        for name in sorted(subdirs, reverse=True):
            child = rel + "/" + name if rel else name
            if not rules.is_ignored(child, True):
                stack.append(child)
    return rules
