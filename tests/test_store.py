"""The preference store's semantics, the same on both back ends (SQLite and a real PostgreSQL server):
a batch is one transaction, ids increase and are never reused, pairs come back in id order and become
visible in that order, the kind of option is recorded, and a database that cannot answer raises
StoreUnavailable (PostgreSQL stopped and restarted under a running service: test_service_postgres)."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from pgfixture import pg_cluster_fixture, pg_url_fixture  # noqa: F401
from steerable.errors import ConfigError
from steerable.service.store import StoreUnavailable, TooManyPairs, describe_db, open_store

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path) -> str:
    """A new, empty database of each kind: an SQLite file or a PostgreSQL URL."""
    if request.param == "sqlite":
        return str(tmp_path / "prefs.db")
    return request.getfixturevalue("pg_url")


def _pair(i: int, j: int = 0) -> dict:
    return {"chosen": [float(i), float(j)], "rejected": [-float(i), -float(j)]}


def _poison(store) -> None:
    """Make the database refuse any pair containing 'poison' (as a failing disk or constraint would)."""
    if store.kind == "sqlite":
        store._conn().execute(
            "CREATE TRIGGER poison BEFORE INSERT ON pairs WHEN NEW.pair LIKE '%poison%' "
            "BEGIN SELECT RAISE(ABORT, 'poisoned pair'); END"
        )
    else:
        with store.pool.connection() as conn:
            conn.execute("ALTER TABLE steerable_pairs ADD CONSTRAINT poison CHECK (pair NOT LIKE '%poison%')")


def test_pairs_round_trip_in_id_order_and_ids_are_never_reused(db):
    with open_store(db) as store:
        given = [_pair(1), {**_pair(2), "prompt": [{"role": "user", "content": "héllo \u2603"}]}]
        assert store.add_pairs("a", given) == 2
        assert store.add_pairs("b", [_pair(3)]) == 1
        assert store.add_pairs("a", [_pair(4)]) == 3
        stored = store.pairs("a")
        assert [s.pair for s in stored] == [*given, _pair(4)]
        ids = [s.id for s in stored]
        assert ids == sorted(ids) and len(set(ids)) == 3
        assert store.version("a") == ids[-1] and store.version("nobody") == 0
        assert [s.id for s in store.pairs("a", last=2)] == ids[1:]
        assert [s.id for s in store.pairs("a", after=ids[0], limit=1)] == ids[1:2]
        assert store.page("a", after=ids[1]) == (3, store.pairs("a")[2:])
        assert store.count("a") == 3 and store.num_users() == 2
        old = max([*ids, store.version("b")])
        assert store.delete_user("a") == 3 and store.delete_user("a") == 0
        assert store.pairs("a") == [] and store.version("a") == 0
        store.add_pairs("a", [_pair(5)])
        assert store.version("a") > old  # a new id, never one of the deleted ones


def test_a_batch_is_one_transaction(db):
    with open_store(db, max_pairs_per_user=5) as store:
        store.add_pairs("a", [_pair(1)] * 2)
        with pytest.raises(TooManyPairs, match="limit of 5"):
            store.add_pairs("a", [_pair(2)] * 4)
        _poison(store)
        batch = [_pair(3), _pair(4), {"chosen": "poison", "rejected": "x"}]
        with pytest.raises(Exception, match="poison"):
            store.add_pairs("a", batch)  # fails on its third row: the first two must not stay either
        assert [s.pair for s in store.pairs("a")] == [_pair(1)] * 2
        assert store.add_pairs("a", [_pair(5)]) == 3


def test_the_kind_of_option_is_recorded_and_another_refused(db):
    with open_store(db) as store:
        store.ensure_meta("options", "numeric:2")
        store.ensure_meta("options", "numeric:2")
    with open_store(db) as store, pytest.raises(ConfigError, match=r"holds options 'numeric:2'.*numeric:3"):
        store.ensure_meta("options", "numeric:3", " (start the server with another --db)")


def test_concurrent_writers_on_two_stores_lose_nothing_and_readers_never_skip_a_pair(db):
    """Two store objects (two replicas) and 6 writers to one user; a reader that pages with ``after``
    while they write must end up with every pair: pairs become visible in id order."""
    stores = [open_store(db), open_store(db)]
    done = threading.Event()
    errors: list[BaseException] = []
    seen: list[int] = []

    def writer(w: int) -> None:
        try:
            for i in range(15):
                stores[w % 2].add_pairs("shared", [_pair(w, 10 * i + j) for j in range(1 + i % 3)])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader() -> None:
        after = 0
        while True:
            finished = done.is_set()
            page = stores[1].pairs("shared", after=after)
            seen.extend(s.id for s in page)
            after = page[-1].id if page else after
            if finished:
                return

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    try:
        assert not errors
        stored = stores[0].pairs("shared")
        assert len(stored) == 6 * sum(1 + i % 3 for i in range(15))
        assert seen == [s.id for s in stored]  # the paging reader skipped nothing
        for w in range(6):  # each writer's pairs once, in the order it sent them
            mine = [s.pair["chosen"][1] for s in stored if s.pair["chosen"][0] == w]
            assert mine == [float(10 * i + j) for i in range(15) for j in range(1 + i % 3)]
    finally:
        for s in stores:
            s.close()


def test_a_locked_sqlite_database_is_unavailable_not_an_error(tmp_path):
    path = tmp_path / "prefs.db"
    with open_store(path) as store:
        store.add_pairs("a", [_pair(1)])
        store.timeout = 0.2
        store._local.conn = None  # a new connection with the short timeout
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(StoreUnavailable, match="locked"):
                store.add_pairs("a", [_pair(2)])
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert store.add_pairs("a", [_pair(3)]) == 2


def test_opening_an_unreachable_postgres_is_one_clear_error():
    url = "postgresql://steer:s3cret@127.0.0.1:9/prefs"
    with pytest.raises(Exception, match=r"127\.0\.0\.1:9/prefs: cannot open the preference database") as err:
        open_store(url, timeout=1.0)
    assert "s3cret" not in str(err.value) and "\n" not in str(err.value)
    assert describe_db(url) == "postgresql://steer:***@127.0.0.1:9/prefs"
