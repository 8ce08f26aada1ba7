"""The preference data format: one pair per row, grouped by user.

Field            | required | type                        | meaning
---------------- | -------- | --------------------------- | --------------------------------------------
``user_id``      | yes      | string or integer           | who made the choice (ids are compared as strings)
``chosen``       | yes      | list of numbers             | the preferred option (features or an embedding)
``rejected``     | yes      | list of numbers             | the other option, same length as ``chosen``
``prompt``       | no       | string                      | the prompt both options answer (kept)
``hidden_mode``  | no       | integer                     | simulated users' hidden mode z* (eval only)
``hidden_z``     | no       | list of numbers             | simulated users' hidden weights z* (eval only)

This is TRL's ``prompt/chosen/rejected`` convention plus ``user_id``. Hidden fields are written by the
simulators so that evaluation can report accuracy per hidden mode; training never reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from steerable.errors import DataError

REQUIRED_FIELDS = ("user_id", "chosen", "rejected")
OPTION_FIELDS = ("chosen", "rejected")
OPTIONAL_FIELDS = ("prompt", "hidden_mode", "hidden_z")


@dataclass(frozen=True, eq=False)
class PreferenceData:
    """Validated preference pairs in columns, with a per-user index.

    Shapes: ``chosen``/``rejected`` (N, D) float32; ``user_ids`` (N,) str; ``prompts`` (N,) object or
    None; ``hidden_mode`` (N,) int64 (-1 = unknown) or None; ``hidden_z`` (N, K) float32 or None.
    """

    user_ids: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    prompts: np.ndarray | None = None
    hidden_mode: np.ndarray | None = None
    hidden_z: np.ndarray | None = None
    source: str = "<memory>"

    def __post_init__(self) -> None:
        n = len(self.user_ids)
        if self.chosen.ndim != 2 or self.chosen.shape != self.rejected.shape or len(self.chosen) != n:
            raise DataError(
                f"chosen {self.chosen.shape} and rejected {self.rejected.shape} must both be (N={n}, D)",
                source=self.source,
            )
        for name in ("prompts", "hidden_mode", "hidden_z"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise DataError(f"{name} has {len(value)} rows, expected {n}", source=self.source)

    @property
    def num_pairs(self) -> int:
        """Number of preference pairs (rows)."""
        return len(self.user_ids)

    @property
    def dim(self) -> int:
        """Length D of each option vector."""
        return int(self.chosen.shape[1])

    @cached_property
    def _user_codes(self) -> tuple[np.ndarray, np.ndarray]:
        users, first, codes = np.unique(self.user_ids.astype(str), return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")  # users in order of first appearance
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        return users[order], rank[codes.reshape(-1)]

    @property
    def users(self) -> np.ndarray:
        """Distinct user ids, in order of first appearance."""
        return self._user_codes[0]

    @property
    def num_users(self) -> int:
        return len(self.users)

    @property
    def user_index(self) -> np.ndarray:
        """(N,) int: each row's position in :attr:`users`."""
        return self._user_codes[1]

    @cached_property
    def rows_by_user(self) -> list[np.ndarray]:
        """For each user (in :attr:`users` order), the row indices of their pairs."""
        order = np.argsort(self.user_index, kind="stable")
        counts = np.bincount(self.user_index, minlength=self.num_users)
        return np.split(order, np.cumsum(counts)[:-1])

    @cached_property
    def pairs_per_user(self) -> np.ndarray:
        """(U,) int: number of pairs of each user."""
        return np.bincount(self.user_index, minlength=self.num_users)

    @cached_property
    def user_mode(self) -> np.ndarray | None:
        """(U,) int: each user's hidden mode (from their first row), or None when unknown."""
        if self.hidden_mode is None:
            return None
        return np.array([self.hidden_mode[rows[0]] for rows in self.rows_by_user], dtype=np.int64)

    @cached_property
    def user_z(self) -> np.ndarray | None:
        """(U, K) float: each user's hidden weights (from their first row), or None when unknown."""
        if self.hidden_z is None:
            return None
        return np.stack([self.hidden_z[rows[0]] for rows in self.rows_by_user])

    def select_rows(self, rows: np.ndarray) -> PreferenceData:
        """A new dataset holding only ``rows`` (in that order)."""
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return PreferenceData(
            user_ids=self.user_ids[rows],
            chosen=self.chosen[rows],
            rejected=self.rejected[rows],
            prompts=pick(self.prompts),
            hidden_mode=pick(self.hidden_mode),
            hidden_z=pick(self.hidden_z),
            source=self.source,
        )

    def select_users(self, user_positions: np.ndarray) -> PreferenceData:
        """A new dataset holding the pairs of the users at ``user_positions`` (indices into :attr:`users`)."""
        rows = np.concatenate([self.rows_by_user[u] for u in user_positions]) if len(user_positions) else []
        return self.select_rows(np.sort(np.asarray(rows, dtype=np.int64)))

    def split_users(self, fraction: float, seed: int) -> tuple[PreferenceData, PreferenceData]:
        """Split by user (never by pair): returns (rest, held_out) with ``fraction`` of users held out."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        perm = np.random.default_rng(seed).permutation(self.num_users)
        n_out = max(1, round(fraction * self.num_users))
        if n_out >= self.num_users:
            raise DataError(
                f"cannot hold out {fraction:.0%} of {self.num_users} user(s): give a validation file",
                source=self.source,
            )
        return self.select_users(np.sort(perm[n_out:])), self.select_users(np.sort(perm[:n_out]))

    def fingerprint(self) -> str:
        """``<rows>:<sha256 prefix>`` of the users, options and prompts: two runs on different data (or a
        file edited between them) never share a fingerprint."""
        import hashlib

        digest = hashlib.sha256()
        digest.update("\x1f".join(str(u) for u in self.user_ids).encode())
        for array in (self.chosen, self.rejected):
            digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
        if self.prompts is not None:
            digest.update("\x1f".join(str(p) for p in self.prompts).encode())
        return f"{self.num_pairs}:{digest.hexdigest()[:16]}"

    def summary(self) -> str:
        """One line: pairs, users, dimension, pairs per user."""
        counts = self.pairs_per_user
        return (
            f"{self.num_pairs} pairs from {self.num_users} users, D={self.dim}, "
            f"pairs/user min {counts.min()} median {int(np.median(counts))} max {counts.max()}"
        )


def user_rows(user_ids: np.ndarray, user: str | None, source: str) -> np.ndarray:
    """Row numbers of one user's pairs: ``user``, or the file's only user when None (clear errors else)."""
    users = sorted({str(u) for u in user_ids.tolist()})
    if user is None:
        if len(users) != 1:
            raise DataError(f"holds {len(users)} users; choose one with --user", source=source)
        user = users[0]
    rows = np.flatnonzero(np.asarray([str(u) for u in user_ids.tolist()]) == str(user))
    if not len(rows):
        raise DataError(f"no user {user!r}", source=source)
    return rows
