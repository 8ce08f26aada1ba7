"""The personalization service: users' preference pairs in SQLite or PostgreSQL, a saved reward model
behind a FastAPI app (``steerable serve``), and a small Python client.

* :mod:`steerable.service.store` — :class:`PreferenceStore` (the interface) and :func:`open_store`;
  :mod:`~steerable.service.store_sqlite` (one file) and :mod:`~steerable.service.store_postgres` (shared
  by several replicas) implement it; :mod:`~steerable.service.pgcluster` starts throw-away PostgreSQL
  servers for tests and benchmarks.
* :mod:`steerable.service.schemas` — :class:`Limits`, errors and the request/response schemas.
* :mod:`steerable.service.caches` — the byte-bounded LRU cache and the text encoder.
* :mod:`steerable.service.engine` — :class:`Engine` (models, embedder, personalisation) and
  :func:`build_engine`.
* :mod:`steerable.service.app` — :func:`create_app` (the app factory) and :class:`ServerThread`.
* :mod:`steerable.service.client` — :class:`Client`.
"""

from steerable.service.app import ServerThread, create_app
from steerable.service.client import Client, ServiceError
from steerable.service.engine import Engine, build_engine
from steerable.service.schemas import Limits
from steerable.service.store import PreferenceStore, StoreUnavailable, open_store

__all__ = [
    "Client",
    "Engine",
    "Limits",
    "PreferenceStore",
    "ServerThread",
    "ServiceError",
    "StoreUnavailable",
    "build_engine",
    "create_app",
    "open_store",
]
