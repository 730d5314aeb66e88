"""SQLite result backend: the embedded default, shared by every process on one machine.

URL: ``sqlite:///relative/path.db`` (relative to the working directory) or
``sqlite:////absolute/path.db``, the broker's convention (:func:`taskframe.urls.sqlite_path`).
One file may hold both the queue (the broker's ``tf_messages`` and ``tf_dead_letters``) and
the results: this module owns only ``tf_results``, ``tf_kv``, ``tf_counters`` and
``tf_backend_schema``. The file's directory is created on first use.

Features: task records, small JSON documents (``put``/``get``/``scan``/``delete``) and
counters (``incr``), each with an optional TTL. ``wait()`` polls with backoff
(``supports_wait = False``): SQLite cannot notify another process.

Guarantees:

- ``store()`` is one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` statement, so the rule
  "a ready state is never replaced by one that is not ready" is checked and applied
  atomically, across threads and processes.
- ``incr()`` is one ``UPSERT ... RETURNING`` (SQLite >= 3.35), else a ``BEGIN IMMEDIATE``
  transaction: atomic across processes.
- WAL journal with ``synchronous=NORMAL``: a committed write survives a crash of the
  process; a power loss may lose the last few commits, never the file's consistency.
- One connection per thread and per process. After ``os.fork()`` the child opens its own
  connection on first use and never uses or closes one inherited from the parent.

Expiry: every row carries ``expires_at`` (wall-clock seconds since the epoch; NULL = never),
set from ``ttl_s`` at each write. Reads treat an expired row as missing and delete it. Writes
sweep expired rows at most once a minute, in batches of a few hundred rows, so a sweep never
holds the write lock for long; a sweep that runs out of time resumes a second later.

Options (``backend_options``): ``busy_timeout_s`` (default 30): how long a statement waits
for another connection's write lock before failing with :class:`BackendError`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from taskframe.backend import READY_STATES, ExpirySweeper, ResultRecord, dump_json, poll_until_ready
from taskframe.exceptions import BackendError, ConfigurationError
from taskframe.settings import Settings
from taskframe.urls import sqlite_path

#: Version of the tables this module writes; a file with a higher one came from a newer taskframe.
SCHEMA_VERSION = 1
#: Seconds a statement waits for another connection's write lock before failing.
DEFAULT_BUSY_TIMEOUT_S = 30.0
#: Seconds between two sweeps of expired rows (per backend object and process).
SWEEP_INTERVAL_S = 60.0
#: Seconds until the next sweep when the last one ran out of time with rows left.
SWEEP_RETRY_S = 1.0
#: Rows deleted per statement of a sweep: small, so writers wait at most a few milliseconds.
SWEEP_BATCH_ROWS = 500
#: Seconds a sweep may run before it leaves the rest to the next one.
SWEEP_BUDGET_S = 0.05

#: SQLite added UPSERT ... RETURNING in 3.35; older libraries use a transaction instead.
_HAS_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)
_READY_SQL = ", ".join(f"'{state}'" for state in sorted(READY_STATES))
_TABLES = ("tf_results", "tf_kv", "tf_counters")
_OPTIONS = frozenset({"busy_timeout_s"})

_SCHEMA_SQL = f"""
CREATE TABLE IF NOT EXISTS tf_backend_schema (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tf_results (
    task_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    record TEXT NOT NULL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS tf_results_expiry ON tf_results (expires_at)
    WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS tf_kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS tf_kv_expiry ON tf_kv (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS tf_counters (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS tf_counters_expiry ON tf_counters (expires_at)
    WHERE expires_at IS NOT NULL;
INSERT OR IGNORE INTO tf_backend_schema (id, version) VALUES (1, {SCHEMA_VERSION});
"""

# An expired row counts as absent, so a reused task id may start over after expiry.
_STORE_SQL = f"""
INSERT INTO tf_results (task_id, status, record, expires_at) VALUES (?, ?, ?, ?)
ON CONFLICT (task_id) DO UPDATE SET
    status = excluded.status, record = excluded.record, expires_at = excluded.expires_at
WHERE tf_results.status NOT IN ({_READY_SQL})
    OR excluded.status IN ({_READY_SQL})
    OR tf_results.expires_at <= ?
"""

# An expired counter starts again at one.
_INCR_SQL = """
INSERT INTO tf_counters (key, value, expires_at) VALUES (?, 1, ?)
ON CONFLICT (key) DO UPDATE SET
    value = CASE WHEN tf_counters.expires_at <= ? THEN 1 ELSE tf_counters.value + 1 END,
    expires_at = excluded.expires_at
"""

_PUT_SQL = """
INSERT INTO tf_kv (key, value, expires_at) VALUES (?, ?, ?)
ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at
"""

#: Connections inherited through fork(). They are kept referenced, never closed: closing (or
#: garbage-collecting) one in the child would act on SQLite state that belongs to the parent.
_INHERITED_CONNECTIONS: list[sqlite3.Connection] = []


class _Holder:
    """One thread's connection, tagged with the process that opened it."""

    __slots__ = ("__weakref__", "conn", "pid")

    def __init__(self, conn: sqlite3.Connection, pid: int) -> None:
        self.conn: sqlite3.Connection | None = conn
        self.pid = pid


def _release(conn: sqlite3.Connection, pid: int) -> None:
    """Called when a thread's holder dies (the thread ended, or its state was cleared by fork)."""
    if os.getpid() == pid:
        conn.close()
    else:
        _INHERITED_CONNECTIONS.append(conn)


class _ProcessState:
    """What a backend object keeps per process; a forked child starts with a fresh one."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.holders: weakref.WeakSet[_Holder] = weakref.WeakSet()


class SQLiteBackend:
    """Results in an SQLite file; see the module docstring for layout and guarantees."""

    supports_wait: ClassVar[bool] = False

    def __init__(self, url: str, conf: Settings) -> None:
        self._path = sqlite_path(url)
        self._busy_timeout_s = _busy_timeout_s(conf.backend_options)
        self._local = threading.local()
        self._state = _ProcessState()
        self._sweeper = ExpirySweeper(
            self._sweep, interval_s=SWEEP_INTERVAL_S, retry_s=SWEEP_RETRY_S, budget_s=SWEEP_BUDGET_S
        )

    def __repr__(self) -> str:
        return f"SQLiteBackend({self._path!r})"

    # -- task records -------------------------------------------------------------------------

    def store(self, task_id: str, record: ResultRecord, *, ttl_s: float | None) -> None:
        status = _status_of(task_id, record)
        text = dump_json(record, f"result of task {task_id!r}")
        now = time.time()
        with self._errors("store the result"):
            self._conn().execute(_STORE_SQL, (task_id, status, text, _expires_at(now, ttl_s), now))
        self._maybe_sweep()

    def fetch(self, task_id: str) -> ResultRecord | None:
        text = self._read_live("tf_results", "task_id", "record", task_id)
        if text is None:
            return None
        record: ResultRecord = json.loads(text)
        return record

    def wait(self, task_id: str, timeout_s: float) -> ResultRecord | None:
        return poll_until_ready(self, task_id, timeout_s)

    def forget(self, task_id: str) -> None:
        with self._errors("forget the result"):
            self._conn().execute("DELETE FROM tf_results WHERE task_id = ?", (task_id,))

    # -- counters and documents ---------------------------------------------------------------

    def incr(self, key: str, *, ttl_s: float | None) -> int:
        now = time.time()
        params = (key, _expires_at(now, ttl_s), now)
        with self._errors("increment the counter"):
            conn = self._conn()
            value = _incr_returning(conn, params) if _HAS_RETURNING else _incr_locked(conn, params)
        self._maybe_sweep()
        return value

    def put(self, key: str, value: dict[str, Any], *, ttl_s: float | None) -> None:
        text = dump_json(value, f"document {key!r}")
        with self._errors("store the document"):
            self._conn().execute(_PUT_SQL, (key, text, _expires_at(time.time(), ttl_s)))
        self._maybe_sweep()

    def get(self, key: str) -> dict[str, Any] | None:
        text = self._read_live("tf_kv", "key", "value", key)
        if text is None:
            return None
        doc: dict[str, Any] = json.loads(text)
        return doc

    def scan(self, prefix: str) -> list[dict[str, Any]]:
        """Every unexpired document whose key starts with ``prefix``, in key order."""
        upper = _prefix_upper_bound(prefix)
        sql = "SELECT key, value FROM tf_kv WHERE key >= ?"
        params: tuple[Any, ...] = (prefix,)
        if upper is not None:
            sql += " AND key < ?"
            params += (upper,)
        sql += " AND (expires_at IS NULL OR expires_at > ?) ORDER BY key"
        params += (time.time(),)
        with self._errors("scan documents"):
            rows = self._conn().execute(sql, params).fetchall()
        return [json.loads(value) for key, value in rows if key.startswith(prefix)]

    def delete(self, key: str) -> None:
        """Delete the document and the counter stored under ``key``. Idempotent."""
        with self._errors("delete the key"):
            conn = self._conn()
            conn.execute("DELETE FROM tf_kv WHERE key = ?", (key,))
            conn.execute("DELETE FROM tf_counters WHERE key = ?", (key,))

    # -- expiry -------------------------------------------------------------------------------

    def purge_expired(self, *, budget_s: float = SWEEP_BUDGET_S) -> int:
        """Delete expired rows in short batches for about ``budget_s``; return how many."""
        return self._sweeper.purge(budget_s)

    def _maybe_sweep(self) -> None:
        self._sweeper.maybe_sweep()

    def _sweep(self, deadline: float) -> tuple[int, bool]:
        """Return (rows removed, whether every expired row is gone)."""
        now = time.time()
        removed = 0
        with self._errors("delete expired rows"):
            conn = self._conn()
            for table in _TABLES:
                # Each batch is its own short transaction: other writers get in between.
                sql = f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE expires_at <= ? LIMIT ?)"
                while True:
                    count = conn.execute(sql, (now, SWEEP_BATCH_ROWS)).rowcount
                    removed += count
                    if count < SWEEP_BATCH_ROWS:
                        break
                    if time.monotonic() >= deadline:
                        return removed, False
        return removed, True

    # -- connections --------------------------------------------------------------------------

    def close(self) -> None:
        """Close this process's connections; a later call opens new ones."""
        state = self._process_state()
        with state.lock:
            holders = list(state.holders)
            state.holders.clear()
        for holder in holders:
            conn, holder.conn = holder.conn, None
            if conn is not None:
                conn.close()

    def _process_state(self) -> _ProcessState:
        state = self._state
        if state.pid != os.getpid():
            # Forked: the parent's locks may have been held at fork time, and its
            # connections are not ours to use or close.
            state = self._state = _ProcessState()
        return state

    def _conn(self) -> sqlite3.Connection:
        holder: _Holder | None = getattr(self._local, "holder", None)
        if holder is not None and holder.conn is not None and holder.pid == os.getpid():
            return holder.conn
        return self._open()

    def _open(self) -> sqlite3.Connection:
        state = self._process_state()
        conn = _connect(self._path, self._busy_timeout_s)
        try:
            _ensure_schema(conn, self._path)
        except BaseException:
            conn.close()
            raise
        holder = _Holder(conn, state.pid)
        # A thread that ends drops its holder; the finalizer then closes the connection.
        weakref.finalize(holder, _release, conn, state.pid)
        # Replacing a holder inherited through fork is safe: _release keeps its connection.
        self._local.holder = holder
        with state.lock:
            state.holders.add(holder)
        return conn

    def _read_live(self, table: str, key_column: str, value_column: str, key: str) -> str | None:
        """The value of an unexpired row, or None; an expired row is deleted on the way."""
        now = time.time()
        with self._errors("read"):
            conn = self._conn()
            row = conn.execute(
                f"SELECT {value_column}, expires_at FROM {table} WHERE {key_column} = ?", (key,)
            ).fetchone()
            if row is None:
                return None
            text, expires_at = row
            if expires_at is None or expires_at > now:
                return str(text)
            conn.execute(f"DELETE FROM {table} WHERE {key_column} = ? AND expires_at <= ?", (key, now))
            return None

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            msg = f"sqlite result backend {self._path!r} could not {action}: {exc}; {_hint(exc)}"
            raise BackendError(msg) from exc


def _busy_timeout_s(options: dict[str, Any]) -> float:
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        msg = f"unknown backend_options {unknown} for the sqlite result backend; known: {sorted(_OPTIONS)}"
        raise ConfigurationError(msg)
    value = options.get("busy_timeout_s", DEFAULT_BUSY_TIMEOUT_S)
    if not isinstance(value, (int, float)) or value < 0:
        msg = f"backend_options busy_timeout_s must be a number of seconds >= 0, got {value!r}"
        raise ConfigurationError(msg)
    return float(value)


def _connect(path: str, busy_timeout_s: float) -> sqlite3.Connection:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as exc:
        msg = (
            f"sqlite result backend cannot create the directory of {path!r}: {exc.strerror}; "
            "choose a writable path in the backend URL"
        )
        raise BackendError(msg) from exc
    try:
        # check_same_thread=False only so that close() and the finalizer may close a
        # connection from another thread; each connection is used by one thread.
        conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        msg = f"sqlite result backend cannot open {path!r}: {exc}; {_hint(exc)}"
        raise BackendError(msg) from exc
    try:
        _set_wal(conn, busy_timeout_s)
        conn.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.Error as exc:
        conn.close()
        msg = f"sqlite result backend cannot configure {path!r}: {exc}; {_hint(exc)}"
        raise BackendError(msg) from exc
    return conn


def _set_wal(conn: sqlite3.Connection, busy_timeout_s: float) -> None:
    """Switch to WAL. Retried by hand: the switch may fail with "locked" without waiting."""
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _ensure_schema(conn: sqlite3.Connection, path: str) -> None:
    version = _schema_version(conn)
    if version is None:
        # BEGIN IMMEDIATE serializes processes that create the tables at the same time.
        try:
            conn.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA_SQL}\nCOMMIT;")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        version = _schema_version(conn)
    if version != SCHEMA_VERSION:
        msg = (
            f"sqlite result backend {path!r} has tables of schema version {version}, this "
            f"taskframe knows version {SCHEMA_VERSION}; upgrade taskframe or use another file"
        )
        raise BackendError(msg)


def _schema_version(conn: sqlite3.Connection) -> int | None:
    try:
        row = conn.execute("SELECT version FROM tf_backend_schema WHERE id = 1").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise
    return None if row is None else int(row[0])


def _incr_returning(conn: sqlite3.Connection, params: tuple[Any, ...]) -> int:
    # fetchall() steps the statement to its end, which ends the implicit transaction.
    rows = conn.execute(_INCR_SQL + " RETURNING value", params).fetchall()
    return int(rows[0][0])


def _incr_locked(conn: sqlite3.Connection, params: tuple[Any, ...]) -> int:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_INCR_SQL, params)
        row = conn.execute("SELECT value FROM tf_counters WHERE key = ?", (params[0],)).fetchone()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return int(row[0])


def _status_of(task_id: str, record: ResultRecord) -> str:
    status = record.get("status")
    if not isinstance(status, str):
        msg = f"result record of task {task_id!r} has no 'status' string (got {status!r})"
        raise BackendError(msg)
    return status


def _expires_at(now: float, ttl_s: float | None) -> float | None:
    return None if ttl_s is None else now + ttl_s


def _prefix_upper_bound(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix``; None if unbounded.

    SQLite compares TEXT as UTF-8 bytes, which orders like code points, so a range on the
    primary key finds a prefix with the index (LIKE would not: it ignores case).
    """
    for index in range(len(prefix) - 1, -1, -1):
        code = ord(prefix[index]) + 1
        if 0xD800 <= code <= 0xDFFF:
            code = 0xE000  # surrogates cannot appear in UTF-8 text
        if code <= 0x10FFFF:
            return prefix[:index] + chr(code)
    return None


def _hint(exc: sqlite3.Error) -> str:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return "another connection held the write lock too long; retry, or raise busy_timeout_s"
    if "readonly" in text or "unable to open" in text:
        return "check that the file and its directory exist and are writable by this user"
    if "disk" in text or "full" in text:
        return "check free disk space"
    return "check the file, or delete it if its results are not needed"
