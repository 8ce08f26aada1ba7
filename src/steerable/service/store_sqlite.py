"""The SQLite back end of the preference store: one file, one process (the embedded default).

Tables ``pairs (id INTEGER PRIMARY KEY AUTOINCREMENT, user_id, pair, created)`` and ``meta (key, value)``.
The database runs in WAL mode; each thread gets its own connection, every write is one ``BEGIN
IMMEDIATE`` transaction with ``synchronous=FULL`` (writers queue for each other, up to ``timeout``
seconds; a write is on disk when the call returns), and readers never block writers. A database that
stays locked or cannot be read raises :class:`~steerable.service.store.StoreUnavailable`.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from steerable.errors import ConfigError, SteerableError
from steerable.service.store import (
    PreferenceStore,
    StoredPair,
    StoreUnavailable,
    check_limit,
    encode_pair,
)

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
CACHE_KIB = 512  # page cache per connection (one per thread); pairs are read once, the index stays warm
T = TypeVar("T")


def _unavailable(function: Callable[..., T]) -> Callable[..., T]:
    """SQLite's operational errors (locked past the timeout, I/O errors) -> StoreUnavailable."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return function(*args, **kwargs)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"the database is busy or unavailable ({exc})") from None

    return wrapper


class SQLiteStore(PreferenceStore):
    """Users' preference pairs in one SQLite file (see the module docstring). Thread-safe."""

    kind = "sqlite"
    local = True

    def __init__(
        self,
        path: str | Path,
        timeout: float = 30.0,
        synchronous: str = "FULL",
        max_pairs_per_user: int | None = None,
    ) -> None:
        super().__init__(max_pairs_per_user)
        if str(path) == ":memory:" or str(path).startswith("file:"):
            raise ConfigError("the preference store needs a database file path (not :memory: or a URI)")
        self.path = Path(path)
        self.timeout = timeout
        self.synchronous = synchronous
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
            conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
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
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()

    # ---- writes ------------------------------------------------------------------------------------
    @_unavailable
    def ensure_meta(self, key: str, value: str, explain: str = "") -> None:
        def steps(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if row is None:
                conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
                return None
            return row[0]

        stored = self._write(steps)
        if stored is not None and stored != value:
            raise ConfigError(f"{self.path}: holds {key} '{stored}', but this server uses '{value}'{explain}")

    @_unavailable
    def add_pairs(self, user_id: str, pairs: list[dict[str, Any]]) -> int:
        rows = [encode_pair(p) for p in pairs]
        now = time.time()

        def steps(conn: sqlite3.Connection) -> int:
            (before,) = conn.execute("SELECT COUNT(*) FROM pairs WHERE user_id = ?", (user_id,)).fetchone()
            check_limit(user_id, before, len(rows), self.max_pairs_per_user)
            conn.executemany(
                "INSERT INTO pairs (user_id, pair, created) VALUES (?, ?, ?)",
                [(user_id, r, now) for r in rows],
            )
            return before + len(rows)

        return self._write(steps)

    @_unavailable
    def delete_user(self, user_id: str) -> int:
        return self._write(
            lambda conn: conn.execute("DELETE FROM pairs WHERE user_id = ?", (user_id,)).rowcount
        )

    # ---- reads -------------------------------------------------------------------------------------
    @_unavailable
    def pairs(
        self, user_id: str, last: int | None = None, after: int = 0, limit: int | None = None
    ) -> list[StoredPair]:
        if last is not None:
            sql = (
                "SELECT * FROM (SELECT id, pair, created FROM pairs WHERE user_id = ? ORDER BY id DESC "
                "LIMIT ?) ORDER BY id"
            )
            args: tuple = (user_id, last)
        else:
            sql = "SELECT id, pair, created FROM pairs WHERE user_id = ? AND id > ? ORDER BY id LIMIT ?"
            args = (user_id, after, -1 if limit is None else limit)
        return [StoredPair(i, p, c) for i, p, c in self._conn().execute(sql, args)]

    @_unavailable
    def version(self, user_id: str) -> int:
        (last,) = self._conn().execute("SELECT MAX(id) FROM pairs WHERE user_id = ?", (user_id,)).fetchone()
        return int(last or 0)

    @_unavailable
    def count(self, user_id: str) -> int:
        (n,) = self._conn().execute("SELECT COUNT(*) FROM pairs WHERE user_id = ?", (user_id,)).fetchone()
        return int(n)

    @_unavailable
    def num_users(self) -> int:
        (n,) = self._conn().execute("SELECT COUNT(DISTINCT user_id) FROM pairs").fetchone()
        return int(n)
