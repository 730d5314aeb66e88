"""The contract every result backend keeps (taskframe.backend.ResultBackend).

Each test runs once per entry of ``tests/conformance/backends.py``. Task ids and keys are
fresh per test (uuid4), so backends on shared services need no cleaning between tests.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from taskframe.backend import READY_STATES, ResultBackend, ResultRecord
from taskframe.exceptions import BackendError, ConfigurationError
from taskframe.registry import create_backend
from taskframe.settings import Settings

from .backends import BackendSpec, ServiceUnavailable, backend_params

MakeBackend = Callable[..., ResultBackend]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(params=backend_params())
def backend_spec(request: pytest.FixtureRequest) -> BackendSpec:
    spec: BackendSpec = request.param
    if spec.check is not None:
        try:
            spec.check()
        except ServiceUnavailable as exc:
            if os.environ.get("CI", "").lower() in ("true", "1"):
                pytest.fail(f"{spec.name}: {exc}")
            pytest.skip(f"{spec.name}: {exc}")
    return spec


@pytest.fixture
def backend_url(backend_spec: BackendSpec, tmp_path: Path) -> str:
    return backend_spec.make_url(tmp_path)


@pytest.fixture
def make_backend(backend_url: str) -> Iterator[MakeBackend]:
    """Builds backends through the registry, as the App does; closes them after the test."""
    created: list[ResultBackend] = []

    def make(url: str | None = None, **settings: Any) -> ResultBackend:
        backend = create_backend(url or backend_url, Settings(**settings))
        created.append(backend)
        return backend

    yield make
    for backend in created:
        backend.close()


@pytest.fixture
def backend(make_backend: MakeBackend) -> ResultBackend:
    return make_backend()


def new_id() -> str:
    return str(uuid.uuid4())


def record(task_id: str, status: str, result: Any = None, **extra: Any) -> ResultRecord:
    """A record in Celery's layout."""
    done = "2026-11-25T14:43:51.123456+00:00" if status in READY_STATES else None
    return {
        "task_id": task_id,
        "status": status,
        "result": result,
        "traceback": None,
        "children": [],
        "date_done": done,
        **extra,
    }


def status_of(backend: ResultBackend, task_id: str) -> str | None:
    found = backend.fetch(task_id)
    return None if found is None else found["status"]


# -- records ----------------------------------------------------------------------------------


def test_backend_satisfies_the_protocol(backend: ResultBackend) -> None:
    assert isinstance(backend, ResultBackend)
    assert isinstance(type(backend).supports_wait, bool)


def test_store_then_fetch_round_trips_a_celery_record(backend: ResultBackend) -> None:
    # Given a record with a nested, unicode result, children and extended fields
    task_id = new_id()
    result = {"sum": 8, "parts": [1, 2.5, None, True, {"deep": ["ü", "日本", "🎉"]}], "é": "ñ"}
    stored = record(
        task_id,
        "SUCCESS",
        result,
        children=[[["child-1", None], None]],
        name="tasks.add",
        args=[4, 4],
        kwargs={"key": "välue"},
        retries=0,
    )
    # When it is stored and fetched
    backend.store(task_id, stored, ttl_s=60)
    # Then it comes back equal, key for key
    assert backend.fetch(task_id) == stored


def test_failure_record_round_trips(backend: ResultBackend) -> None:
    task_id = new_id()
    exc = {"exc_type": "ValueError", "exc_module": "builtins", "exc_message": ["bad: ✗"]}
    stored = record(task_id, "FAILURE", exc, traceback='Traceback...\n  File "x.py"\nValueError')
    backend.store(task_id, stored, ttl_s=None)
    assert backend.fetch(task_id) == stored


def test_fetch_of_unknown_task_is_none(backend: ResultBackend) -> None:
    assert backend.fetch(new_id()) is None


def test_unserializable_record_raises_backend_error_and_stores_nothing(
    backend: ResultBackend,
) -> None:
    task_id = new_id()
    with pytest.raises(BackendError, match="JSON"):
        backend.store(task_id, record(task_id, "SUCCESS", object()), ttl_s=60)
    assert backend.fetch(task_id) is None


@pytest.mark.parametrize("ready", sorted(READY_STATES))
@pytest.mark.parametrize("late", ["STARTED", "RETRY", "PROGRESS"])
def test_late_non_ready_state_does_not_replace_a_ready_one(backend: ResultBackend, ready: str, late: str) -> None:
    # Given a task whose final state is stored
    task_id = new_id()
    backend.store(task_id, record(task_id, ready, "final"), ttl_s=60)
    # When a late, non-ready write arrives (a slow STARTED, a retry racing a success)
    backend.store(task_id, record(task_id, late, {"progress": 50}), ttl_s=60)
    # Then the final state stays
    assert backend.fetch(task_id) == record(task_id, ready, "final")


@pytest.mark.parametrize("ready", sorted(READY_STATES))
def test_ready_state_replaces_a_non_ready_one(backend: ResultBackend, ready: str) -> None:
    task_id = new_id()
    backend.store(task_id, record(task_id, "STARTED"), ttl_s=60)
    backend.store(task_id, record(task_id, ready, 8), ttl_s=60)
    assert backend.fetch(task_id) == record(task_id, ready, 8)


@pytest.mark.parametrize(("first", "second"), [("FAILURE", "SUCCESS"), ("SUCCESS", "FAILURE"), ("SUCCESS", "REVOKED")])
def test_ready_state_replaces_another_ready_one(backend: ResultBackend, first: str, second: str) -> None:
    task_id = new_id()
    backend.store(task_id, record(task_id, first, 1), ttl_s=60)
    backend.store(task_id, record(task_id, second, 2), ttl_s=60)
    assert backend.fetch(task_id) == record(task_id, second, 2)


def test_non_ready_states_replace_each_other(backend: ResultBackend) -> None:
    task_id = new_id()
    for status, retries in [("STARTED", 0), ("RETRY", 0), ("STARTED", 1), ("PROGRESS", 1)]:
        backend.store(task_id, record(task_id, status, retries=retries), ttl_s=60)
        assert backend.fetch(task_id) == record(task_id, status, retries=retries)


def test_concurrent_late_writes_never_replace_success(backend: ResultBackend) -> None:
    # Given 8 threads writing STARTED over and over
    task_id = new_id()
    start = threading.Barrier(9)

    def write_started() -> None:
        start.wait()
        for _ in range(30):
            backend.store(task_id, record(task_id, "STARTED"), ttl_s=60)

    threads = [threading.Thread(target=write_started) for _ in range(8)]
    for thread in threads:
        thread.start()
    # When SUCCESS is stored while they run
    start.wait()
    backend.store(task_id, record(task_id, "SUCCESS", 8), ttl_s=60)
    for thread in threads:
        thread.join()
    # Then SUCCESS is what stays
    assert backend.fetch(task_id) == record(task_id, "SUCCESS", 8)


def test_forget_deletes_the_record_and_is_idempotent(backend: ResultBackend) -> None:
    task_id = new_id()
    backend.store(task_id, record(task_id, "SUCCESS", 8), ttl_s=60)
    backend.forget(task_id)
    assert backend.fetch(task_id) is None
    backend.forget(task_id)
    backend.forget(new_id())
    # A forgotten task reads as PENDING again, so any state may be stored anew.
    backend.store(task_id, record(task_id, "STARTED"), ttl_s=60)
    assert status_of(backend, task_id) == "STARTED"


def test_fresh_object_on_the_same_url_sees_the_data(
    backend_spec: BackendSpec, backend: ResultBackend, make_backend: MakeBackend
) -> None:
    if not backend_spec.crosses_processes:
        pytest.skip(f"{backend_spec.name} keeps its data in one object")
    task_id, key = new_id(), f"test:{new_id()}"
    backend.store(task_id, record(task_id, "SUCCESS", [1, "ü"]), ttl_s=60)
    backend.put(key, {"n": 1}, ttl_s=60)
    backend.incr(key + ":count", ttl_s=60)

    other = make_backend()
    assert other.fetch(task_id) == record(task_id, "SUCCESS", [1, "ü"])
    assert other.get(key) == {"n": 1}
    assert other.incr(key + ":count", ttl_s=60) == 2
    other.forget(task_id)
    assert backend.fetch(task_id) is None


# -- expiry -----------------------------------------------------------------------------------


def test_entries_with_ttl_expire_and_entries_without_stay(backend: ResultBackend) -> None:
    # Given records, documents and counters, some with a 0.5 s TTL and some with none
    short, short_unread, kept = new_id(), new_id(), new_id()
    prefix = f"test:{new_id()}:"
    backend.store(short, record(short, "SUCCESS", 1), ttl_s=0.5)
    backend.store(short_unread, record(short_unread, "SUCCESS", 1), ttl_s=0.5)
    backend.store(kept, record(kept, "SUCCESS", 2), ttl_s=None)
    backend.put(prefix + "short", {"doc": "short"}, ttl_s=0.5)
    backend.put(prefix + "kept", {"doc": "kept"}, ttl_s=None)
    assert backend.incr(prefix + "count-short", ttl_s=0.5) == 1
    assert backend.incr(prefix + "count-short", ttl_s=0.5) == 2
    assert backend.incr(prefix + "count-kept", ttl_s=None) == 1
    assert status_of(backend, short) == "SUCCESS"
    assert backend.get(prefix + "short") == {"doc": "short"}

    # When the TTL has passed
    time.sleep(1.0)

    # Then the short-lived entries read as missing and the others are still there
    assert backend.fetch(short) is None
    assert backend.fetch(kept) == record(kept, "SUCCESS", 2)
    assert backend.get(prefix + "short") is None
    assert backend.get(prefix + "kept") == {"doc": "kept"}
    assert backend.scan(prefix) == [{"doc": "kept"}]
    assert backend.incr(prefix + "count-short", ttl_s=0.5) == 1  # an expired counter restarts
    assert backend.incr(prefix + "count-kept", ttl_s=None) == 2
    # An expired final state no longer blocks a new run of the same task id.
    backend.store(short_unread, record(short_unread, "STARTED"), ttl_s=60)
    assert status_of(backend, short_unread) == "STARTED"


def test_purge_expired_removes_only_expired_entries(backend: ResultBackend) -> None:
    purge: Callable[[], int] | None = getattr(backend, "purge_expired", None)
    if purge is None:
        pytest.skip("this backend's store expires entries by itself")
    prefix = f"test:{new_id()}:"
    expiring, kept = [new_id() for _ in range(3)], new_id()
    for task_id in expiring:
        backend.store(task_id, record(task_id, "SUCCESS"), ttl_s=0.2)
    backend.store(kept, record(kept, "SUCCESS"), ttl_s=None)
    backend.put(prefix + "doc", {"a": 1}, ttl_s=0.2)
    backend.incr(prefix + "count", ttl_s=0.2)
    time.sleep(0.4)

    assert purge() == 5
    assert purge() == 0
    assert status_of(backend, kept) == "SUCCESS"


# -- wait -------------------------------------------------------------------------------------


def _store_later(backend: ResultBackend, delay_s: float, stored: ResultRecord) -> threading.Thread:
    def run() -> None:
        time.sleep(delay_s)
        backend.store(stored["task_id"], stored, ttl_s=60)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_wait_returns_promptly_once_another_thread_stores_success(
    backend: ResultBackend,
) -> None:
    task_id = new_id()
    thread = _store_later(backend, 0.2, record(task_id, "SUCCESS", 8))
    started = time.monotonic()
    found = backend.wait(task_id, timeout_s=5.0)
    elapsed_s = time.monotonic() - started
    thread.join()
    assert found == record(task_id, "SUCCESS", 8)
    assert 0.15 <= elapsed_s < 0.2 + 0.5


def test_wait_returns_none_at_the_timeout_and_not_before(backend: ResultBackend) -> None:
    started = time.monotonic()
    assert backend.wait(new_id(), timeout_s=0.3) is None
    elapsed_s = time.monotonic() - started
    assert 0.29 <= elapsed_s < 1.5


def test_wait_ignores_states_that_are_not_ready(backend: ResultBackend) -> None:
    # Given a running task that then asks for a retry
    task_id = new_id()
    backend.store(task_id, record(task_id, "STARTED"), ttl_s=60)
    retry = _store_later(backend, 0.1, record(task_id, "RETRY"))
    # When waiting, the non-ready states do not end the wait
    started = time.monotonic()
    assert backend.wait(task_id, timeout_s=0.4) is None
    assert time.monotonic() - started >= 0.39
    retry.join()
    # Then the final state does
    success = _store_later(backend, 0.1, record(task_id, "SUCCESS", 3))
    assert backend.wait(task_id, timeout_s=5.0) == record(task_id, "SUCCESS", 3)
    success.join()


def test_wait_returns_an_already_ready_record_at_once(backend: ResultBackend) -> None:
    task_id = new_id()
    backend.store(task_id, record(task_id, "FAILURE", {"exc_type": "KeyError"}), ttl_s=60)
    started = time.monotonic()
    assert status_of(backend, task_id) == "FAILURE"
    assert backend.wait(task_id, timeout_s=5.0) == record(task_id, "FAILURE", {"exc_type": "KeyError"})
    assert time.monotonic() - started < 0.2


# -- counters and documents -------------------------------------------------------------------


def test_incr_is_atomic_between_threads(backend: ResultBackend) -> None:
    key = f"test:{new_id()}:count"
    start = threading.Barrier(8)
    seen: list[int] = []
    seen_lock = threading.Lock()

    def count() -> None:
        start.wait()
        values = [backend.incr(key, ttl_s=60) for _ in range(50)]
        with seen_lock:
            seen.extend(values)

    threads = [threading.Thread(target=count) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(seen) == list(range(1, 401))
    assert backend.incr(key, ttl_s=60) == 401


_INCR_CHILD = """
import sys
from taskframe.registry import create_backend
from taskframe.settings import Settings

url, key, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
backend = create_backend(url, Settings())
backend.incr(key + ":warm-up", ttl_s=60)  # connect before the start signal
print("ready", flush=True)
sys.stdin.readline()
values = [backend.incr(key, ttl_s=60) for _ in range(count)]
backend.close()
print(" ".join(map(str, values)), flush=True)
"""


def test_incr_is_atomic_between_processes(backend_spec: BackendSpec, backend_url: str) -> None:
    if not backend_spec.crosses_processes:
        pytest.skip(f"{backend_spec.name} keeps its data in one process")
    # Given two processes that connected and wait for one start signal
    key, per_process = f"test:{new_id()}:count", 200
    argv = [sys.executable, "-c", _INCR_CHILD, backend_url, key, str(per_process)]
    with contextlib.ExitStack() as stack:
        children = [
            stack.enter_context(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            for _ in range(2)
        ]
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
        # When both increment the same counter at once
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        outputs = [child.communicate(timeout=60)[0] for child in children]
        codes = [child.returncode for child in children]
    # Then every value was handed out exactly once
    assert codes == [0, 0]
    values = [int(value) for output in outputs for value in output.split()]
    assert sorted(values) == list(range(1, 2 * per_process + 1))


def test_put_get_scan_delete(backend: ResultBackend) -> None:
    prefix = f"test:{new_id()}:"
    backend.put(prefix + "group:1:a", {"n": 1, "ü": ["日本"]}, ttl_s=60)
    backend.put(prefix + "group:1:b", {"n": 2}, ttl_s=None)
    backend.put(prefix + "group:2:a", {"n": 3}, ttl_s=60)
    backend.put(prefix + "group:10", {"n": 10}, ttl_s=60)

    assert backend.get(prefix + "group:1:a") == {"n": 1, "ü": ["日本"]}
    assert backend.get(prefix + "missing") is None
    assert sorted(doc["n"] for doc in backend.scan(prefix + "group:1:")) == [1, 2]
    assert sorted(doc["n"] for doc in backend.scan(prefix + "group:1")) == [1, 2, 10]
    assert sorted(doc["n"] for doc in backend.scan(prefix)) == [1, 2, 3, 10]
    assert backend.scan(f"test:{new_id()}:") == []

    backend.put(prefix + "group:1:a", {"n": 100}, ttl_s=60)  # overwrite
    assert backend.get(prefix + "group:1:a") == {"n": 100}

    backend.delete(prefix + "group:1:a")
    backend.delete(prefix + "group:1:a")  # idempotent
    assert backend.get(prefix + "group:1:a") is None
    assert sorted(doc["n"] for doc in backend.scan(prefix + "group:1:")) == [2]


def test_keys_with_path_characters_are_plain_keys(backend: ResultBackend) -> None:
    prefix = f"test:{new_id()}:"
    for key in ["../../etc/passwd", "a/b\\c", ".hidden", "..", "spaces and %41"]:
        backend.put(prefix + key, {"key": key}, ttl_s=60)
        assert backend.get(prefix + key) == {"key": key}
    assert len(backend.scan(prefix)) == 5


def test_delete_also_resets_the_counter_of_that_key(backend: ResultBackend) -> None:
    key = f"test:{new_id()}:chord"
    assert backend.incr(key, ttl_s=60) == 1
    assert backend.incr(key, ttl_s=60) == 2
    backend.delete(key)
    assert backend.incr(key, ttl_s=60) == 1


# -- fork -------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_backend_object_survives_fork(backend_spec: BackendSpec, backend: ResultBackend) -> None:
    # Given a backend the parent has used (so any connection is open)
    before, in_child, after = new_id(), new_id(), new_id()
    key = f"test:{new_id()}:count"
    backend.store(before, record(before, "SUCCESS", "parent"), ttl_s=60)
    assert backend.incr(key, ttl_s=60) == 1

    # When a forked child reads and writes through the inherited object
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            seen = backend.fetch(before)
            backend.store(in_child, record(in_child, "SUCCESS", "child"), ttl_s=60)
            stored = backend.fetch(in_child)
            counted = backend.incr(key, ttl_s=60)
            gc.collect()  # drop whatever the child no longer references, as it would later
            ok = seen == record(before, "SUCCESS", "parent") and counted == 2
            code = 0 if ok and stored == record(in_child, "SUCCESS", "child") else 2
        finally:
            os._exit(code)
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0, "the child's checks failed"

    # Then the parent's object still works, and sees the child's writes where data is shared
    backend.store(after, record(after, "SUCCESS", "parent again"), ttl_s=60)
    assert backend.fetch(after) == record(after, "SUCCESS", "parent again")
    assert backend.fetch(before) == record(before, "SUCCESS", "parent")
    if backend_spec.crosses_processes:
        assert backend.fetch(in_child) == record(in_child, "SUCCESS", "child")
        assert backend.incr(key, ttl_s=60) == 3
    else:
        assert backend.fetch(in_child) is None


# -- adapter-specific: file -------------------------------------------------------------------


def _file_backend(path: Path | str) -> ResultBackend:
    return create_backend(f"file://{path}", Settings())


@pytest.mark.parametrize("task_id", ["../x", "..", ".", "", "a/b", "a\\b", ".hidden", "a\0b"])
def test_file_backend_rejects_task_ids_that_are_not_plain_file_names(tmp_path: Path, task_id: str) -> None:
    backend = _file_backend(tmp_path / "results")
    with pytest.raises(BackendError, match="cannot name a file"):
        backend.store(task_id, record(task_id, "SUCCESS"), ttl_s=60)
    with pytest.raises(BackendError, match="cannot name a file"):
        backend.fetch(task_id)
    assert not (tmp_path / "x.json").exists()
    backend.close()


def test_file_backend_creates_its_directory_on_first_write(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "results"
    backend = _file_backend(root)
    assert backend.fetch(new_id()) is None
    assert not root.exists()
    task_id = new_id()
    backend.store(task_id, record(task_id, "SUCCESS"), ttl_s=60)
    assert (root / f"{task_id}.json").is_file()
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp-")] == []
    backend.close()


def test_file_backend_reports_a_directory_it_cannot_create(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    backend = _file_backend(blocker / "results")
    with pytest.raises(ConfigurationError, match="cannot create the directory"):
        backend.store("t1", record("t1", "SUCCESS"), ttl_s=60)
    backend.close()


def test_file_backend_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from taskframe.backends.files import directory_of

    monkeypatch.chdir(tmp_path)
    assert directory_of("file:///var/results") == "/var/results"
    assert directory_of("file://localhost/var/results") == "/var/results"
    assert directory_of("file://rel/results") == str(tmp_path / "rel" / "results")
    for bad in ["file://", "file:///", "sqlite:///x"]:
        with pytest.raises(ConfigurationError):
            directory_of(bad)


# -- adapter-specific: sqlite -----------------------------------------------------------------


def test_sqlite_backend_shares_a_file_with_other_tables(tmp_path: Path) -> None:
    # Given a file where another component (the broker) keeps its tables and user_version
    path = tmp_path / "shared.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript("CREATE TABLE tf_messages (id INTEGER PRIMARY KEY); PRAGMA user_version=7;")
    # When the backend uses it
    backend = create_backend(f"sqlite:///{path}", Settings())
    task_id = new_id()
    backend.store(task_id, record(task_id, "SUCCESS"), ttl_s=60)
    backend.close()
    # Then the other component's tables and version are untouched
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 7
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"tf_messages", "tf_results", "tf_kv", "tf_counters"} <= tables


def test_sqlite_backend_refuses_a_newer_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'results.sqlite3'}"
    backend = create_backend(url, Settings())
    backend.store("t1", record("t1", "SUCCESS"), ttl_s=60)
    backend.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "results.sqlite3")) as conn:
        conn.execute("UPDATE tf_backend_schema SET version = 99")
        conn.commit()
    newer = create_backend(url, Settings())
    with pytest.raises(BackendError, match="schema version 99"):
        newer.fetch("t1")
    newer.close()


def test_embedded_backends_reject_unknown_options(tmp_path: Path) -> None:
    for url in ["memory://", f"sqlite:///{tmp_path / 'x.db'}", f"file://{tmp_path / 'r'}"]:
        with pytest.raises(ConfigurationError, match="backend_options"):
            create_backend(url, Settings(backend_options={"bogus": 1}))


def _sqlite_connection(backend: ResultBackend) -> sqlite3.Connection:
    conn: sqlite3.Connection = backend._conn()  # type: ignore[attr-defined]
    return conn


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sqlite_backend_child_opens_its_own_connection(tmp_path: Path) -> None:
    # SQLite forbids using a connection across fork; the shared-data test cannot see it.
    backend = create_backend(f"sqlite:///{tmp_path / 'results.sqlite3'}", Settings())
    parent_conn = _sqlite_connection(backend)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            code = 0 if _sqlite_connection(backend) is not parent_conn else 2
        finally:
            os._exit(code)
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0, "the child reused the parent's connection"
    assert _sqlite_connection(backend) is parent_conn
    backend.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
def test_sqlite_backend_closes_the_connection_of_an_ended_thread(tmp_path: Path) -> None:
    backend = create_backend(f"sqlite:///{tmp_path / 'results.sqlite3'}", Settings())
    backend.fetch("warm-up")
    open_before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        thread = threading.Thread(target=backend.fetch, args=("t1",))
        thread.start()
        thread.join()
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= open_before + 2
    backend.close()


def test_sqlite_backend_incr_is_atomic_without_returning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # SQLite before 3.35 has no RETURNING; the backend then increments in a transaction.
    from taskframe.backends import sqlite as sqlite_backend

    monkeypatch.setattr(sqlite_backend, "_HAS_RETURNING", False)
    backend = create_backend(f"sqlite:///{tmp_path / 'results.sqlite3'}", Settings())
    seen: list[int] = []

    def count() -> None:
        seen.extend(backend.incr("chord", ttl_s=60) for _ in range(50))

    threads = [threading.Thread(target=count) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    backend.close()
    assert sorted(seen) == list(range(1, 201))
