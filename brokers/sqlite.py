"""SQLite broker: the embedded default, a queue in one file shared by processes on one machine.

Several producer and worker processes (and threads) share one database file, which may be
the same file as the SQLite result backend. Python's stdlib ``sqlite3`` only.

Connection string
=================

.. code-block::

    sqlite:///relative/path.sqlite3     relative to the working directory
    sqlite:////absolute/path.sqlite3    absolute

Features
========
* Priority: yes, 0-9, 9 most urgent (``supports_priority = True``).
* Delays: yes, held in the file (``visible_at``), so they survive restarts.
* Leases: a received message is invisible for ``visibility_timeout`` seconds; ``renew`` extends
  it; a lease that runs out makes the message ready again, with no sweeper process.
* Dead letters: a message delivered ``max_deliveries`` times without an ack, or nacked with
  ``requeue=False``, moves to ``tf_dead_letters``; list, requeue or purge it from there.
* Network file systems: no. SQLite's WAL mode needs every process on the same machine.
* Options: ``broker_options={"busy_timeout_s": 30.0}``, seconds a statement waits for another
  process's write lock before failing with ``BrokerConnectionError``.

Delivery guarantee
==================
At least once. A message is deleted only by the ack of the delivery that currently holds
its lease. Every receive issues a fresh lease token (``leased_by``); ack, nack and renew
match it, so a worker whose lease ran out and whose message was since received by another
worker cannot delete, requeue or extend the other worker's copy: its late ack is a no-op,
and the message runs twice (tasks must be idempotent, as with any at-least-once broker).
A late ack whose message nobody has received since still deletes it: the work is done.

Ready order: priority (high first), then the consumer's queue order, then the time the
message became ready (publish time, end of its delay, or end of an expired lease), then id.
Times are wall-clock UNIX seconds, shared by every process on the machine.

Tables: ``tf_messages``, ``tf_dead_letters`` and ``tf_broker_meta`` (schema version; the
broker keeps its own because ``PRAGMA user_version`` belongs to the whole file, which the
result backend may share).
"""

from __future__ import annotations

import itertools
import logging
import os
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

from taskframe.broker import (
    DEFAULT_PRIORITY,
    MAX_PRIORITY,
    MIN_PRIORITY,
    Buried,
    BuriedLog,
    DeadLetter,
    Delivery,
    Envelope,
    OutgoingMessage,
    QueueStats,
    check_priority,
    check_queues,
    check_receive,
    warn_lost_leases,
)
from taskframe.exceptions import (
    BrokerConnectionError,
    BrokerError,
    ConfigurationError,
    MessageError,
)
from taskframe.settings import mask_url
from taskframe.urls import sqlite_path

if TYPE_CHECKING:
    from taskframe.broker import Broker, Consumer
    from taskframe.settings import Settings

log = logging.getLogger(__name__)

#: Version of the tables below; bump it and add a migration step when they change.
SCHEMA_VERSION = 1
#: Seconds a statement waits for another process's write lock before failing.
BUSY_TIMEOUT_S = 30.0
#: First and longest pause, in seconds, between checks for new messages while idle.
POLL_MIN_S, POLL_MAX_S = 0.001, 0.020
#: Factor by which the idle pause grows after each check that found nothing.
POLL_GROWTH = 1.25

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS tf_messages (
        id INTEGER PRIMARY KEY,
        queue TEXT NOT NULL,
        priority INTEGER NOT NULL,
        visible_at REAL NOT NULL,
        leased_by TEXT,
        deliveries INTEGER NOT NULL DEFAULT 0,
        task_id TEXT,
        body BLOB NOT NULL,
        created_at REAL NOT NULL
    )""",
    # One probe per (queue, priority) finds the ready rows (visible_at <= now) as a prefix of
    # the index, whatever number of delayed or leased rows sits elsewhere in the queue.
    """CREATE INDEX IF NOT EXISTS tf_messages_ready
        ON tf_messages (queue, priority DESC, visible_at)""",
    """CREATE TABLE IF NOT EXISTS tf_dead_letters (
        id INTEGER PRIMARY KEY,
        queue TEXT NOT NULL,
        priority INTEGER NOT NULL,
        deliveries INTEGER NOT NULL,
        task_id TEXT,
        body BLOB NOT NULL,
        reason TEXT NOT NULL,
        dead_at REAL NOT NULL,
        created_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS tf_dead_letters_queue ON tf_dead_letters (queue, id)",
)

_INSERT = (
    "INSERT INTO tf_messages (queue, priority, visible_at, deliveries, task_id, body, created_at)"
    " VALUES (?, ?, ?, 0, ?, ?, ?)"
)
_LEASE = "UPDATE tf_messages SET deliveries = deliveries + 1, visible_at = ?, leased_by = ? WHERE id = ?"
_ACK = "DELETE FROM tf_messages WHERE id = ? AND leased_by = ?"
_REQUEUE = "UPDATE tf_messages SET visible_at = ?, leased_by = NULL WHERE id = ? AND leased_by = ?"
_RENEW = "UPDATE tf_messages SET visible_at = ? WHERE id = ? AND leased_by = ?"
_RELEASE = (
    "UPDATE tf_messages SET visible_at = ?, leased_by = NULL, deliveries = MAX(deliveries - 1, 0)"
    " WHERE id = ? AND leased_by = ?"
)
_BURY = (
    "INSERT INTO tf_dead_letters"
    " (queue, priority, deliveries, task_id, body, reason, dead_at, created_at)"
    " SELECT queue, priority, deliveries, task_id, body, ?, ?, created_at FROM tf_messages"
    " WHERE id = ?"
)
_BURY_LEASED = _BURY + " AND leased_by = ?"
_DELETE = "DELETE FROM tf_messages WHERE id = ?"
_STATS = (
    "SELECT coalesce(sum(visible_at <= :now), 0),"
    " coalesce(sum(visible_at > :now AND leased_by IS NULL), 0),"
    " coalesce(sum(visible_at > :now AND leased_by IS NOT NULL), 0)"
    " FROM tf_messages WHERE queue = :queue"
)
_COUNT_DEAD = "SELECT count(*) FROM tf_dead_letters WHERE queue = ?"
_PURGE = "DELETE FROM tf_messages WHERE queue = ? AND (leased_by IS NULL OR visible_at <= ?)"
_LIST_DEAD = (
    "SELECT id, queue, deliveries, reason, dead_at, body FROM tf_dead_letters WHERE queue = ? ORDER BY id LIMIT ?"
)
_REQUEUE_DEAD = (
    "INSERT INTO tf_messages (queue, priority, visible_at, deliveries, task_id, body, created_at)"
    " SELECT queue, priority, ?, 0, task_id, body, created_at FROM tf_dead_letters"
    " WHERE queue = ? ORDER BY id"
)
_PURGE_DEAD = "DELETE FROM tf_dead_letters WHERE queue = ?"

_PRIORITIES = range(MAX_PRIORITY, MIN_PRIORITY - 1, -1)


def _ready_sql(queue_count: int) -> str:
    """The receive query for ``queue_count`` queues: one index probe per (priority, queue).

    Each probe reads only ready rows (a prefix of the index), so the cost does not grow with
    the number of delayed or leased messages. The probes are listed in delivery order and
    UNION ALL yields them in that order, so the outer LIMIT stops at the first rows needed;
    an outer ORDER BY would make SQLite sort every probe (measured 30x slower).
    """
    probes = [
        f"SELECT * FROM (SELECT id, {index} AS qi, priority, visible_at, deliveries, body"
        f" FROM tf_messages WHERE queue = :q{index} AND priority = {priority}"
        " AND visible_at <= :now ORDER BY visible_at, id LIMIT :limit)"
        for priority in _PRIORITIES
        for index in range(queue_count)
    ]
    return " UNION ALL ".join(probes) + " LIMIT :limit"


def _next_due_sql(queue_count: int) -> str:
    """The earliest ``visible_at`` of any message of the queues (ready, delayed or leased)."""
    probes = [
        f"SELECT min(visible_at) AS due FROM tf_messages WHERE queue = :q{index} AND priority = {priority}"
        for index in range(queue_count)
        for priority in _PRIORITIES
    ]
    return "SELECT min(due) FROM (" + " UNION ALL ".join(probes) + ")"


def _release(conn: sqlite3.Connection, pid: int) -> None:
    """Close ``conn`` if this process opened it; otherwise keep it referenced forever.

    A forked child must never close the connection it inherited: its locks and WAL state
    belong to the parent, which may be inside a transaction on it right now. Deallocating
    it would close it too, hence the list.
    """
    if os.getpid() == pid:
        conn.close()
    else:
        _INHERITED.append(conn)


#: Connections inherited across fork(), never to be closed by this (child) process.
_INHERITED: list[sqlite3.Connection] = []


class _Handle:
    """One thread's connection, tagged with the process and broker generation that opened it."""

    __slots__ = ("__weakref__", "conn", "generation", "pid")

    def __init__(self, conn: sqlite3.Connection, pid: int, generation: int) -> None:
        self.conn = conn
        self.pid = pid
        self.generation = generation


class SQLiteBroker:
    """The ``sqlite:///path`` broker; see the module docstring for its guarantees."""

    supports_priority: ClassVar[bool] = True

    def __init__(self, url: str, conf: Settings) -> None:
        self.url = url
        self.path = sqlite_path(url)
        self.visibility_timeout_s = conf.visibility_timeout
        self.max_deliveries = conf.max_deliveries
        self.busy_timeout_s = float(conf.broker_options.get("busy_timeout_s", BUSY_TIMEOUT_S))
        self._local = threading.local()
        self._lock = threading.Lock()
        self._generation = 0  # bumped by close(): every thread then opens a fresh connection
        self._finalizers: list[weakref.finalize[Any, Any]] = []
        self._schema_pid = -1  # the process that last checked the schema

    def __repr__(self) -> str:
        return f"<SQLiteBroker {mask_url(self.url)}>"

    # -- connections ---------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection in this process, opened on first use."""
        handle: _Handle | None = getattr(self._local, "handle", None)
        if handle is not None and handle.generation == self._generation and handle.pid == os.getpid():
            return handle.conn
        return self._connect()

    def _connect(self) -> sqlite3.Connection:
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            msg = (
                f"sqlite broker {mask_url(self.url)!r}: directory {directory!r} does not exist;"
                " create it, or fix broker_url"
            )
            raise ConfigurationError(msg)
        pid = os.getpid()
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout_s,
                isolation_level=None,  # autocommit; transactions are explicit BEGIN IMMEDIATE
                check_same_thread=False,  # used by one thread, but close() may come from another
            )
        except sqlite3.Error as exc:
            raise self._error(exc, "open") from exc
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            if self._schema_pid != pid:
                self._create_schema(conn)
                self._schema_pid = pid
        except sqlite3.Error as exc:
            conn.close()
            raise self._error(exc, "open") from exc
        except BaseException:
            conn.close()
            raise
        handle = _Handle(conn, pid, self._generation)
        with self._lock:
            self._finalizers = [f for f in self._finalizers if f.alive]
            # Closes the connection when its thread ends and drops the thread-local handle.
            self._finalizers.append(weakref.finalize(handle, _release, conn, pid))
        self._local.handle = handle  # replacing a stale handle runs its finalizer
        return conn

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        with _transaction(conn):
            conn.execute("CREATE TABLE IF NOT EXISTS tf_broker_meta (key TEXT PRIMARY KEY, value)")
            row = conn.execute("SELECT value FROM tf_broker_meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                msg = (
                    f"sqlite broker {self.path!r} has schema version {version}, newer than this"
                    f" taskframe understands ({SCHEMA_VERSION}); upgrade taskframe"
                )
                raise BrokerError(msg)
            if version == SCHEMA_VERSION:
                return
            # Version 0 is an empty file; later versions will add their migration steps here.
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(
                "INSERT OR REPLACE INTO tf_broker_meta (key, value) VALUES ('schema_version', ?)",
                (SCHEMA_VERSION,),
            )

    def _error(self, exc: sqlite3.Error, action: str) -> BrokerError:
        """Turn a sqlite3 error into a one-line BrokerError naming the file and what to do.

        ``action`` is a verb phrase: "open", "publish", "receive", "ack", ...
        """
        text = str(exc)
        where = f"sqlite broker {mask_url(self.url)!r} ({self.path})"
        if "locked" in text or "busy" in text:
            msg = (
                f"{where}: {action} failed: {text} for over {self.busy_timeout_s:g}s; another"
                " process holds a long write transaction; retry, or look for a stuck process"
            )
            return BrokerConnectionError(msg)
        if "unable to open" in text:
            msg = (
                f"{where}: {action} failed: {text}; check that the path names a file (not a"
                " directory) in a directory this user may write to"
            )
            return BrokerConnectionError(msg)
        if "not a database" in text:
            msg = (
                f"{where}: {action} failed: the file is not an SQLite database; point broker_url"
                " at a new file or at an existing taskframe one"
            )
            return BrokerError(msg)
        msg = f"{where}: {action} failed: {type(exc).__name__}: {text}"
        return BrokerError(msg)

    def close(self) -> None:
        """Close every connection this process opened; a later call reconnects lazily."""
        with self._lock:
            self._generation += 1
            finalizers, self._finalizers = self._finalizers, []
        for finalizer in finalizers:
            finalizer()

    # -- publishing ----------------------------------------------------------------------

    def publish(
        self,
        queue: str,
        envelope: Envelope,
        *,
        delay_s: float = 0.0,
        priority: int = DEFAULT_PRIORITY,
    ) -> None:
        row = _row(queue, envelope, delay_s, priority, time.time())
        try:
            self._conn().execute(_INSERT, row)
        except sqlite3.Error as exc:
            raise self._error(exc, "publish") from exc

    def publish_many(self, messages: Sequence[OutgoingMessage]) -> None:
        now = time.time()
        self._insert([_row(m.queue, m.envelope, m.delay_s, m.priority, now) for m in messages])

    def publish_frames(self, batches: Mapping[tuple[str, int], Sequence[tuple[str, bytes]]]) -> None:
        """``publish_many`` of envelopes given as their frames (taskframe.broker.FramePublisher)."""
        now = time.time()
        self._insert(
            [
                (queue, check_priority(priority), now, task_id, frame, now)
                for (queue, priority), frames in batches.items()
                for task_id, frame in frames
            ]
        )

    def _insert(self, rows: list[tuple[str, int, float, str | None, bytes, float]]) -> None:
        """Publish ``rows`` (as ``_row`` makes them) in one transaction."""
        if not rows:
            return
        try:
            conn = self._conn()
            with _transaction(conn):
                conn.executemany(_INSERT, rows)
        except sqlite3.Error as exc:
            raise self._error(exc, "publish") from exc

    # -- consuming -----------------------------------------------------------------------

    def consumer(self, queues: Sequence[str], *, prefetch: int) -> SQLiteConsumer:
        return SQLiteConsumer(self, queues, prefetch=prefetch)

    # -- inspection and administration --------------------------------------------------

    def stats(self, queue: str) -> QueueStats:
        try:
            conn = self._conn()
            with _transaction(conn, "BEGIN"):  # one snapshot for both counts
                ready, delayed, reserved = conn.execute(_STATS, {"now": time.time(), "queue": queue}).fetchone()
                (dead,) = conn.execute(_COUNT_DEAD, (queue,)).fetchone()
        except sqlite3.Error as exc:
            raise self._error(exc, "read stats") from exc
        return QueueStats(queue, ready=ready, delayed=delayed, reserved=reserved, dead=dead)

    def purge(self, queue: str) -> int:
        try:
            cursor = self._conn().execute(_PURGE, (queue, time.time()))
        except sqlite3.Error as exc:
            raise self._error(exc, "purge") from exc
        return cursor.rowcount

    def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        try:
            rows = self._conn().execute(_LIST_DEAD, (queue, limit)).fetchall()
        except sqlite3.Error as exc:
            raise self._error(exc, "list dead letters") from exc
        return [_dead_letter(*row) for row in rows]

    def requeue_dead(self, queue: str) -> int:
        try:
            conn = self._conn()
            with _transaction(conn):
                moved = conn.execute(_REQUEUE_DEAD, (time.time(), queue)).rowcount
                conn.execute(_PURGE_DEAD, (queue,))
        except sqlite3.Error as exc:
            raise self._error(exc, "requeue dead letters") from exc
        return moved

    def purge_dead(self, queue: str) -> int:
        try:
            cursor = self._conn().execute(_PURGE_DEAD, (queue,))
        except sqlite3.Error as exc:
            raise self._error(exc, "purge dead letters") from exc
        return cursor.rowcount


class SQLiteConsumer:
    """Leases messages of a fixed list of queues; see :class:`taskframe.broker.Consumer`.

    ``prefetch`` is not enforced here: the worker asks for what it has room for through
    ``max_messages``, and nothing is buffered in memory between calls.
    """

    def __init__(self, broker: SQLiteBroker, queues: Sequence[str], *, prefetch: int) -> None:
        check_queues(queues)
        self.broker = broker
        self.queues = list(queues)
        self.prefetch = prefetch
        self.id = uuid.uuid4().hex[:16]
        self._receipts = itertools.count(1)
        self._ready_sql = _ready_sql(len(self.queues))
        self._next_due_sql = _next_due_sql(len(self.queues))
        self._queue_params = {f"q{i}": q for i, q in enumerate(self.queues)}
        self._closed = False
        self._buried = BuriedLog()

    def __repr__(self) -> str:
        return f"<SQLiteConsumer {self.id} of {self.queues} on {self.broker!r}>"

    def receive(self, timeout_s: float, *, max_messages: int = 1) -> list[Delivery]:
        return self.ack_and_receive((), timeout_s, max_messages=max_messages)

    def ack_and_receive(self, acks: Sequence[Delivery], timeout_s: float, *, max_messages: int = 1) -> list[Delivery]:
        """``ack_many(acks)`` and a receive, the acks in the receive's first transaction (one
        commit, one fsync, for both); see taskframe.broker.AcksWithReceive."""
        check_receive(self, closed=self._closed, max_messages=max_messages)
        deadline = time.monotonic() + max(timeout_s, 0.0)
        acked = [d.tag for d in acks]
        try:
            while True:
                deliveries, version, next_due = self._claim(max_messages, acked)
                acked = []
                if deliveries:
                    return deliveries
                if not self._wait(deadline, version, next_due):
                    return []
        except sqlite3.Error as exc:
            raise self.broker._error(exc, "receive") from exc

    def _claim(self, limit: int, acks: Sequence[Any] = ()) -> tuple[list[Delivery], int, float | None]:
        """Lease up to ``limit`` ready messages in one write transaction (after acking the
        ``acks`` tags in it).

        Returns the deliveries and, when there are none, this connection's data version
        and the earliest time a message of these queues becomes ready, both read in the
        same transaction, so that no commit can slip between them and the wait.
        """
        conn = self.broker._conn()
        token = f"{self.id}.{next(self._receipts)}"
        deliveries: list[Delivery] = []
        burying = BuriedLog()
        empty: tuple[list[Delivery], int, float | None] | None = None
        with _transaction(conn):
            if acks:
                conn.executemany(_ACK, acks)
            while not deliveries:
                now = time.time()
                rows = conn.execute(self._ready_sql, {**self._queue_params, "now": now, "limit": limit}).fetchall()
                if not rows:
                    (version,) = conn.execute("PRAGMA data_version").fetchone()
                    (due,) = conn.execute(self._next_due_sql, self._queue_params).fetchone()
                    empty = [], version, due
                    break
                # SQLite yields UNION ALL arms in order (the priority tests would catch a
                # change); sorting the few rows fetched is a cheap guard within the batch.
                rows.sort(key=_delivery_order)
                deliveries = self._lease(conn, rows, token, now, burying)
        self._buried.extend(burying)  # committed: they are dead letters now
        return empty or (deliveries, 0, None)

    def take_buried(self) -> list[Buried]:
        """What this consumer dead-lettered after ``max_deliveries`` since the last call."""
        return self._buried.take()

    def _lease(
        self, conn: sqlite3.Connection, rows: list[Any], token: str, now: float, buried: BuriedLog
    ) -> list[Delivery]:
        """Lease the rows that may be delivered again; dead-letter the rest (those that ran out
        of deliveries also into ``buried``)."""
        deliveries: list[Delivery] = []
        leases: list[tuple[float, str, int]] = []
        max_deliveries = self.broker.max_deliveries
        lease_until = now + self.broker.visibility_timeout_s
        for row_id, queue_index, _priority, _visible_at, count, body in rows:
            queue = self.queues[queue_index]
            if count >= max_deliveries:
                reason = (
                    f"delivered {count} times without an ack (max_deliveries={max_deliveries}):"
                    " the task probably crashed its worker"
                )
                _bury(conn, row_id, reason, now)
                log.warning("message %s of queue %r dead-lettered: %s", row_id, queue, reason)
                buried.add_frame(body, queue, reason)
                continue
            try:
                envelope = Envelope.from_bytes(body)
            except MessageError as exc:
                _bury(conn, row_id, f"unreadable frame: {exc}", now)
                log.warning("message %s of queue %r dead-lettered: %s", row_id, queue, exc)
                continue
            leases.append((lease_until, token, row_id))
            deliveries.append(Delivery(envelope, queue, count + 1, (row_id, token)))
        conn.executemany(_LEASE, leases)  # one statement for the batch, in the same transaction
        return deliveries

    def _wait(self, deadline: float, version: int, next_due: float | None) -> bool:
        """Sleep until a message may be ready (True) or the deadline passes (False).

        ``PRAGMA data_version`` changes when another connection commits, which is how a new
        message shows up; a delayed or leased message becomes ready without any commit, so
        the earliest ``visible_at`` is watched too.
        """
        conn = self.broker._conn()
        pause_s = POLL_MIN_S
        while True:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return False
            if next_due is not None:
                due_in_s = next_due - time.time()
                if due_in_s <= 0:
                    return True
                remaining_s = min(remaining_s, due_in_s)
            time.sleep(min(pause_s, remaining_s))
            pause_s = min(pause_s * POLL_GROWTH, POLL_MAX_S)
            (current,) = conn.execute("PRAGMA data_version").fetchone()
            if current == version:
                continue
            # Something was committed, maybe only a result or another queue's message: read
            # (without the write lock) whether one of ours is ready before competing for it.
            version = current
            (next_due,) = conn.execute(self._next_due_sql, self._queue_params).fetchone()

    def ack(self, delivery: Delivery) -> None:
        row_id, token = delivery.tag
        try:
            self.broker._conn().execute(_ACK, (row_id, token))
        except sqlite3.Error as exc:
            raise self.broker._error(exc, "ack") from exc

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Ack a batch in one transaction: one commit (one fsync) instead of one per message."""
        if not deliveries:
            return
        rows = [d.tag for d in deliveries]
        try:
            conn = self.broker._conn()
            with _transaction(conn):
                conn.executemany(_ACK, rows)
        except sqlite3.Error as exc:
            raise self.broker._error(exc, f"ack {len(rows)} messages") from exc

    def nack(self, delivery: Delivery, *, requeue: bool, reason: str = "", delay_s: float = 0.0) -> None:
        row_id, token = delivery.tag
        now = time.time()
        try:
            conn = self.broker._conn()
            if requeue:
                conn.execute(_REQUEUE, (now + max(delay_s, 0.0), row_id, token))
                return
            with _transaction(conn):
                reason = reason or "rejected by the worker"
                if conn.execute(_BURY_LEASED, (reason, now, row_id, token)).rowcount:
                    conn.execute(_DELETE, (row_id,))
        except sqlite3.Error as exc:
            raise self.broker._error(exc, "nack") from exc

    def release(self, deliveries: Sequence[Delivery]) -> None:
        """Hand back deliveries whose task never started, with the count they had before."""
        if not deliveries:
            return
        now = time.time()
        rows = [(now, *d.tag) for d in deliveries]
        try:
            conn = self.broker._conn()
            with _transaction(conn):
                conn.executemany(_RELEASE, rows)
        except sqlite3.Error as exc:
            raise self.broker._error(exc, "release") from exc

    def renew(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        lease_until = time.time() + self.broker.visibility_timeout_s
        rows = [(lease_until, *d.tag) for d in deliveries]
        try:
            conn = self.broker._conn()
            with _transaction(conn):
                renewed = conn.executemany(_RENEW, rows).rowcount
        except sqlite3.Error as exc:
            raise self.broker._error(exc, "renew leases") from exc
        warn_lost_leases(log, len(rows) - renewed, len(rows))

    def close(self) -> None:
        # Nothing is buffered: unacked deliveries come back when their leases end.
        self._closed = True


@contextmanager
def _transaction(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    """Run the block in one transaction; IMMEDIATE takes the write lock up front, so a
    read-then-write (claiming a row) cannot deadlock or lose to another writer."""
    conn.execute(begin)
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _delivery_order(row: Any) -> tuple[int, int, float, int]:
    row_id, queue_index, priority, visible_at = row[:4]
    return (-priority, queue_index, visible_at, row_id)


def _row(
    queue: str, envelope: Envelope, delay_s: float, priority: int, now: float
) -> tuple[str, int, float, str | None, bytes, float]:
    check_priority(priority)
    visible_at = now + delay_s if delay_s > 0 else now
    return (queue, priority, visible_at, envelope.task_id, envelope.to_bytes(), now)


def _bury(conn: sqlite3.Connection, row_id: int, reason: str, now: float) -> None:
    conn.execute(_BURY, (reason, now, row_id))
    conn.execute(_DELETE, (row_id,))


def _dead_letter(row_id: int, queue: str, deliveries: int, reason: str, dead_at: float, body: bytes) -> DeadLetter:
    try:
        envelope = Envelope.from_bytes(body)
    except MessageError:
        # Listing must work even for the garbage that got a message buried.
        envelope = Envelope(body=bytes(body), headers={}, content_encoding="binary")
    task = envelope.headers.get("task")
    return DeadLetter(
        id=str(row_id),
        task=str(task) if task is not None else None,
        queue=queue,
        deliveries=deliveries,
        reason=reason,
        dead_at=dead_at,
        envelope=envelope,
    )


if TYPE_CHECKING:  # mypy proves the adapter still fits the core's protocols

    def _fits(url: str, conf: Settings) -> tuple[Broker, Consumer]:
        broker = SQLiteBroker(url, conf)
        return broker, broker.consumer(["q"], prefetch=1)
