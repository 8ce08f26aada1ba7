"""The personalization service: users' preference pairs in SQLite, a saved reward model behind a FastAPI
app (``steerable serve``), and a small Python client.

* :mod:`steerable.service.store` — :class:`PreferenceStore`, the SQLite storage.
* :mod:`steerable.service.schemas` — :class:`Limits`, errors and the request/response schemas.
* :mod:`steerable.service.engine` — :class:`Engine` (models, embedder, caches) and :func:`build_engine`.
* :mod:`steerable.service.app` — :func:`create_app` (the app factory) and :class:`ServerThread`.
* :mod:`steerable.service.client` — :class:`Client`.
"""

from steerable.service.app import ServerThread, create_app
from steerable.service.client import Client, ServiceError
from steerable.service.engine import Engine, build_engine
from steerable.service.schemas import Limits
from steerable.service.store import PreferenceStore

__all__ = [
    "Client",
    "Engine",
    "Limits",
    "PreferenceStore",
    "ServerThread",
    "ServiceError",
    "build_engine",
    "create_app",
]
