"""The personalization service: a FastAPI app that stores users' preference pairs and scores, compares,
elicits and generates for them with a saved reward model (and optionally an NP-DPO policy).

>>> app = create_app("models/step", db="prefs.db")          # or: steerable serve --model models/step
>>> with ServerThread(app) as url: ...                        # uvicorn on loopback, in a background thread

This module holds the routes (:func:`create_app`) and :class:`ServerThread`; the limits and request/response
schemas are in :mod:`steerable.service.schemas`, the engine (models, embedder, per-user cache of
personalised models) in :mod:`steerable.service.engine`. Inference runs in FastAPI's threadpool (sync
endpoints; numeric scoring on the event loop when the store is a local SQLite file); the reward models are
only read, the embedder and the policy are used under locks. A database that cannot answer is a 503 with
``Retry-After`` (never a 500), and every write is answered only after its transaction committed.
"""

import hmac
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from steerable.errors import ConfigError
from steerable.service.engine import Engine, build_engine
from steerable.service.schemas import (
    USER_ID_PATTERN,
    AddedOut,
    APIError,
    CompareOut,
    DeletedOut,
    ErrorOut,
    GenerateOut,
    HealthOut,
    Limits,
    NextQueryOut,
    ScoreOut,
    build_schemas,
    dump,
    validation_body,
)
from steerable.service.store import StoreUnavailable, TooManyPairs

RETRY_AFTER_S = 1  # what a 503 tells clients to wait before retrying


# ---- the app -------------------------------------------------------------------------------------------
class _BodyLimit:
    """ASGI middleware: 413 for request bodies over ``limit`` bytes (declared or streamed)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body larger than {self.limit} bytes"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await JSONResponse({"detail": message}, status_code=413)(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            event = await receive()
            seen += len(event.get("body", b""))
            if seen > self.limit:
                from fastapi import HTTPException

                raise HTTPException(413, message)
            return event

        await self.app(scope, limited, send)


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "the body is not UTF-8 JSON",
        401: "missing or wrong bearer token",
        404: "unknown user",
        409: "conflict (no policy loaded, or too many pairs for one user)",
        413: "request body too large",
        503: "the database is down, restarting or busy, or the embedder failed; retry (see Retry-After)",
    }
    return {c: {"model": ErrorOut, "description": text[c]} for c in codes}


def create_app(
    model: str | Path | Sequence[str | Path] | None = None,
    db: str | Path = "steerable.db",
    token: str | None = None,
    policy: str | Path | None = None,
    seed: int = 0,
    limits: Limits | None = None,
    engine: Engine | None = None,
    device: str = "cpu",
) -> FastAPI:
    """The FastAPI app for a saved reward model folder (several folders: an ensemble), or a built
    :class:`Engine`. ``db``: an SQLite file or a ``postgresql://`` URL. ``token``: every endpoint except
    ``/v1/health`` needs ``Authorization: Bearer token``. The caller closes the store when done
    (``app.state.engine.close()``)."""
    if engine is None:
        if model is None:
            raise ConfigError("give a model folder (or an engine)")
        dirs = [model] if isinstance(model, (str, Path)) else list(model)
        engine = build_engine(dirs, db, policy_dir=policy, seed=seed, limits=limits, device=device)
    eng = engine
    lim = eng.limits
    s = build_schemas(eng.text, eng.dim, lim)
    app = FastAPI(
        title="steerable personalization service",
        version=eng.health()["version"],
        description="Few-shot personalised reward models: store a user's preference pairs, then score, "
        "compare, choose the next question and generate for that user.",
    )
    app.state.engine = eng
    app.add_middleware(_BodyLimit, limit=lim.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            validation_body(list(exc.errors()), None if eng.text else eng.dim), status_code=422
        )

    @app.exception_handler(APIError)
    async def _service_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status == 422:
            body = validation_body([{"loc": exc.loc, "msg": exc.message, "type": "value_error"}])
            return JSONResponse(body, status_code=422)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else None
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(StoreUnavailable)
    async def _unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        return JSONResponse({"detail": f"{exc}; retry later"}, status_code=503, headers=headers)

    bearer = HTTPBearer(auto_error=False, description="the server's --token")

    async def check_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), (token or "").encode()):
            from fastapi import HTTPException

            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(check_token)] if token else []
    errors = (401,) if token else ()
    v1 = APIRouter(prefix="/v1", dependencies=auth, responses=_responses(*errors, 400, 413, 503))
    UserId = Annotated[str, PathParam(pattern=USER_ID_PATTERN, max_length=128, description="the user")]

    @app.get("/v1/health", response_model=HealthOut, tags=["service"])
    def health() -> HealthOut:
        """Model type, input size, text or numeric options, whether a policy is loaded."""
        values = eng.health()
        limits_out = {k: v for k, v in vars(lim).items() if isinstance(v, int)}
        return HealthOut(**values, auth_required=bool(token), limits=limits_out)

    @v1.post(
        "/users/{user_id}/preferences", response_model=AddedOut, status_code=201, responses=_responses(409)
    )
    def add_preferences(user_id: UserId, body: s.PreferencesIn) -> AddedOut:
        """Append the user's preference pairs (a new user is created by their first pairs)."""
        pairs = dump(body.pairs)
        try:
            total = eng.store.add_pairs(user_id, pairs)
        except TooManyPairs as exc:
            raise APIError(409, str(exc)) from None
        return AddedOut(user_id=user_id, added=len(pairs), num_pairs=total)

    @v1.get("/users/{user_id}", response_model=s.UserOut, responses=_responses(404))
    def get_user(
        user_id: UserId,
        after: Annotated[int, Query(ge=0, le=2**63 - 1, description="only pairs with a larger id")] = 0,
        limit: Annotated[int, Query(ge=1, le=lim.max_page, description="pairs per page")] = lim.max_page,
    ) -> Any:
        """The user's stored pairs, oldest first, a page at a time."""
        total, page = eng.store.page(user_id, after=after, limit=limit + 1)
        if not total:
            raise APIError(404, f"unknown user '{user_id}'")
        more = len(page) > limit
        pairs = [{"id": p.id, "created": p.created, **p.pair} for p in page[:limit]]
        next_after = pairs[-1]["id"] if more else None
        return {"user_id": user_id, "num_pairs": total, "pairs": pairs, "next_after": next_after}

    @v1.delete("/users/{user_id}", response_model=DeletedOut, responses=_responses(404))
    def delete_user(user_id: UserId) -> DeletedOut:
        """Forget the user and all their pairs."""
        deleted = eng.forget(user_id)
        if not deleted:
            raise APIError(404, f"unknown user '{user_id}'")
        return DeletedOut(user_id=user_id, deleted=deleted)

    # The hot endpoints answer with ready JSON: FastAPI would otherwise validate the answer again. With
    # numeric options a request is ~1 ms of CPU, so it runs on the event loop itself: handing it to the
    # threadpool cost more than the work (thread switches and GIL hand-offs; measured in bench_service).
    # Text options may need the embedder, which can take long, a PostgreSQL store is a network round trip
    # that may wait for a connection, and a user whose personalised model is not cached needs their pairs
    # read and personalised (up to ~0.3 s for 1,000 pairs of 384 numbers): those go to the threadpool.
    on_loop = eng.store.local and not eng.text

    async def _run(function: Any, user_id: str | None, body: Any) -> Response:
        if on_loop and eng.quick(user_id, len(body.context or ())):
            return function(user_id, body)
        return await run_in_threadpool(function, user_id, body)

    def _score(user_id: str | None, body: Any) -> Response:
        rewards, n = eng.score(user_id, dump(body.options), dump(body.prompt), dump(body.context))
        return _json(ScoreOut(user_id=user_id, rewards=rewards, num_context=n))

    def _compare(user_id: str | None, body: Any) -> Response:
        probs, n = eng.compare(user_id, dump(body.pairs), dump(body.context))
        return _json(CompareOut(user_id=user_id, probabilities=probs, num_context=n))

    @v1.post("/users/{user_id}/score", response_model=ScoreOut)
    async def score_user(user_id: UserId, body: s.ScoreIn) -> Response:
        """Rewards r(y | D^C) of the options for this user (stored pairs plus any inline context; an
        unknown user has no stored pairs)."""
        return await _run(_score, user_id, body)

    @v1.post("/users/{user_id}/compare", response_model=CompareOut)
    async def compare_user(user_id: UserId, body: s.CompareIn) -> Response:
        """P(a ≻ b | D^C) for this user."""
        return await _run(_compare, user_id, body)

    @v1.post("/score", response_model=ScoreOut)
    async def score(body: s.ScoreIn) -> Response:
        """Rewards for a brand-new user described only by the inline context (none: the prior)."""
        return await _run(_score, None, body)

    @v1.post("/compare", response_model=CompareOut)
    async def compare(body: s.CompareIn) -> Response:
        """P(a ≻ b) for a brand-new user described only by the inline context."""
        return await _run(_compare, None, body)

    @v1.post("/users/{user_id}/next-query", response_model=NextQueryOut)
    def next_query(user_id: UserId, body: s.NextQueryIn) -> NextQueryOut:
        """Which candidate pair to ask the user next (pairs the user already answered are excluded)."""
        return NextQueryOut(**eng.next_query(user_id, dump(body.candidates), body.strategy, body.seed))

    @v1.post("/users/{user_id}/generate", response_model=GenerateOut, responses=_responses(409))
    def generate(user_id: UserId, body: s.GenerateIn) -> GenerateOut:
        """Responses of the loaded NP-DPO policy, steered by the user's stored (text) pairs."""
        sampling = body.model_dump(exclude={"prompts"})
        responses, n = eng.generate(user_id, dump(body.prompts), sampling)
        return GenerateOut(user_id=user_id, responses=responses, num_context=n)

    app.include_router(v1, tags=["v1"])
    return app


# ---- running it ----------------------------------------------------------------------------------------
class ServerThread:
    """uvicorn serving ``app`` on ``host`` (a free port unless given) in a background thread.

    >>> with ServerThread(app) as url:
    ...     Client(url).health()
    """

    def __init__(
        self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
    ) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
