"""The base index on disk: one SQLite database per session, updated in transactions."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from syncd.engine.index import BaseIndex
from syncd.engine.model import Agreed, Conflict, Intent, other
from syncd.protocol.messages import FILE
from syncd.scan import DIGEST_SCHEME


class StoreBusy(Exception):
    """The index is in use by another process."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS base (
    path BLOB PRIMARY KEY,
    kind INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    digest BLOB,
    target BLOB,
    local_ino INTEGER NOT NULL,
    remote_ino INTEGER NOT NULL,
    -- 1: a preserve-absent path the remote deleted and the local side kept (Agreed.local_only)
    local_only INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Operations sent but not yet confirmed: if the link or the process dies before the
-- results come back, the next start adopts those that did land instead of mistaking
-- syncd's own writes for edits made on that side.
CREATE TABLE IF NOT EXISTS intents (
    side TEXT NOT NULL,
    path BLOB NOT NULL,
    dest BLOB,
    kind INTEGER,
    mode INTEGER,
    size INTEGER,
    mtime_ns INTEGER,
    digest BLOB,
    target BLOB,
    local_ino INTEGER,
    remote_ino INTEGER,
    PRIMARY KEY (side, path)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS conflicts (
    path BLOB NOT NULL,
    winner TEXT NOT NULL,
    copy BLOB NOT NULL,
    loser TEXT NOT NULL,
    stamp TEXT NOT NULL
);
"""


_DIGESTS_KEY = "digests"  # meta: the scheme of the file digests recorded (scan.DIGEST_SCHEME)


def _put_meta(cur: sqlite3.Cursor, meta: dict[str, str]) -> None:
    cur.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta.items())


def _enc(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


_INSERT = ("INSERT OR REPLACE INTO base (path, kind, mode, size, mtime_ns, digest, target, local_ino, remote_ino,"
           " local_only) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def _row(agreed: Agreed) -> tuple[object, ...]:
    return (os.fsencode(agreed.path), agreed.kind, agreed.mode, agreed.size, agreed.mtime_ns, agreed.digest,
            _enc(agreed.target), _ino_in(agreed.local_ino), _ino_in(agreed.remote_ino), int(agreed.local_only))


# st_ino is unsigned 64-bit; SQLite integers are signed 64-bit. Store the same 64 bits.
def _ino_in(ino: int) -> int:
    return ino - (1 << 64) if ino >= 1 << 63 else ino


def _ino_out(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


class Store:
    """Persists the agreed entries. Paths are stored as raw bytes (names need not be UTF-8)."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        self.path = path
        # One writer per index: a second process syncing the same session would corrupt
        # the agreement between the base and the trees.
        self._lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise StoreBusy(f"another syncd process is already syncing this session ({path})") from None
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring an index written by an older syncd up to the current schema, in place."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(base)")}
        if "local_only" not in columns:
            # Every existing row is one both sides hold: the default says so.
            self.db.execute("ALTER TABLE base ADD COLUMN local_only INTEGER NOT NULL DEFAULT 0")
        if self.get_meta(_DIGESTS_KEY) is None and not self._holds_digests():
            # A new index, or one without a digest to re-key: it is of the current scheme.
            self._write((), {_DIGESTS_KEY: DIGEST_SCHEME}, clear=False)

    def _holds_digests(self) -> bool:
        return any(self.db.execute(f"SELECT 1 FROM {table} WHERE digest IS NOT NULL LIMIT 1").fetchone()
                   for table in ("base", "intents"))

    @property
    def stale_digests(self) -> bool:
        """True when the recorded file digests are of another scheme than the current one
        (an index written by an older syncd): they compare with nothing a scan computes
        now, and must be re-keyed (``redigest``) before the base is used."""
        return self.get_meta(_DIGESTS_KEY) != DIGEST_SCHEME

    def redigest(self, digests: dict[str, bytes | None]) -> None:
        """Re-key every file row's digest to the current scheme, in one transaction:
        ``digests`` holds the new one by path, and a file row it lacks (or maps to None)
        keeps no digest, as if its content were unknown. The intents' digests are
        dropped: an intent then adopts nothing, and the write it stands for shows as a
        change on the side it reached, equal to the side it came from."""
        with self._transaction() as cur:
            cur.execute("UPDATE base SET digest = NULL WHERE kind = ?", (FILE,))
            cur.executemany("UPDATE base SET digest = ? WHERE path = ?",
                            ((digest, os.fsencode(path)) for path, digest in digests.items() if digest is not None))
            cur.execute("UPDATE intents SET digest = NULL")
            _put_meta(cur, {_DIGESTS_KEY: DIGEST_SCHEME})

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        """A cursor inside BEGIN ... COMMIT; an exception rolls all of it back."""
        cur = self.db.cursor()
        cur.execute("BEGIN")
        try:
            yield cur
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.db.close()
        os.close(self._lock)

    def load(self) -> BaseIndex:
        rows = self.db.execute(
            "SELECT path, kind, mode, size, mtime_ns, digest, target, local_ino, remote_ino, local_only FROM base"
        )
        return BaseIndex(
            Agreed(os.fsdecode(p), k, mo, s, mt, d, None if t is None else os.fsdecode(t),
                   _ino_out(li), _ino_out(ri), bool(lo))
            for p, k, mo, s, mt, d, t, li, ri, lo in rows
        )

    def commit(self, changes: Iterable[tuple[str, Agreed | None]], meta: dict[str, str] | None = None) -> None:
        """Apply base updates (None = forget the path) and metadata in one transaction."""
        self._write(changes, meta, clear=False)

    def _write(self, changes: Iterable[tuple[str, Agreed | None]], meta: dict[str, str] | None,
               clear: bool) -> None:
        with self._transaction() as cur:
            if clear:
                cur.execute("DELETE FROM base")
            # Runs of deletes and of inserts each go as one executemany (a resync writes tens
            # of thousands of rows); the runs keep their order, so the outcome is the same.
            for forget, run in itertools.groupby(changes, key=lambda change: change[1] is None):
                if forget:
                    cur.executemany("DELETE FROM base WHERE path = ?", ((os.fsencode(path),) for path, _ in run))
                else:
                    cur.executemany(_INSERT, (_row(agreed) for _, agreed in run if agreed is not None))
            _put_meta(cur, meta or {})

    def replace_all(self, entries: Iterable[Agreed]) -> None:
        """Replace the whole base in one transaction (a crash leaves the old one whole)."""
        self._write(((a.path, a) for a in entries), None, clear=True)

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])


@dataclass(frozen=True)
class ConflictRecord:
    """A settled conflict as listed to users: where, who won, where the loser was kept."""

    path: str
    winner: str
    loser: str
    copy: str
    stamp: str


def add_conflicts(store: Store, conflicts: Iterable[Conflict]) -> None:
    rows = [(os.fsencode(c.path), c.winner, os.fsencode(c.loser_copy), other(c.winner), c.stamp) for c in conflicts]
    if rows:
        with store.db:
            store.db.executemany("INSERT INTO conflicts VALUES (?, ?, ?, ?, ?)", rows)


def list_conflicts(store: Store) -> list[ConflictRecord]:
    rows = store.db.execute("SELECT path, winner, loser, copy, stamp FROM conflicts ORDER BY rowid")
    return [ConflictRecord(os.fsdecode(p), w, lo, os.fsdecode(c), s) for p, w, lo, c, s in rows]


def clear_conflicts(store: Store) -> int:
    with store.db:
        return store.db.execute("DELETE FROM conflicts").rowcount


def record_intents(store: Store, intents: Iterable[Intent]) -> None:
    rows = []
    for it in intents:
        a = it.after
        rows.append((
            it.side, os.fsencode(it.path), None if it.dest is None else os.fsencode(it.dest),
            None if a is None else a.kind, None if a is None else a.mode, None if a is None else a.size,
            None if a is None else a.mtime_ns, None if a is None else a.digest, None if a is None else _enc(a.target),
            None if a is None else _ino_in(a.local_ino), None if a is None else _ino_in(a.remote_ino),
        ))
    if rows:
        with store.db:
            store.db.executemany("INSERT OR REPLACE INTO intents VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)


def load_intents(store: Store) -> list[Intent]:
    out = []
    for side, path, dest, kind, mode, size, mtime, digest, target, li, ri in store.db.execute(
        "SELECT side, path, dest, kind, mode, size, mtime_ns, digest, target, local_ino, remote_ino FROM intents"
    ):
        rel = os.fsdecode(path)
        after = None if kind is None else Agreed(
            rel, kind, mode, size, mtime, digest, None if target is None else os.fsdecode(target),
            _ino_out(li), _ino_out(ri),
        )
        out.append(Intent(side, rel, after, None if dest is None else os.fsdecode(dest)))
    return out


def clear_intents(store: Store) -> None:
    with store.db:
        store.db.execute("DELETE FROM intents")
