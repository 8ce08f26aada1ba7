"""The PostgreSQL back end of the preference store: one database shared by several service replicas.

Tables ``steerable_pairs (id BIGINT GENERATED ALWAYS AS IDENTITY, user_id, pair, created)`` (index on
``(user_id, id)``) and ``steerable_meta (key, value)``, created on first use (under an advisory lock, so
replicas that start together do not race). Connections come from a ``psycopg_pool.ConnectionPool``
(autocommit; each is checked before use, so connections broken by a database restart are replaced).

Writes: a batch of pairs is one transaction that first takes a transaction-scoped advisory lock on the
user. One user's writes are therefore serialised: the ids of a batch are drawn only after the previous
batch of that user committed, so a user's pairs become visible in id order and the id of their newest
pair identifies their state on every replica (an identity column alone does not promise this: ids are
drawn at insert time and transactions may commit out of order). A call returns only after COMMIT.

Faults: connection errors, a restarting or shut-down server, statement timeouts and a pool with no free
connection within ``timeout`` seconds raise :class:`~steerable.service.store.StoreUnavailable`; the pool
keeps reconnecting in the background and serves again as soon as the database is back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from psycopg_pool import ConnectionPool

from steerable.errors import ConfigError, SteerableError
from steerable.service.store import (
    PreferenceStore,
    StoredPair,
    StoreUnavailable,
    check_limit,
    describe_db,
    encode_pair,
)

LOCK_NAMESPACE = 1400137074  # first key of this store's advisory locks ("Ster"); the second is the user
SCHEMA = (
    f"SELECT pg_advisory_xact_lock({LOCK_NAMESPACE}, 0)",
    "CREATE TABLE IF NOT EXISTS steerable_pairs (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
    "user_id TEXT NOT NULL, pair TEXT NOT NULL, created DOUBLE PRECISION NOT NULL)",
    "CREATE INDEX IF NOT EXISTS steerable_pairs_by_user ON steerable_pairs (user_id, id)",
    "CREATE TABLE IF NOT EXISTS steerable_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
LOCK_USER = f"SELECT pg_advisory_xact_lock({LOCK_NAMESPACE}, hashtext(%s))"
STATEMENT_TIMEOUT_MS = 15_000  # a statement that runs longer (locks, an overloaded server) is cancelled
TRANSIENT = (psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.ReadOnlySqlTransaction)
T = TypeVar("T")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _unavailable(function: Callable[..., T]) -> Callable[..., T]:
    """Connection, server-state and timeout errors -> StoreUnavailable (503 in the service)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return function(*args, **kwargs)
        except TRANSIENT as exc:
            raise StoreUnavailable(f"the database is unavailable ({_first_line(exc)})") from None

    return wrapper


def _configure(conn: psycopg.Connection) -> None:
    conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")


class PostgresStore(PreferenceStore):
    """Users' preference pairs in a PostgreSQL database (see the module docstring). Thread-safe."""

    kind = "postgresql"
    local = False

    def __init__(
        self,
        url: str,
        max_pairs_per_user: int | None = None,
        pool_size: int = 10,
        timeout: float = 5.0,
    ) -> None:
        super().__init__(max_pairs_per_user)
        if pool_size < 1 or timeout <= 0:
            raise ConfigError("the database pool needs at least 1 connection and a positive timeout")
        self.url, self.name = url, describe_db(url)
        connect = {
            "autocommit": True,
            "connect_timeout": max(1, round(timeout)),
            "application_name": "steerable",
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 3,
            "keepalives_count": 3,
            "tcp_user_timeout": int(timeout * 2000),  # a vanished server host, not only a stopped one
        }
        try:  # one direct connection first: its error says why (refused, no such database, password)
            with psycopg.connect(url, **connect) as conn:
                _configure(conn)
                with conn.transaction():
                    for statement in SCHEMA:
                        conn.execute(statement)
        except psycopg.Error as exc:
            raise SteerableError(
                f"{self.name}: cannot open the preference database ({_first_line(exc)})"
            ) from None
        self.pool = ConnectionPool(
            url,
            kwargs=connect,
            min_size=1,
            max_size=pool_size,
            open=False,
            configure=_configure,
            check=ConnectionPool.check_connection,
            timeout=timeout,
            reconnect_timeout=max(10.0, timeout),  # then a new attempt starts with the next request
            name="steerable",
        )
        try:
            self.pool.open(wait=True, timeout=max(timeout, 5.0))
        except psycopg.Error as exc:
            self.pool.close()
            raise SteerableError(
                f"{self.name}: cannot open the preference database ({_first_line(exc)})"
            ) from None

    @contextmanager
    def _transaction(self, user_id: str | None = None) -> Iterator[psycopg.Connection]:
        """A pooled connection inside BEGIN ... COMMIT (the user's advisory lock taken first)."""
        with self.pool.connection() as conn, conn.transaction():
            if user_id is not None:
                conn.execute(LOCK_USER, (user_id,))
            yield conn

    def close(self) -> None:
        self.pool.close()

    # ---- writes ------------------------------------------------------------------------------------
    @_unavailable
    def ensure_meta(self, key: str, value: str, explain: str = "") -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO steerable_meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING",
                (key, value),
            )
            (stored,) = conn.execute("SELECT value FROM steerable_meta WHERE key = %s", (key,)).fetchone()
        if stored != value:
            raise ConfigError(f"{self.name}: holds {key} '{stored}', but this server uses '{value}'{explain}")

    @_unavailable
    def add_pairs(self, user_id: str, pairs: list[dict[str, Any]]) -> int:
        rows = [encode_pair(p) for p in pairs]
        with self._transaction(user_id) as conn:
            (before,) = conn.execute(
                "SELECT count(*) FROM steerable_pairs WHERE user_id = %s", (user_id,)
            ).fetchone()
            check_limit(user_id, before, len(rows), self.max_pairs_per_user)
            with conn.cursor() as cursor:  # pipelined: one round trip for the batch, ids in row order
                cursor.executemany(
                    "INSERT INTO steerable_pairs (user_id, pair, created) "
                    "VALUES (%s, %s, extract(epoch from statement_timestamp()))",
                    [(user_id, r) for r in rows],
                )
        return before + len(rows)

    @_unavailable
    def delete_user(self, user_id: str) -> int:
        with self._transaction(user_id) as conn:
            return conn.execute("DELETE FROM steerable_pairs WHERE user_id = %s", (user_id,)).rowcount

    # ---- reads -------------------------------------------------------------------------------------
    @_unavailable
    def pairs(
        self, user_id: str, last: int | None = None, after: int = 0, limit: int | None = None
    ) -> list[StoredPair]:
        with self.pool.connection() as conn:
            return self._pairs(conn, user_id, last, after, limit)

    @staticmethod
    def _pairs(
        conn: psycopg.Connection, user_id: str, last: int | None, after: int, limit: int | None
    ) -> list[StoredPair]:
        if last is not None:
            sql = (
                "SELECT id, pair, created FROM (SELECT id, pair, created FROM steerable_pairs "
                "WHERE user_id = %s ORDER BY id DESC LIMIT %s) AS newest ORDER BY id"
            )
            args: tuple = (user_id, last)
        else:
            sql = (
                "SELECT id, pair, created FROM steerable_pairs WHERE user_id = %s AND id > %s "
                "ORDER BY id LIMIT %s"
            )
            args = (user_id, after, limit)
        return [StoredPair(i, p, c) for i, p, c in conn.execute(sql, args)]

    @_unavailable
    def version(self, user_id: str) -> int:
        with self.pool.connection() as conn:
            (last,) = conn.execute(
                "SELECT max(id) FROM steerable_pairs WHERE user_id = %s", (user_id,)
            ).fetchone()
        return int(last or 0)

    @_unavailable
    def count(self, user_id: str) -> int:
        with self.pool.connection() as conn:
            return self._count(conn, user_id)

    @staticmethod
    def _count(conn: psycopg.Connection, user_id: str) -> int:
        (n,) = conn.execute("SELECT count(*) FROM steerable_pairs WHERE user_id = %s", (user_id,)).fetchone()
        return int(n)

    @_unavailable
    def page(self, user_id: str, after: int = 0, limit: int | None = None) -> tuple[int, list[StoredPair]]:
        with self.pool.connection() as conn:
            return self._count(conn, user_id), self._pairs(conn, user_id, None, after, limit)

    @_unavailable
    def num_users(self) -> int:
        with self.pool.connection() as conn:
            (n,) = conn.execute("SELECT count(DISTINCT user_id) FROM steerable_pairs").fetchone()
        return int(n)
