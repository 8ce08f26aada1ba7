"""A small Python client of the personalization service (httpx).

>>> client = Client("http://127.0.0.1:8000", token=None)
>>> client.add_preferences("alice", [{"chosen": [0.6, 1.2], "rejected": [0.1, -0.4]}])
>>> client.score(options, user_id="alice")["rewards"]
>>> client.compare([{"a": y1, "b": y2}], user_id="alice")["probabilities"]

Options may be lists, NumPy arrays or text; every method returns the decoded JSON answer and raises
:class:`ServiceError` (with the status code and the server's message) for an error answer.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx


class ServiceError(Exception):
    """An error answer: ``status`` and the server's ``message`` (``detail``: the whole answer)."""

    def __init__(self, status: int, message: str, detail: Any = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.detail = status, message, detail


def _plain(value: Any) -> Any:
    """JSON-ready values: NumPy arrays and scalars become lists and numbers, tuples become lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _user(user_id: str) -> str:
    return f"/v1/users/{quote(str(user_id), safe='')}"


class Client:
    """Talks to one server; ``token`` is sent as ``Authorization: Bearer token``."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None) -> Any:
        response = self.http.request(
            method, path, json=_plain(body) if body is not None else None, params=params
        )
        if response.is_success:
            return response.json()
        try:
            detail = response.json()
        except ValueError:
            detail = response.text
        message = (detail.get("message") or detail.get("detail")) if isinstance(detail, dict) else detail
        raise ServiceError(response.status_code, str(message), detail)

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/v1/health")

    def add_preferences(self, user_id: str, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        """Append pairs ``{"chosen", "rejected", "prompt"?}``; returns ``{"added", "num_pairs", ...}``."""
        return self._call("POST", f"{_user(user_id)}/preferences", {"pairs": pairs})

    def get_user(self, user_id: str, after: int = 0, limit: int | None = None) -> dict[str, Any]:
        """One page of the user's pairs (``next_after``: where the next page starts, None: no more)."""
        params = {"after": after} | ({"limit": limit} if limit is not None else {})
        return self._call("GET", _user(user_id), params=params)

    def all_pairs(self, user_id: str) -> list[dict[str, Any]]:
        """Every stored pair of the user, oldest first (all pages)."""
        pairs, after = [], 0
        while after is not None:
            page = self.get_user(user_id, after=after)
            pairs += page["pairs"]
            after = page["next_after"]
        return pairs

    def delete_user(self, user_id: str) -> dict[str, Any]:
        return self._call("DELETE", _user(user_id))

    def score(
        self,
        options: Any,
        user_id: str | None = None,
        context: list[dict[str, Any]] | None = None,
        prompt: Any = None,
    ) -> dict[str, Any]:
        """Rewards of the options for a stored user (plus inline ``context``), or for a new user."""
        path = f"{_user(user_id)}/score" if user_id is not None else "/v1/score"
        return self._call("POST", path, {"options": options, "context": context, "prompt": prompt})

    def compare(
        self,
        pairs: list[dict[str, Any]],
        user_id: str | None = None,
        context: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """P(a ≻ b) for pairs ``{"a", "b", "prompt"?}``."""
        path = f"{_user(user_id)}/compare" if user_id is not None else "/v1/compare"
        return self._call("POST", path, {"pairs": pairs, "context": context})

    def next_query(
        self,
        user_id: str,
        candidates: list[dict[str, Any]],
        strategy: str = "info-gain",
        seed: int | None = None,
    ) -> dict[str, Any]:
        """Which candidate pair ``{"a", "b", "prompt"?}`` to ask the user next."""
        body = {"candidates": candidates, "strategy": strategy, "seed": seed}
        return self._call("POST", f"{_user(user_id)}/next-query", body)

    def generate(self, user_id: str, prompts: list[Any], **sampling: Any) -> dict[str, Any]:
        """Responses steered by the user's pairs; ``sampling``: max_new_tokens, temperature, top_p, seed."""
        return self._call("POST", f"{_user(user_id)}/generate", {"prompts": prompts, **sampling})

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
