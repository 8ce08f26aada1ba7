"""SQLite storage of users' preference pairs for the personalization service.

One table: every pair is a row ``(id, user_id, pair, created)`` with an autoincrement id (never reused, so
a user's largest id identifies the current state of their pairs), the pair as JSON text and its creation
time (seconds since the epoch). A user exists while they have at least one pair. The database runs in WAL
mode; each thread gets its own connection, every write is one ``BEGIN IMMEDIATE`` transaction (concurrent
writers wait for each other, up to ``timeout`` seconds), and readers never block writers.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from steerable.errors import ConfigError, SteerableError

SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    pair TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS pairs_by_user ON pairs (user_id, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
T = TypeVar("T")


@dataclass(frozen=True)
class StoredPair:
    """One stored pair: its id, the pair as it was given (a dict), and when it was stored."""

    id: int
    pair: dict[str, Any]
    created: float


class TooManyPairs(SteerableError):
    """A write would take a user past the per-user limit (nothing was written)."""


class PreferenceStore:
    """Users' preference pairs in one SQLite file (see the module docstring). Thread-safe."""

    def __init__(
        self,
        path: str | Path,
        timeout: float = 30.0,
        synchronous: str = "FULL",
        max_pairs_per_user: int | None = None,
    ) -> None:
        if str(path) == ":memory:" or str(path).startswith("file:"):
            raise ConfigError("the preference store needs a database file path (not :memory: or a URI)")
        self.path = Path(path)
        self.timeout = timeout
        self.synchronous = synchronous
        self.max_pairs_per_user = max_pairs_per_user
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._conn()
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise SteerableError(f"{self.path}: cannot open the preference database ({exc})") from None

    # ---- connections -------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise SteerableError(f"{self.path}: the preference store is closed")
            conn = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _write(self, steps: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``steps(conn)`` inside one ``BEGIN IMMEDIATE`` transaction; roll back on any error."""
        conn = self._conn()
        with self._write_lock:  # this process's writers queue here, not in SQLite's sleeping busy handler
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = steps(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return result

    def close(self) -> None:
        """Close every thread's connection (the store cannot be used afterwards)."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()

    def __enter__(self) -> PreferenceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- metadata ----------------------------------------------------------------------------------
    def ensure_meta(self, key: str, value: str, explain: str = "") -> None:
        """Record ``key = value`` on first use; afterwards refuse a different value (a database written
        for one kind of option must not be read with another)."""

        def steps(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if row is None:
                conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
                return None
            return row[0]

        stored = self._write(steps)
        if stored is not None and stored != value:
            raise ConfigError(f"{self.path}: holds {key} '{stored}', but this server uses '{value}'{explain}")

    # ---- pairs -------------------------------------------------------------------------------------
    def add_pairs(self, user_id: str, pairs: list[dict[str, Any]]) -> int:
        """Append ``pairs`` to ``user_id`` in one transaction; returns the user's number of pairs after."""
        rows = [json.dumps(p, separators=(",", ":"), allow_nan=False) for p in pairs]
        now = time.time()

        def steps(conn: sqlite3.Connection) -> int:
            (before,) = conn.execute("SELECT COUNT(*) FROM pairs WHERE user_id = ?", (user_id,)).fetchone()
            limit = self.max_pairs_per_user
            if limit is not None and before + len(rows) > limit:
                raise TooManyPairs(
                    f"user '{user_id}' has {before} pairs; adding {len(rows)} would exceed the limit of "
                    f"{limit} pairs per user"
                )
            conn.executemany(
                "INSERT INTO pairs (user_id, pair, created) VALUES (?, ?, ?)",
                [(user_id, r, now) for r in rows],
            )
            return before + len(rows)

        return self._write(steps)

    def pairs(
        self, user_id: str, last: int | None = None, after: int = 0, limit: int | None = None
    ) -> list[StoredPair]:
        """The user's pairs, oldest first (empty for an unknown user): those with an id above ``after``,
        at most ``limit`` of them, or only the newest ``last``."""
        if last is not None:
            sql = (
                "SELECT * FROM (SELECT id, pair, created FROM pairs WHERE user_id = ? ORDER BY id DESC "
                "LIMIT ?) ORDER BY id"
            )
            args: tuple = (user_id, last)
        else:
            sql = "SELECT id, pair, created FROM pairs WHERE user_id = ? AND id > ? ORDER BY id LIMIT ?"
            args = (user_id, after, -1 if limit is None else limit)
        rows = self._conn().execute(sql, args).fetchall()
        return [StoredPair(i, json.loads(p), c) for i, p, c in rows]

    def version(self, user_id: str) -> int:
        """The id of the user's newest pair (0 for an unknown user): it changes with every write."""
        (last,) = self._conn().execute("SELECT MAX(id) FROM pairs WHERE user_id = ?", (user_id,)).fetchone()
        return int(last or 0)

    def count(self, user_id: str) -> int:
        """How many pairs the user has."""
        (n,) = self._conn().execute("SELECT COUNT(*) FROM pairs WHERE user_id = ?", (user_id,)).fetchone()
        return int(n)

    def delete_user(self, user_id: str) -> int:
        """Forget the user; returns how many pairs were deleted (0: unknown user)."""
        return self._write(
            lambda conn: conn.execute("DELETE FROM pairs WHERE user_id = ?", (user_id,)).rowcount
        )

    def num_users(self) -> int:
        (n,) = self._conn().execute("SELECT COUNT(DISTINCT user_id) FROM pairs").fetchone()
        return int(n)
