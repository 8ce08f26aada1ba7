"""Storage of users' preference pairs for the personalization service: the interface and :func:`open_store`.

Two back ends keep the same semantics (:mod:`steerable.service.store_sqlite`, the embedded default, and
:mod:`steerable.service.store_postgres`, shared by several replicas):

* every pair is a row ``(id, user_id, pair, created)``: the pair as JSON text, its creation time (seconds
  since the epoch) and an id that increases and is never reused, not even after a user is deleted;
* a batch of pairs is one transaction, and a call that adds pairs returns only after its commit;
* one user's writes are serialised, so their pairs become visible in id order: the id of a user's newest
  pair (:meth:`PreferenceStore.version`) identifies the state of their pairs, and paging with ``after``
  never skips a pair that commits later;
* the kind of option a database holds is recorded (:meth:`PreferenceStore.ensure_meta`), and a server
  for another kind is refused;
* a database that is unreachable, restarting or too busy raises :class:`StoreUnavailable` (the service
  answers 503 and the client retries); the store reconnects by itself when the database is back.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from steerable.errors import SteerableError

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


@dataclass(frozen=True)
class StoredPair:
    """One stored pair: its id, the pair as JSON text (``raw``) and when it was stored.

    :attr:`pair` decodes ``raw`` on every access, so a list of stored pairs holds only their text."""

    id: int
    raw: str
    created: float

    @property
    def pair(self) -> dict[str, Any]:
        """The pair as it was given: ``{"chosen", "rejected", "prompt"?}``."""
        return json.loads(self.raw)


class TooManyPairs(SteerableError):
    """A write would take a user past the per-user limit (nothing was written)."""


class StoreUnavailable(SteerableError):
    """The database cannot answer now (down, restarting, busy or locked); retry later. Nothing of the
    failed call is acknowledged: a write either committed before the failure or not at all."""


def encode_pair(pair: dict[str, Any]) -> str:
    """A pair as the compact JSON text that is stored."""
    return json.dumps(pair, separators=(",", ":"), allow_nan=False)


def check_limit(user_id: str, before: int, adding: int, limit: int | None) -> None:
    """Raise :class:`TooManyPairs` when ``adding`` pairs would take the user past ``limit``."""
    if limit is not None and before + adding > limit:
        raise TooManyPairs(
            f"user '{user_id}' has {before} pairs; adding {adding} would exceed the limit of {limit} "
            f"pairs per user"
        )


def is_postgres_url(db: str | Path) -> bool:
    return isinstance(db, str) and db.startswith(POSTGRES_SCHEMES)


def describe_db(db: str | Path) -> str:
    """The database for messages: a path, or a URL with its password hidden."""
    if not is_postgres_url(db):
        return str(db)
    parts = urlsplit(str(db))
    if parts.password is None:
        return str(db)
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class PreferenceStore(ABC):
    """Users' preference pairs (see the module docstring). Thread-safe; close it when done."""

    kind: str  # "sqlite" or "postgresql"
    local: bool  # True: calls are quick local reads that may run on an event loop

    def __init__(self, max_pairs_per_user: int | None = None) -> None:
        self.max_pairs_per_user = max_pairs_per_user

    # ---- writes ------------------------------------------------------------------------------------
    @abstractmethod
    def ensure_meta(self, key: str, value: str, explain: str = "") -> None:
        """Record ``key = value`` on first use; afterwards refuse a different value (a database written
        for one kind of option must not be read with another)."""

    @abstractmethod
    def add_pairs(self, user_id: str, pairs: list[dict[str, Any]]) -> int:
        """Append ``pairs`` to ``user_id`` in one transaction; returns the user's number of pairs after
        (once committed)."""

    @abstractmethod
    def delete_user(self, user_id: str) -> int:
        """Forget the user; returns how many pairs were deleted (0: unknown user)."""

    # ---- reads -------------------------------------------------------------------------------------
    @abstractmethod
    def pairs(
        self, user_id: str, last: int | None = None, after: int = 0, limit: int | None = None
    ) -> list[StoredPair]:
        """The user's pairs, oldest first (empty for an unknown user): those with an id above ``after``,
        at most ``limit`` of them, or only the newest ``last`` (read in one statement: the last one's
        id is the version they are)."""

    @abstractmethod
    def version(self, user_id: str) -> int:
        """The id of the user's newest pair (0 for an unknown user): it changes with every write."""

    @abstractmethod
    def count(self, user_id: str) -> int:
        """How many pairs the user has."""

    def page(self, user_id: str, after: int = 0, limit: int | None = None) -> tuple[int, list[StoredPair]]:
        """(the user's number of pairs, their pairs with an id above ``after``, at most ``limit``)."""
        return self.count(user_id), self.pairs(user_id, after=after, limit=limit)

    @abstractmethod
    def num_users(self) -> int:
        """How many users have at least one pair."""

    # ---- lifetime ----------------------------------------------------------------------------------
    @abstractmethod
    def close(self) -> None:
        """Release connections (the store cannot be used afterwards)."""

    def __enter__(self) -> PreferenceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(
    db: str | Path,
    max_pairs_per_user: int | None = None,
    pool_size: int = 10,
    timeout: float = 5.0,
) -> PreferenceStore:
    """A PostgreSQL store for a ``postgresql://`` URL (``pool_size`` connections; a request waits up to
    ``timeout`` seconds for one), otherwise an SQLite store in the file ``db``."""
    if is_postgres_url(db):
        from steerable.service.store_postgres import PostgresStore

        return PostgresStore(
            str(db), max_pairs_per_user=max_pairs_per_user, pool_size=pool_size, timeout=timeout
        )
    from steerable.service.store_sqlite import SQLiteStore

    return SQLiteStore(db, max_pairs_per_user=max_pairs_per_user)
