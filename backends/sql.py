"""SQL result backend over SQLAlchemy 2 Core: PostgreSQL, MySQL/MariaDB and SQLite.

URL: ``db+`` followed by a SQLAlchemy URL; the prefix is stripped and the rest goes to
SQLAlchemy, so its drivers and query options apply::

    db+postgresql+psycopg://user:password@host:5432/dbname
    db+mysql+pymysql://user:password@host:3306/dbname      (MariaDB too, or db+mariadb+pymysql://)
    db+sqlite:///relative/results.db, db+sqlite:////absolute/results.db

A relative SQLite path is made absolute when the backend is built, and its directory is
created; ``:memory:`` is refused (a worker and a producer could not share it).

Schema, created on first use (``CREATE TABLE`` when missing; ``KEY`` is a string of at most
255 characters, compared code point by code point: ``VARCHAR(255) COLLATE "C"`` on PostgreSQL,
``VARBINARY(1020)`` holding UTF-8 on MySQL, ``VARCHAR(255)`` on SQLite)::

    taskframe_schema_version (component VARCHAR(64) PRIMARY KEY, version INTEGER)
        one row, component 'results'; a database with a higher version came from a newer
        taskframe, and this one refuses it rather than write rows it does not understand
    taskframe_results  (task_id KEY PRIMARY KEY, status VARCHAR(255), record TEXT, expires_at DOUBLE)
    taskframe_kv       (key KEY PRIMARY KEY, value TEXT, expires_at DOUBLE)
    taskframe_counters (key KEY PRIMARY KEY, value BIGINT, expires_at DOUBLE)

``record`` and ``value`` hold JSON text (LONGTEXT on MySQL), ``status`` repeats the record's
status for the upsert's condition, and ``expires_at`` is a Unix time in seconds from the
writer's clock (NULL: never), indexed. MySQL tables are InnoDB in ``utf8mb4``.

Features: task records, small JSON documents and counters, each with an optional TTL.
``wait()`` polls with backoff (:func:`taskframe.backend.poll_until_ready`), except on
PostgreSQL with psycopg 3, where the backend is a :class:`PostgreSQLBackend`
(``supports_wait = True``): ``store()`` of a ready state sends ``NOTIFY taskframe_results``
with the task id in the same transaction, and ``wait()`` sleeps until a notification for its
task arrives. One listening connection per backend object and process, opened by the first
``wait()``, serves every waiting thread; waiters still re-read now and then, and at once
after the listener reconnects, so a result stored while nobody listened is found.

Guarantees:

- ``store()`` is one upsert (``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` on PostgreSQL and
  SQLite, ``INSERT ... ON DUPLICATE KEY UPDATE col = CASE ...`` on MySQL) whose condition
  keeps a ready state from being replaced by one that is not ready, so the check and the
  write are one atomic statement on every database.
- ``incr()`` is one upsert too, returning the new value with ``RETURNING`` (PostgreSQL,
  SQLite) or ``LAST_INSERT_ID(expr)`` read back on the same connection (MySQL).
- Connections come from a pool and are pinged before use (``pool_pre_ping``), so a restarted
  database costs no error. An operation that fails on a lost connection, a deadlock or a
  busy lock is retried with backoff for ``retry_timeout_s``; ``incr()`` is not retried once
  its ``COMMIT`` was sent, since it may have counted (it raises :class:`BackendError`).
- Fork-safe: a child process builds its own engine (and listener) on first use and never
  uses or closes a connection inherited from its parent.

Expiry: reads treat an expired row as missing. Writes sweep expired rows at most once a
minute, a few hundred rows per short transaction (select the keys, then delete those still
expired), for at most 0.1 s, resuming a second later if rows are left, so no sweep holds
long locks. :meth:`SQLBackend.purge_expired` runs a sweep on demand.

Options (``backend_options``): ``pool_size`` (5), ``max_overflow`` (10),
``connect_timeout_s`` (10), ``retry_timeout_s`` (15), ``busy_timeout_s`` (SQLite: 30).

Tested against PostgreSQL 15 (psycopg 3.3), MariaDB 10.11 (PyMySQL 1.2) and SQLite 3.40
with SQLAlchemy 2.1. LISTEN/NOTIFY needs psycopg 3.2 or later (``notifies(timeout=...)``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Dialect, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError

from taskframe.backend import READY_STATES, ExpirySweeper, ResultRecord, dump_json, poll_until_ready
from taskframe.exceptions import BackendError, ConfigurationError
from taskframe.settings import Settings, mask_url

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

#: Version of the tables this module writes (row 'results' of taskframe_schema_version).
SCHEMA_VERSION = 1
#: Longest task id or key, in characters.
MAX_KEY_CHARS = 255
#: PostgreSQL channel on which store() announces ready states; the payload is the task id.
NOTIFY_CHANNEL = "taskframe_results"
#: Seconds between two sweeps of expired rows (per backend object and process).
SWEEP_INTERVAL_S = 60.0
#: Seconds until the next sweep when the last one ran out of time with rows left.
SWEEP_RETRY_S = 1.0
#: Rows deleted per transaction of a sweep: small, so no lock is held for long.
SWEEP_BATCH_ROWS = 500
#: Seconds a sweep may run before it leaves the rest to the next one.
SWEEP_BUDGET_S = 0.1
#: Seconds a waiter sleeps between two reads while the listener is connected (a safety net:
#: the notification normally wakes it at once).
LISTENING_POLL_S = 1.0
#: Seconds the first wait() of a process waits for LISTEN before relying on polling.
LISTEN_START_WAIT_S = 2.0
#: Seconds the listener blocks in one read of notifications; close() waits at most this long.
LISTENER_TICK_S = 0.25

DEFAULT_OPTIONS: dict[str, float] = {
    "pool_size": 5,
    "max_overflow": 10,
    "connect_timeout_s": 10.0,
    "retry_timeout_s": 15.0,
    "busy_timeout_s": 30.0,
}

_MYSQL = ("mysql", "mariadb")
_DIALECTS = ("postgresql", "sqlite", *_MYSQL)
_READY = sorted(READY_STATES)
# PostgreSQL SQLSTATEs worth a retry: serialization failure, deadlock, and a server that is
# shutting down, starting up or refusing connections for now.
_PG_TRANSIENT = frozenset({"40001", "40P01", "57P01", "57P02", "57P03"})
# MySQL error numbers worth a retry: lock wait timeout, deadlock, server gone or lost.
_MYSQL_TRANSIENT = frozenset({1205, 1213, 2006, 2013})
# Refusals no retry fixes: PostgreSQL SQLSTATE classes 28 (authorization) and 3D (no such
# database); MySQL access denied (1044, 1045) and unknown database (1049).
_PG_REFUSED = frozenset({"28", "3D"})
_MYSQL_REFUSED = frozenset({1044, 1045, 1049, 1698})
# libpq reports a refused connection without an SQLSTATE; these are in its message then.
_REFUSED_TEXTS = ("does not exist", "authentication failed", "no password supplied", "no pg_hba.conf entry")

_T = TypeVar("_T")


# -- schema -----------------------------------------------------------------------------------


class _Key(sa.types.TypeDecorator[str]):
    """A task id or key, ordered by code point on every database (a prefix scan is a range).

    PostgreSQL uses the "C" collation; MySQL stores the UTF-8 bytes in VARBINARY, since its
    text collations ignore case or trailing spaces.
    """

    impl = sa.String(MAX_KEY_CHARS)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in _MYSQL:
            return dialect.type_descriptor(mysql.VARBINARY(MAX_KEY_CHARS * 4))
        if dialect.name == "postgresql":
            return dialect.type_descriptor(sa.String(MAX_KEY_CHARS, collation="C"))
        return dialect.type_descriptor(sa.String(MAX_KEY_CHARS))

    def process_bind_param(self, value: str | None, dialect: Dialect) -> Any:
        if value is not None and dialect.name in _MYSQL:
            return value.encode("utf-8")
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> str | None:
        if isinstance(value, (bytes, bytearray)):
            return bytes(value).decode("utf-8")
        return None if value is None else str(value)


_Text = sa.Text().with_variant(mysql.LONGTEXT(), *_MYSQL)
_Status = sa.String(255).with_variant(mysql.VARCHAR(255, collation="utf8mb4_bin"), *_MYSQL)
_TABLE_OPTIONS: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mariadb_engine": "InnoDB",
    "mariadb_charset": "utf8mb4",
}

metadata = sa.MetaData()

schema_version = sa.Table(
    "taskframe_schema_version",
    metadata,
    sa.Column("component", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    **_TABLE_OPTIONS,
)


def _expiring_table(name: str, key: str, *columns: sa.Column[Any]) -> sa.Table:
    table = sa.Table(
        name,
        metadata,
        sa.Column(key, _Key(), primary_key=True),
        *columns,
        sa.Column("expires_at", sa.Double(), nullable=True),
        **_TABLE_OPTIONS,
    )
    expires_at = table.c.expires_at
    # Partial where the database has them: rows that never expire stay out of the index.
    sa.Index(
        f"{name}_expires_at",
        expires_at,
        postgresql_where=expires_at.is_not(None),
        sqlite_where=expires_at.is_not(None),
    )
    return table


results = _expiring_table(
    "taskframe_results",
    "task_id",
    sa.Column("status", _Status, nullable=False),
    sa.Column("record", _Text, nullable=False),
)
kv = _expiring_table("taskframe_kv", "key", sa.Column("value", _Text, nullable=False))
counters = _expiring_table("taskframe_counters", "key", sa.Column("value", sa.BigInteger, nullable=False))
_EXPIRING = (results, kv, counters)


# -- per-process state ------------------------------------------------------------------------

#: Engines and listeners inherited through fork(). Kept referenced, never closed: closing (or
#: garbage-collecting) one in the child could act on connections that belong to the parent.
_INHERITED: list[object] = []


class _ProcessState:
    """What a backend object keeps per process; a forked child starts with a fresh one."""

    def __init__(self, engine: Engine) -> None:
        self.pid = os.getpid()
        self.engine = engine
        self.lock = threading.Lock()
        self.schema_ready = False
        self.listener: _Listener | None = None


# -- the backend ------------------------------------------------------------------------------


class SQLBackend:
    """Results in SQL tables; see the module docstring for the schema and guarantees.

    Building one with a PostgreSQL-over-psycopg URL gives a :class:`PostgreSQLBackend`.
    """

    supports_wait: ClassVar[bool] = False

    def __new__(cls, url: str, conf: Settings) -> SQLBackend:
        if cls is SQLBackend and _listens(_sqlalchemy_url(url)):
            return super().__new__(PostgreSQLBackend)
        return super().__new__(cls)

    def __init__(self, url: str, conf: Settings) -> None:
        self._options = _options(conf.backend_options)
        self._url = _sqlalchemy_url(url)
        self._shown = mask_url(url)
        self._state = _ProcessState(self._create_engine())
        self._sweeper = ExpirySweeper(
            self._sweep, interval_s=SWEEP_INTERVAL_S, retry_s=SWEEP_RETRY_S, budget_s=SWEEP_BUDGET_S
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._shown!r})"

    # -- task records -------------------------------------------------------------------------

    def store(self, task_id: str, record: ResultRecord, *, ttl_s: float | None) -> None:
        _check_key(task_id, "task id")
        status = _status_of(task_id, record)
        text = dump_json(record, f"result of task {task_id!r}")

        def upsert(conn: Connection) -> None:
            now = time.time()
            conn.execute(_store_statement(conn.dialect, task_id, status, text, _expires_at(now, ttl_s), now))
            self._stored(conn, task_id, status)

        self._run("store the result", upsert)
        self._maybe_sweep()

    def _stored(self, conn: Connection, task_id: str, status: str) -> None:
        """Called in the store's transaction; PostgreSQL announces ready states here."""

    def fetch(self, task_id: str) -> ResultRecord | None:
        _check_key(task_id, "task id")
        text = self._read_live(results, results.c.task_id, results.c.record, task_id)
        if text is None:
            return None
        found: ResultRecord = json.loads(text)
        return found

    def wait(self, task_id: str, timeout_s: float) -> ResultRecord | None:
        return poll_until_ready(self, task_id, timeout_s)

    def forget(self, task_id: str) -> None:
        _check_key(task_id, "task id")
        self._run("forget the result", lambda conn: conn.execute(results.delete().where(results.c.task_id == task_id)))

    # -- counters and documents ---------------------------------------------------------------

    def incr(self, key: str, *, ttl_s: float | None) -> int:
        _check_key(key, "key")

        def increment(conn: Connection) -> int:
            now = time.time()
            return _increment(conn, key, _expires_at(now, ttl_s), now)

        value = self._run("increment the counter", increment, idempotent=False)
        self._maybe_sweep()
        return value

    def put(self, key: str, value: dict[str, Any], *, ttl_s: float | None) -> None:
        _check_key(key, "key")
        text = dump_json(value, f"document {key!r}")

        def upsert(conn: Connection) -> None:
            conn.execute(_put_statement(conn.dialect, key, text, _expires_at(time.time(), ttl_s)))

        self._run("store the document", upsert)
        self._maybe_sweep()

    def get(self, key: str) -> dict[str, Any] | None:
        _check_key(key, "key")
        text = self._read_live(kv, kv.c.key, kv.c.value, key)
        if text is None:
            return None
        doc: dict[str, Any] = json.loads(text)
        return doc

    def scan(self, prefix: str) -> list[dict[str, Any]]:
        """Every unexpired document whose key starts with ``prefix``, in key order."""
        query = sa.select(kv.c.key, kv.c.value).where(kv.c.key >= prefix)
        upper = _prefix_upper_bound(prefix)
        if upper is not None:
            query = query.where(kv.c.key < upper)

        def read(conn: Connection) -> list[tuple[str, str]]:
            live = query.where(_live(kv, time.time())).order_by(kv.c.key)
            return [(row[0], row[1]) for row in conn.execute(live)]

        rows = self._run("scan documents", read)
        return [json.loads(value) for key, value in rows if key.startswith(prefix)]

    def delete(self, key: str) -> None:
        """Delete the document and the counter stored under ``key``. Idempotent."""
        _check_key(key, "key")

        def remove(conn: Connection) -> None:
            conn.execute(kv.delete().where(kv.c.key == key))
            conn.execute(counters.delete().where(counters.c.key == key))

        self._run("delete the key", remove)

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
        for table in _EXPIRING:
            key = table.c[0]
            expired = table.c.expires_at <= now
            pick = sa.select(key).where(expired).limit(SWEEP_BATCH_ROWS)

            def delete_batch(
                conn: Connection, key: sa.Column[Any] = key, table: sa.Table = table, pick: sa.Select[Any] = pick
            ) -> int:
                keys = list(conn.scalars(pick))
                if keys:
                    # Still expired: a row stored again since the select is kept.
                    conn.execute(table.delete().where(key.in_(keys), table.c.expires_at <= now))
                return len(keys)

            while True:
                count = self._run("delete expired rows", delete_batch)
                removed += count
                if count < SWEEP_BATCH_ROWS:
                    break
                if time.monotonic() >= deadline:
                    return removed, False
        return removed, True

    # -- connections --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the listener and close this process's pooled connections; later calls reopen."""
        state = self._process_state()
        with state.lock:
            listener, state.listener = state.listener, None
        if listener is not None:
            listener.stop()
        state.engine.dispose()

    def _process_state(self) -> _ProcessState:
        state = self._state
        if state.pid != os.getpid():
            # Forked: the parent's pooled connections, listener and locks are not ours.
            _INHERITED.append(state)
            state = self._state = _ProcessState(self._create_engine())
        return state

    def _engine(self) -> Engine:
        state = self._process_state()
        if not state.schema_ready:
            with state.lock:
                if not state.schema_ready:
                    _ensure_schema(state.engine, self._shown)
                    state.schema_ready = True
        return state.engine

    def _create_engine(self) -> Engine:
        return _create_engine(self._url, self._options, self._shown)

    def _read_live(self, table: sa.Table, key: sa.Column[Any], column: sa.Column[Any], value: str) -> str | None:
        def read(conn: Connection) -> str | None:
            query = sa.select(column).where(key == value, _live(table, time.time()))
            found = conn.execute(query).scalar_one_or_none()
            return None if found is None else str(found)

        return self._run("read", read)

    def _run(self, action: str, operation: Callable[[Connection], _T], *, idempotent: bool = True) -> _T:
        """Run ``operation`` in one transaction; retry it on transient errors for a while.

        An operation that is not idempotent is not retried once COMMIT was sent: the
        database may have applied it before the connection broke.
        """
        deadline: float | None = None
        delay_s = 0.05
        while True:
            phase = "connect"
            try:
                with self._engine().connect() as conn:
                    phase = "execute"
                    value = operation(conn)
                    phase = "commit"
                    conn.commit()
                return value
            except DBAPIError as exc:
                retry = _transient(exc, phase) and (idempotent or phase != "commit")
                if not retry:
                    raise self._error(action, exc) from exc
                now = time.monotonic()
                deadline = deadline if deadline is not None else now + self._options["retry_timeout_s"]
                if now + delay_s > deadline:
                    msg = f"{self._error(action, exc)} (gave up after {self._options['retry_timeout_s']:.0f}s)"
                    raise BackendError(msg) from exc
                log.warning("%s; retrying in %.2fs", self._error(action, exc), delay_s)
                time.sleep(delay_s)
                delay_s = min(delay_s * 2, 1.0)
            except SQLAlchemyError as exc:
                raise self._error(action, exc) from exc

    def _error(self, action: str, exc: SQLAlchemyError) -> BackendError:
        reason = _reason(exc)
        msg = f"sql result backend {self._shown!r} could not {action}: {reason}; {_hint(reason)}"
        return BackendError(msg)


class PostgreSQLBackend(SQLBackend):
    """The SQL backend on PostgreSQL with psycopg 3: ``wait()`` uses LISTEN/NOTIFY."""

    supports_wait: ClassVar[bool] = True

    def _stored(self, conn: Connection, task_id: str, status: str) -> None:
        if status in READY_STATES:
            # Delivered at COMMIT, so a woken waiter always finds the record.
            conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, task_id)))

    def wait(self, task_id: str, timeout_s: float) -> ResultRecord | None:
        deadline = time.monotonic() + timeout_s
        listener = self._listener()
        woken = listener.subscribe(task_id)
        try:
            # Listening before the first read: a store that commits after the read notifies us.
            # (Only the first connection is awaited; while it reconnects, waiters poll.)
            listener.first_attempt.wait(min(timeout_s, LISTEN_START_WAIT_S))
            interval_s = 0.002
            while True:
                found = self.fetch(task_id)
                if found is not None and found.get("status") in READY_STATES:
                    return found
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    return None
                if listener.listening.is_set():
                    woken.wait(min(remaining_s, LISTENING_POLL_S))
                else:  # no notifications for now: poll with backoff, as other backends do
                    woken.wait(min(remaining_s, interval_s))
                    interval_s = min(interval_s * 1.5, 0.1)
                woken.clear()
        finally:
            listener.unsubscribe(task_id, woken)

    def _listener(self) -> _Listener:
        engine = self._engine()  # the tables exist before anyone listens
        state = self._process_state()
        with state.lock:
            if state.listener is None:
                state.listener = _Listener(engine, self._shown)
            return state.listener


class _Listener:
    """One LISTEN connection, in its own thread, that wakes the threads waiting for a task."""

    def __init__(self, engine: Engine, shown_url: str) -> None:
        self._engine = engine
        self._shown = shown_url
        self._lock = threading.Lock()
        self._waiters: dict[str, set[threading.Event]] = {}
        self._stop = threading.Event()
        #: Set while LISTEN is active: a notification sent now reaches this process.
        self.listening = threading.Event()
        #: Set once the first connection succeeded or failed.
        self.first_attempt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="taskframe-sql-listener", daemon=True)
        self._thread.start()

    def subscribe(self, task_id: str) -> threading.Event:
        woken = threading.Event()
        with self._lock:
            self._waiters.setdefault(task_id, set()).add(woken)
        return woken

    def unsubscribe(self, task_id: str, woken: threading.Event) -> None:
        with self._lock:
            waiting = self._waiters.get(task_id)
            if waiting is not None:
                waiting.discard(woken)
                if not waiting:
                    del self._waiters[task_id]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=LISTENER_TICK_S + 5.0)

    def _run(self) -> None:
        delay_s = 0.1
        while not self._stop.is_set():
            try:
                self._listen()
            except Exception as exc:  # any driver or pool error: reconnect, never die
                self.first_attempt.set()
                if self._stop.is_set():
                    return
                log.warning(
                    "sql result backend %r lost its LISTEN connection (%s); waiters poll until it reconnects in %.1fs",
                    self._shown,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                    delay_s,
                )
                self._stop.wait(delay_s)
                delay_s = min(delay_s * 2, 5.0)
            else:
                delay_s = 0.1

    def _listen(self) -> None:
        pooled = self._engine.raw_connection()
        conn = cast("psycopg.Connection[Any]", pooled.driver_connection)
        pooled.detach()  # a dedicated connection: the pool must never hand it to anyone else
        try:
            conn.autocommit = True
            conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
            self.listening.set()
            self.first_attempt.set()
            # Notifications sent while we were not listening are lost: every waiter re-reads.
            self._wake_all()
            while not self._stop.is_set():
                for notify in conn.notifies(timeout=LISTENER_TICK_S):
                    self._wake(notify.payload)
        finally:
            self.listening.clear()
            conn.close()

    def _wake(self, task_id: str) -> None:
        with self._lock:
            waiting = list(self._waiters.get(task_id, ()))
        for woken in waiting:
            woken.set()

    def _wake_all(self) -> None:
        with self._lock:
            waiting = [woken for events in self._waiters.values() for woken in events]
        for woken in waiting:
            woken.set()


# -- statements -------------------------------------------------------------------------------


def _store_statement(
    dialect: Dialect, task_id: str, status: str, text: str, expires_at: float | None, now: float
) -> sa.Executable:
    values = {"task_id": task_id, "status": status, "record": text, "expires_at": expires_at}
    if dialect.name in _MYSQL:
        ins = mysql.insert(results).values(values)
        new = ins.inserted
        # An expired row counts as absent, so a reused task id may start over after expiry.
        apply = sa.or_(results.c.status.not_in(_READY), new.status.in_(_READY), results.c.expires_at <= now)
        # MySQL evaluates these left to right and later ones see earlier results. The
        # condition reads status and expires_at, so status goes before expires_at: once
        # status is replaced the condition stays true (the new status is ready, or it is not
        # ready), and when it is not replaced the condition is unchanged.
        return ins.on_duplicate_key_update(
            [
                ("record", sa.case((apply, new.record), else_=results.c.record)),
                ("status", sa.case((apply, new.status), else_=results.c.status)),
                ("expires_at", sa.case((apply, new.expires_at), else_=results.c.expires_at)),
            ]
        )
    upsert = _upsert_insert(dialect, results).values(values)
    excluded = upsert.excluded
    stmt: sa.Executable = upsert.on_conflict_do_update(
        index_elements=[results.c.task_id],
        set_={"status": excluded.status, "record": excluded.record, "expires_at": excluded.expires_at},
        where=sa.or_(results.c.status.not_in(_READY), excluded.status.in_(_READY), results.c.expires_at <= now),
    )
    return stmt


def _put_statement(dialect: Dialect, key: str, text: str, expires_at: float | None) -> sa.Executable:
    values = {"key": key, "value": text, "expires_at": expires_at}
    if dialect.name in _MYSQL:
        ins = mysql.insert(kv).values(values)
        return ins.on_duplicate_key_update(value=ins.inserted.value, expires_at=ins.inserted.expires_at)
    upsert = _upsert_insert(dialect, kv).values(values)
    stmt: sa.Executable = upsert.on_conflict_do_update(
        index_elements=[kv.c.key],
        set_={"value": upsert.excluded.value, "expires_at": upsert.excluded.expires_at},
    )
    return stmt


def _increment(conn: Connection, key: str, expires_at: float | None, now: float) -> int:
    # An expired counter starts again at one.
    next_value = sa.case((counters.c.expires_at <= now, 1), else_=counters.c.value + 1)
    if conn.dialect.name in _MYSQL:
        # LAST_INSERT_ID(expr) returns expr and remembers it for this connection, which is
        # how MySQL hands back a value computed inside an upsert (it has no RETURNING here).
        ins = mysql.insert(counters).values(key=key, value=sa.func.last_insert_id(1), expires_at=expires_at)
        stmt = ins.on_duplicate_key_update(
            [("value", sa.func.last_insert_id(next_value)), ("expires_at", ins.inserted.expires_at)]
        )
        conn.execute(stmt)
        return int(conn.execute(sa.select(sa.func.last_insert_id())).scalar_one())
    upsert = _upsert_insert(conn.dialect, counters).values(key=key, value=1, expires_at=expires_at)
    stmt = upsert.on_conflict_do_update(
        index_elements=[counters.c.key],
        set_={"value": next_value, "expires_at": upsert.excluded.expires_at},
    )
    if conn.dialect.insert_returning:
        return int(conn.execute(stmt.returning(counters.c.value)).scalar_one())
    # SQLite before 3.35: the upsert holds the write lock until COMMIT, so nobody else can
    # change the row before it is read back in the same transaction.
    conn.execute(stmt)
    return int(conn.execute(sa.select(counters.c.value).where(counters.c.key == key)).scalar_one())


def _upsert_insert(dialect: Dialect, table: sa.Table) -> Any:
    """``INSERT`` of the dialect that has ``ON CONFLICT`` (PostgreSQL or SQLite)."""
    if dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def _live(table: sa.Table, now: float) -> sa.ColumnElement[bool]:
    return sa.or_(table.c.expires_at.is_(None), table.c.expires_at > now)


# -- set-up -----------------------------------------------------------------------------------


def _sqlalchemy_url(url: str) -> URL:
    scheme, sep, _rest = url.partition("://")
    if not sep or not scheme.lower().startswith("db+"):
        msg = f"not a SQL result backend URL: {mask_url(url)!r}; expected e.g. 'db+postgresql+psycopg://host/db'"
        raise ConfigurationError(msg)
    try:
        parsed = make_url(url[3:])
        backend = parsed.get_backend_name()
    except ArgumentError as exc:
        msg = f"cannot parse the SQL result backend URL {mask_url(url)!r}: {exc}"
        raise ConfigurationError(msg) from None
    if backend not in _DIALECTS:
        msg = (
            f"the SQL result backend does not support {backend!r} ({mask_url(url)!r}); "
            "use postgresql, mysql, mariadb or sqlite"
        )
        raise ConfigurationError(msg)
    if backend == "sqlite":
        return _sqlite_file_url(parsed, url)
    if backend in _MYSQL and "charset" not in parsed.query:
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})  # 4-byte characters round-trip
    return parsed


def _sqlite_file_url(parsed: URL, url: str) -> URL:
    database = parsed.database or ""
    if database in ("", ":memory:") or parsed.query.get("mode") == "memory":
        msg = f"the SQL result backend needs an SQLite file, got {mask_url(url)!r}; use 'db+sqlite:///results.db'"
        raise ConfigurationError(msg)
    if database.startswith("file:"):
        return parsed  # an SQLite URI filename: the user chose every detail
    path = os.path.abspath(database)  # a worker that changes directory keeps the same file
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as exc:
        msg = f"SQL result backend cannot create the directory of {path!r}: {exc.strerror}"
        raise ConfigurationError(msg) from None
    return parsed.set(database=path)


def _listens(url: URL) -> bool:
    return url.get_backend_name() == "postgresql" and url.get_driver_name() == "psycopg"


def _options(options: dict[str, Any]) -> dict[str, float]:
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        msg = f"unknown backend_options {unknown} for the SQL result backend; known: {sorted(DEFAULT_OPTIONS)}"
        raise ConfigurationError(msg)
    merged = {**DEFAULT_OPTIONS, **options}
    for name, value in merged.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            msg = f"backend_options {name} must be a number >= 0, got {value!r}"
            raise ConfigurationError(msg)
    return {name: float(value) for name, value in merged.items()}


def _create_engine(url: URL, options: dict[str, float], shown_url: str) -> Engine:
    backend = url.get_backend_name()
    connect_args: dict[str, Any] = {}
    kwargs: dict[str, Any] = {}
    if backend == "sqlite":
        connect_args["timeout"] = options["busy_timeout_s"]
    else:
        connect_args["connect_timeout"] = max(1, int(options["connect_timeout_s"]))
        kwargs.update(pool_size=int(options["pool_size"]), max_overflow=int(options["max_overflow"]))
    if backend in _MYSQL:
        # Fewer gap locks than REPEATABLE READ, so concurrent upserts of new keys do not deadlock.
        kwargs["isolation_level"] = "READ COMMITTED"
    try:
        engine = sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args, **kwargs)
    except (ImportError, NoSuchModuleError) as exc:
        msg = (
            f"backend {shown_url!r} needs its database driver ({exc}); taskframe[sql] installs psycopg "
            "and PyMySQL: name them in the URL (db+postgresql+psycopg://, db+mysql+pymysql://) and "
            "pip install 'taskframe[sql]', or install the driver this URL names"
        )
        raise ConfigurationError(msg) from None
    except (ArgumentError, TypeError) as exc:
        msg = f"cannot use the SQL result backend URL {shown_url!r}: {exc}"
        raise ConfigurationError(msg) from None
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    """WAL, so readers and the writer do not block each other across processes."""
    deadline = time.monotonic() + 10.0
    while True:
        try:
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
            break
        except Exception as exc:  # sqlite3.OperationalError: the switch may fail with "locked"
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def _ensure_schema(engine: Engine, shown_url: str) -> None:
    """Create missing tables, record the schema version, and refuse a newer one."""
    for attempt in range(3):
        try:
            metadata.create_all(engine, checkfirst=True)
            break
        except DBAPIError:
            # Another process created the same tables between our check and our CREATE.
            if attempt == 2:
                raise
            time.sleep(0.1 * (attempt + 1))
    with engine.begin() as conn:
        version = conn.execute(
            sa.select(schema_version.c.version).where(schema_version.c.component == "results")
        ).scalar_one_or_none()
        if version is None:
            conn.execute(_insert_ignore(conn.dialect, {"component": "results", "version": SCHEMA_VERSION}))
            version = SCHEMA_VERSION
    if version != SCHEMA_VERSION:
        msg = (
            f"sql result backend {shown_url!r} has tables of schema version {version}, this "
            f"taskframe knows version {SCHEMA_VERSION}; upgrade taskframe or use another database"
        )
        raise BackendError(msg)


def _insert_ignore(dialect: Dialect, values: dict[str, Any]) -> sa.Executable:
    if dialect.name in _MYSQL:
        return mysql.insert(schema_version).values(values).prefix_with("IGNORE")
    stmt: sa.Executable = _upsert_insert(dialect, schema_version).values(values).on_conflict_do_nothing()
    return stmt


# -- helpers ----------------------------------------------------------------------------------


def _transient(exc: DBAPIError, phase: str) -> bool:
    """Whether the operation may succeed if tried again (it was rolled back, or is idempotent)."""
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None)
    args = getattr(orig, "args", ())
    refused = (isinstance(sqlstate, str) and sqlstate[:2] in _PG_REFUSED) or (args and args[0] in _MYSQL_REFUSED)
    if refused or any(text in str(orig) for text in _REFUSED_TEXTS):
        return False  # a wrong password or database name does not fix itself
    if phase == "connect" and isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)):
        return True  # the database is down or restarting: nothing ran yet
    if isinstance(sqlstate, str) and (sqlstate in _PG_TRANSIENT or sqlstate.startswith("08")):
        return True
    if args and isinstance(args[0], int) and args[0] in _MYSQL_TRANSIENT:
        return True
    return "database is locked" in str(orig)


def _reason(exc: SQLAlchemyError) -> str:
    """The driver's message, first line only (SQLAlchemy's adds the statement and a link)."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _hint(reason: str) -> str:
    text = reason.lower()
    if any(word in text for word in ("role", "denied", "authentication", "password", "pg_hba")):
        return "check the user, password and grants in the backend URL"
    if "does not exist" in text or "unknown database" in text:
        return "create the database, or correct its name in the backend URL"
    if "connect" in text or "refused" in text or "server" in text or "terminat" in text:
        return "check that the database is running and reachable"
    if "permission" in text:
        return "check the grants of the backend URL's user"
    if "locked" in text or "deadlock" in text or "lock wait" in text:
        return "another transaction held a lock too long; retry"
    return "check the database and the backend URL"


def _check_key(key: str, what: str) -> None:
    if len(key) > MAX_KEY_CHARS:
        msg = f"{what} {key[:40]!r}... has {len(key)} characters; the SQL result backend takes at most {MAX_KEY_CHARS}"
        raise BackendError(msg)


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

    Keys compare by code point (see :class:`_Key`), so a prefix is a range of the primary key.
    """
    for index in range(len(prefix) - 1, -1, -1):
        code = ord(prefix[index]) + 1
        if 0xD800 <= code <= 0xDFFF:
            code = 0xE000  # surrogates cannot be encoded
        if code <= 0x10FFFF:
            return prefix[:index] + chr(code)
    return None
