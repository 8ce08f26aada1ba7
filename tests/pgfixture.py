"""PostgreSQL for the tests: one throw-away cluster per test session (``pg_cluster``, a temporary folder,
a loopback port, stopped and removed after the tests) and a fresh database per test (``pg_url``).

Without PostgreSQL's server binaries the tests that use them are skipped with a one-line reason (``make
test`` installs Debian's ``postgresql`` package first when it can). Import the fixtures into a test
module: ``from pgfixture import pg_cluster_fixture, pg_url_fixture  # noqa: F401`` (registered under
the names ``pg_cluster`` and ``pg_url``).
"""

from __future__ import annotations

import itertools

import pytest

from steerable.service.pgcluster import TempCluster, find_bindir

NO_POSTGRES = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found and not installable here: the PostgreSQL "
    "store tests are skipped (make test installs Debian's postgresql package when run as root)"
)
_names = itertools.count()


def require_postgres() -> None:
    """Skip the calling test, with the reason, when PostgreSQL is not installed."""
    if find_bindir() is None:
        pytest.skip(NO_POSTGRES)


@pytest.fixture(scope="session", name="pg_cluster")
def pg_cluster_fixture():
    """A running throw-away PostgreSQL server for the whole session."""
    require_postgres()
    cluster = TempCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(name="pg_url")
def pg_url_fixture(pg_cluster) -> str:
    """The URL of a new, empty database on the session's server."""
    return pg_cluster.create_database(f"test_{next(_names)}")
