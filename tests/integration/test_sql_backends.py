"""The SQL and MongoDB result backends against real servers: lost connections, LISTEN/NOTIFY
across processes, racing writers, and a real worker storing results.

A database restart is simulated by closing every session of the test database from a
second connection (``pg_terminate_backend`` on PostgreSQL, ``KILL`` on MariaDB/MySQL): that
is what a client sees when the server restarts (its connections are closed under it), without
stopping a server other tests and other users share. Addresses: tests/db_services.py.
"""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest
import sqlalchemy as sa

from taskframe import App, chord
from taskframe.backend import ResultBackend, ResultRecord
from taskframe.backends import sql
from taskframe.exceptions import BackendError, ConfigurationError
from taskframe.registry import create_backend
from taskframe.settings import Settings
from taskframe.testing import start_worker
from tests import db_services as db


def new_id() -> str:
    return str(uuid.uuid4())


def record(task_id: str, status: str, result: Any = None) -> ResultRecord:
    return {"task_id": task_id, "status": status, "result": result, "traceback": None, "children": []}


@pytest.fixture
def make_backend() -> Iterator[Callable[[str], ResultBackend]]:
    created: list[ResultBackend] = []

    def make(url: str) -> ResultBackend:
        backend = create_backend(url, Settings())
        created.append(backend)
        return backend

    yield make
    for backend in created:
        backend.close()


#: Backend URL per server; each is resolved (and its service checked) only when a test asks.
URLS: dict[str, Callable[[Path], str]] = {
    "postgresql": lambda tmp_path: db.postgres_database(),
    "mysql": lambda tmp_path: db.mysql_database(),
    "sqlite": lambda tmp_path: f"db+sqlite:///{tmp_path / 'results.db'}",
    "mongodb": lambda tmp_path: db.mongodb_url(),
}


def url_for(name: str, tmp_path: Path) -> str:
    url: str = db.require(lambda: URLS[name](tmp_path))
    return url


# -- lost connections -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "terminate"),
    [("postgresql", db.terminate_postgres_sessions), ("mysql", db.terminate_mysql_sessions)],
)
def test_results_land_while_the_database_drops_every_connection(
    name: str, terminate: Callable[[], int], tmp_path: Path, make_backend: Callable[[str], ResultBackend]
) -> None:
    # Given a writer storing results, a waiter, and a second writer, all with open connections
    url = url_for(name, tmp_path)
    backend, other = make_backend(url), make_backend(url)
    task_ids = [new_id() for _ in range(150)]
    late = new_id()
    errors: list[BaseException] = []
    waited: list[ResultRecord | None] = []

    def write() -> None:
        try:
            for task_id in task_ids:
                backend.store(task_id, record(task_id, "SUCCESS", task_id[:8]), ttl_s=60)
                time.sleep(0.004)
        except BaseException as exc:  # reported below, with the test's own assertion
            errors.append(exc)

    writer = threading.Thread(target=write)
    waiter = threading.Thread(target=lambda: waited.append(backend.wait(late, timeout_s=10.0)))
    other.fetch(late)
    writer.start()
    waiter.start()
    # When every session of the database is closed under them, three times, mid-run
    killed = 0
    for _ in range(3):
        time.sleep(0.2)
        killed += terminate()
    other.store(late, record(late, "SUCCESS", "after the drops"), ttl_s=60)
    stored_at = time.monotonic()
    writer.join(timeout=30)
    waiter.join(timeout=15)
    # Then every write landed, none raised, and the waiter saw the late result
    assert killed >= 3, "the test closed no connection: it proved nothing"
    assert errors == []
    assert [(backend.fetch(task_id) or {}).get("result") for task_id in task_ids] == [t[:8] for t in task_ids]
    assert waited == [record(late, "SUCCESS", "after the drops")]
    assert time.monotonic() - stored_at < 5.0


# -- LISTEN/NOTIFY ----------------------------------------------------------------------------

_STORE_ON_SIGNAL = """
import sys, time
from taskframe.registry import create_backend
from taskframe.settings import Settings

url, task_id = sys.argv[1], sys.argv[2]
backend = create_backend(url, Settings())
backend.fetch("warm-up")  # connected before the signal
print("ready", flush=True)
sys.stdin.readline()
record = {"task_id": task_id, "status": "SUCCESS", "result": 8, "traceback": None, "children": []}
backend.store(task_id, record, ttl_s=60)
print(repr(time.time()), flush=True)
backend.close()
"""


def test_wait_wakes_on_a_notification_from_another_process(
    tmp_path: Path, make_backend: Callable[[str], ResultBackend]
) -> None:
    # Given a PostgreSQL backend waiting for a task (so listening), and another process
    url = url_for("postgresql", tmp_path)
    backend = make_backend(url)
    assert type(backend).supports_wait
    task_id = new_id()
    child = subprocess.Popen(
        [sys.executable, "-c", _STORE_ON_SIGNAL, url, task_id],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "ready"
        found: list[tuple[ResultRecord | None, float]] = []
        waiter = threading.Thread(target=lambda: found.append((backend.wait(task_id, timeout_s=10.0), time.time())))
        waiter.start()
        time.sleep(0.3)  # the waiter has read once and sleeps until notified
        # When the other process stores the result
        child.stdin.write("go\n")
        child.stdin.flush()
        stored_at = float(child.stdout.readline())
        waiter.join(timeout=15)
    finally:
        child.stdin.close()
        child.stdout.close()
        child.wait(timeout=15)
    # Then the waiter returns within a fraction of its 1 s safety-net poll: it was notified
    assert child.returncode == 0
    assert [record for record, _ in found] == [record(task_id, "SUCCESS", 8)]
    assert found[0][1] - stored_at < 0.25


def test_wait_finds_a_result_stored_before_anyone_listened(
    tmp_path: Path, make_backend: Callable[[str], ResultBackend]
) -> None:
    url = url_for("postgresql", tmp_path)
    task_id = new_id()
    make_backend(url).store(task_id, record(task_id, "FAILURE", {"exc_type": "KeyError"}), ttl_s=60)
    fresh = make_backend(url)  # no listener yet: the notification went to nobody
    started = time.monotonic()
    assert fresh.wait(task_id, timeout_s=5.0) == record(task_id, "FAILURE", {"exc_type": "KeyError"})
    assert time.monotonic() - started < 1.0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_listens_on_its_own_connection(
    tmp_path: Path, make_backend: Callable[[str], ResultBackend]
) -> None:
    # Given a parent whose backend is listening (a wait() ran)
    url = url_for("postgresql", tmp_path)
    backend, writer = make_backend(url), make_backend(url)
    assert backend.wait(new_id(), timeout_s=0.05) is None
    task_id = new_id()
    # When a forked child waits through the inherited object, and the parent stores the result
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            started = time.monotonic()
            found = backend.wait(task_id, timeout_s=10.0)
            code = 0 if found == record(task_id, "SUCCESS", "to the child") and time.monotonic() - started < 5 else 2
        finally:
            os._exit(code)
    time.sleep(0.3)
    writer.store(task_id, record(task_id, "SUCCESS", "to the child"), ttl_s=60)
    _, status = os.waitpid(pid, 0)
    # Then the child got it, and the parent's listener still works
    assert os.waitstatus_to_exitcode(status) == 0
    assert backend.wait(task_id, timeout_s=1.0) == record(task_id, "SUCCESS", "to the child")


# -- racing writers ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["postgresql", "mysql", "sqlite", "mongodb"])
def test_late_started_never_replaces_success_under_racing_threads(
    name: str, tmp_path: Path, make_backend: Callable[[str], ResultBackend]
) -> None:
    # Given six threads (on two backend objects) writing STARTED and RETRY over and over
    url = url_for(name, tmp_path)
    backends = [make_backend(url), make_backend(url)]
    task_ids = [new_id() for _ in range(25)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def write_late(backend: ResultBackend, status: str) -> None:
        try:
            while not stop.is_set():
                for task_id in task_ids:
                    backend.store(task_id, record(task_id, status), ttl_s=60)
        except BaseException as exc:
            errors.append(exc)

    writers = [
        threading.Thread(target=write_late, args=(backends[n % 2], status))
        for n, status in enumerate(["STARTED", "RETRY"] * 3)
    ]
    for writer in writers:
        writer.start()
    # When each task's SUCCESS is stored in the middle of them, in random order
    overlapped = 0
    for task_id in random.sample(task_ids, len(task_ids)):
        time.sleep(random.uniform(0.0, 0.01))
        current = backends[0].fetch(task_id)
        overlapped += current is not None and current["status"] in ("STARTED", "RETRY")
        backends[0].store(task_id, record(task_id, "SUCCESS", task_id), ttl_s=60)
    time.sleep(0.2)  # late writes keep coming after the last SUCCESS
    stop.set()
    for writer in writers:
        writer.join(timeout=30)
    # Then every task still reads SUCCESS
    assert errors == []
    assert overlapped > 0, "no late write raced a SUCCESS: the test proved nothing"
    assert [backends[1].fetch(task_id) for task_id in task_ids] == [
        record(task_id, "SUCCESS", task_id) for task_id in task_ids
    ]


# -- a real worker ----------------------------------------------------------------------------


class Boom(Exception):
    pass


@pytest.mark.parametrize("name", ["postgresql", "mysql", "mongodb"])
def test_worker_stores_results_that_get_returns(name: str, tmp_path: Path) -> None:
    # Given an app on the in-memory broker whose results go to the server, and a real worker
    app = App(f"e2e_{name}", broker="memory://", backend=url_for(name, tmp_path))

    @app.task(name="e2e.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="e2e.total")
    def total(values: list[int]) -> int:
        return sum(values)

    @app.task(name="e2e.boom")
    def boom(message: str) -> None:
        raise Boom(message)

    try:
        with start_worker(app, concurrency=4):
            # When tasks run, fail, and join in a chord (a counter and documents in the backend)
            sums = [add.delay(i, i) for i in range(10)]
            failed = boom.delay("from the worker")
            joined = chord([add.s(i, 1) for i in range(5)], total.s()).delay()
            # Then get() returns what the worker stored, through the server
            assert [result.get(timeout=15) for result in sums] == [2 * i for i in range(10)]
            with pytest.raises(Boom, match="from the worker"):
                failed.get(timeout=15)
            assert joined.get(timeout=15) == 15
            assert sums[0].state == "SUCCESS"
            assert failed.state == "FAILURE"
    finally:
        app.close()


# -- schema, expiry and configuration ---------------------------------------------------------


SQL_NAMESPACES: dict[str, Callable[[Path], str]] = {
    "postgresql": lambda tmp_path: db.postgres_url_for_test(),
    "mysql": lambda tmp_path: db.mysql_url_for_test(),
    "sqlite": lambda tmp_path: f"db+sqlite:///{tmp_path / 'results.db'}",
}


@pytest.mark.parametrize("name", sorted(SQL_NAMESPACES))
def test_sql_tables_are_created_on_first_use_with_a_schema_version(
    name: str, tmp_path: Path, make_backend: Callable[[str], ResultBackend]
) -> None:
    backend: Any = make_backend(db.require(lambda: SQL_NAMESPACES[name](tmp_path)))
    backend.fetch(new_id())
    engine = backend._engine()
    tables = set(sa.inspect(engine).get_table_names())
    assert {"taskframe_schema_version", "taskframe_results", "taskframe_kv", "taskframe_counters"} <= tables
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT component, version FROM taskframe_schema_version")).all() == [
            ("results", 1)
        ]


@pytest.mark.parametrize("name", sorted(SQL_NAMESPACES))
def test_sql_sweep_deletes_expired_rows_in_batches_and_runs_from_store(
    name: str, tmp_path: Path, make_backend: Callable[[str], ResultBackend]
) -> None:
    # Given more expired rows than one batch deletes, and rows that have not expired
    backend: Any = make_backend(db.require(lambda: SQL_NAMESPACES[name](tmp_path)))
    backend.fetch(new_id())
    past, future = time.time() - 10, time.time() + 600
    rows = [{"key": f"old-{n:05}", "value": "{}", "expires_at": past} for n in range(sql.SWEEP_BATCH_ROWS * 2 + 100)]
    rows += [{"key": f"new-{n}", "value": "{}", "expires_at": future} for n in range(3)]
    with backend._engine().begin() as conn:
        conn.execute(sa.insert(sql.kv), rows)
    # When a sweep runs, Then it removes exactly the expired rows
    assert backend.purge_expired(budget_s=30) == sql.SWEEP_BATCH_ROWS * 2 + 100
    assert backend.purge_expired() == 0
    assert [backend.get(f"new-{n}") for n in range(3)] == [{}, {}, {}]
    # And store() sweeps by itself once the interval has passed
    with backend._engine().begin() as conn:
        conn.execute(sa.insert(sql.kv), [{"key": "old-again", "value": "{}", "expires_at": past}])
    backend._sweeper.next_at = 0.0
    task_id = new_id()
    backend.store(task_id, record(task_id, "SUCCESS"), ttl_s=60)
    with backend._engine().connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(sql.kv)).scalar_one() == 3


def test_sql_backend_refuses_tables_of_a_newer_schema(tmp_path: Path) -> None:
    url = f"db+sqlite:///{tmp_path / 'results.db'}"
    backend = create_backend(url, Settings())
    backend.store("t1", record("t1", "SUCCESS"), ttl_s=60)
    backend.close()
    with sqlite3.connect(tmp_path / "results.db") as conn:
        conn.execute("UPDATE taskframe_schema_version SET version = 99")
    conn.close()
    newer = create_backend(url, Settings())
    with pytest.raises(BackendError, match="schema version 99"):
        newer.fetch("t1")
    newer.close()


def test_sql_backend_refuses_keys_longer_than_its_column(tmp_path: Path) -> None:
    backend = create_backend(f"db+sqlite:///{tmp_path / 'results.db'}", Settings())
    with pytest.raises(BackendError, match="at most 255"):
        backend.store("x" * 256, record("x", "SUCCESS"), ttl_s=60)
    backend.close()


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("db+oracle://scott@host/db", {}, "does not support 'oracle'"),
        ("db+sqlite://", {}, "needs an SQLite file"),
        ("db+sqlite:///:memory:", {}, "needs an SQLite file"),
        ("db+sqlite:///x.db", {"bogus": 1}, "unknown backend_options"),
        ("db+mysql+mysqldb://scott@host/db", {}, "needs its database driver"),
        ("db+sqlite:///x.db", {"pool_size": "many"}, "pool_size must be a number"),
        ("mongodb://127.0.0.1:1/a.b", {}, "forbids"),
        ("mongodb://127.0.0.1:1/db", {"pool": 1}, "unknown backend_options"),
    ],
)
def test_bad_configuration_fails_when_the_backend_is_built(
    url: str, options: dict[str, Any], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match=message):
        create_backend(url, Settings(backend_options=options))


def test_sql_sqlite_url_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a relative path, When the worker later changes directory, Then the file stays put
    monkeypatch.chdir(tmp_path)
    backend = create_backend("db+sqlite:///deep/results.db", Settings())
    monkeypatch.chdir("/")
    backend.store("t1", record("t1", "SUCCESS"), ttl_s=60)
    backend.close()
    assert (tmp_path / "deep" / "results.db").is_file()


def test_mongodb_collections_have_ttl_indexes(tmp_path: Path, make_backend: Callable[[str], ResultBackend]) -> None:
    url = url_for("mongodb", tmp_path)
    backend = make_backend(url)
    task_id = new_id()
    backend.store(task_id, record(task_id, "SUCCESS"), ttl_s=60)
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(url)
    with client:
        database = client.get_default_database()
        for name in ("taskframe_results", "taskframe_kv", "taskframe_counters"):
            ttl = [
                index.get("expireAfterSeconds")
                for index in database[name].list_indexes()
                if list(index["key"]) == ["expires_at"]
            ]
            assert ttl == [0], name
        stored = database["taskframe_results"].find_one({"_id": task_id})
    assert stored is not None and stored["status"] == "SUCCESS" and "expires_at" in stored


@pytest.mark.parametrize("name", ["postgresql", "mysql"])
def test_an_unknown_database_fails_at_once_with_a_hint(name: str, tmp_path: Path) -> None:
    # Retries are for outages; a database that does not exist will not appear by waiting.
    url = url_for(name, tmp_path).rsplit("/", 1)[0] + "/taskframe_no_such_database"
    backend = create_backend(url, Settings())
    started = time.monotonic()
    with pytest.raises(BackendError, match="create the database"):
        backend.fetch(new_id())
    assert time.monotonic() - started < 5.0
    backend.close()
