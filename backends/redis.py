"""Redis result backend, in Celery's key layout, with pub/sub notification for ``wait()``.

URL
===

.. code-block::

    redis://[[user]:password@]host[:port][/db][?socket_timeout=10&...]
    rediss://[[user]:password@]host[:port][/db][?ssl_cert_reqs=required&ssl_ca_certs=/path]
    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db][?...]

(the last through Sentinel, as the broker: see ``taskframe.brokers.redis_wire``).
Query parameters are redis-py's (``ConnectionPool.from_url``). ``backend_options`` may add
``key_prefix`` (default ``""``, prepended to every key and channel, like Celery's
``global_keyprefix``), ``socket_timeout`` (s, default 10), ``socket_connect_timeout`` (s,
default 5), ``retry_s`` (default 10: how long an idempotent operation retries a lost
connection), ``max_connections``, ``health_check_interval`` and ``client_name``.

Layout (Celery's for records, so Celery tools can read them)::

    celery-task-meta-<task id>   STRING  the record as JSON, TTL = ttl_s (result_expires)
    taskframe-doc-<key>          STRING  a document of put(), as JSON
    celery-taskset-meta-<id>     STRING  the document "group-meta-<id>" (a saved group), as JSON
    taskframe-counter-<key>      STRING  a counter of incr()

Chords are joined as Celery's Redis backend joins them (``on_chord_part_return``), in its keys,
so a chord sent by either framework completes with header tasks run by either kind of worker::

    celery-taskset-meta-<gid>.s  STRING  the header's size (chord_start; Celery's set_chord_size)
    celery-taskset-meta-<gid>.j  ZSET    [1, task id, state, result] per header task, scored by
                                         its group_index (Celery's result_chord_ordered default)
    celery-taskset-meta-<gid>.d  SET     "<task id>:<group_index>" of the tasks counted
    celery-taskset-meta-<gid>.t  STRING  Celery's size adjustment (read, never written here)
    celery-taskset-meta-<gid>.c  STRING  the claim of the one worker sending the body, for
                                         ``CHORD_CLAIM_S``; "done" once the body was sent

Features: task records, documents and counters, each with an optional TTL that Redis
enforces by itself (``PX``). ``wait()`` blocks on pub/sub (``supports_wait = True``).

Guarantees:

- ``store()`` is one Lua script: it reads the current status, refuses to replace a ready state
  (``READY_STATES``) by one that is not, writes with the TTL and publishes the record on the
  channel ``celery-task-meta-<id>``, as Celery does, all atomically.
- ``incr()`` is ``INCR`` and ``PEXPIRE`` (or ``PERSIST``) in one ``MULTI``: atomic. It is not
  retried after a lost connection, since a lost reply would count twice; the other operations
  are idempotent and retry for ``retry_s`` before raising :class:`BackendError`.
- ``scan()`` walks the keys with ``SCAN MATCH`` (never ``KEYS``, which blocks Redis).
- ``chord_part_return()`` is one Lua script with Celery's operations: a header task counts once
  however often it runs (``.d``), and the report that completes the header takes the claim
  (``.c``, ``SET NX``) and gets every result, in header order, in the same step. The body is
  sent once: a later report finds the claim taken, or "done" (``chord_done``). A worker that
  dies holding the claim loses it after ``CHORD_CLAIM_S``, and a redelivered header task sends
  the body then; one that dies after sending the body but before ``chord_done`` could let a
  redelivery more than ``CHORD_CLAIM_S`` later send it again (Celery has the same window).

``wait()``: each process has one pub/sub connection per backend object, read by one
background thread that hands each message to the threads waiting for that task. A waiter
subscribes the task's channel on that shared connection (Celery's per-task channel, so a
process receives only the results it waits for) and unsubscribes when done. It reads the
record once the subscription is confirmed, so a result stored before that is found, and one
stored after it is published to it. After a lost connection the thread reconnects,
subscribes again and wakes every waiter to read once more; a waiter also reads every
``SAFETY_POLL_S`` seconds, and polls with backoff while the subscription cannot be made.

Speed: ``store()``, ``fetch()`` and ``get()`` (a worker's per-task writes and its revocation
read) are packed by hand and sent on a connection kept out of the pool
(``taskframe.brokers.redis_wire``, shared with the broker): redis-py's per-command machinery
cost as much client time as the round trip.

Fork safety: the connection pool, the pub/sub connection and its thread belong to the process
that made them; a forked child builds its own on first use and never closes the parent's.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, cast
from urllib.parse import urlsplit

import redis
from redis.exceptions import NoScriptError
from redis.retry import Retry

if TYPE_CHECKING:  # mypy reads the source tree, where the package is ``brokers``
    from brokers.redis_wire import DirectLane, connection_pool, resp
else:
    from taskframe.brokers.redis_wire import DirectLane, connection_pool, resp
from taskframe.backend import READY_STATES, ChordJoin, ChordPart, ResultRecord, dump_json
from taskframe.exceptions import BackendError, ConfigurationError
from taskframe.settings import Settings, mask_url

log = logging.getLogger(__name__)

#: Celery's key of a task's record; also the pub/sub channel its writes are published on.
TASK_KEY_PREFIX = "celery-task-meta-"
#: Keys of documents (put/get/scan/delete) and counters (incr).
DOC_KEY_PREFIX, COUNTER_KEY_PREFIX = "taskframe-doc-", "taskframe-counter-"
#: A saved group's document ("group-meta-<id>") lives under Celery's key, where Celery's
#: GroupResult.restore looks (GroupResult.save writes Celery's layout into it).
GROUP_DOC_PREFIX, CELERY_GROUP_KEY_PREFIX = "group-meta-", "celery-taskset-meta-"
#: Seconds the worker that completes a chord's header holds the right to send its body: after
#: that, if the body was not sent, a redelivered header task may take it. Celery's default.
CHORD_CLAIM_S = 10
#: Seconds the "done" mark of a chord outlives it (Celery's): a late header task then does nothing.
CHORD_DONE_S = 300
#: Seconds a socket read or write may take before the connection counts as lost.
DEFAULT_SOCKET_TIMEOUT_S = 10.0
#: Seconds to establish a connection before it counts as refused.
DEFAULT_CONNECT_TIMEOUT_S = 5.0
#: Seconds an idempotent operation retries a lost connection before it raises.
DEFAULT_RETRY_S = 10.0
#: First and longest pause, in seconds, between two attempts.
RETRY_MIN_S, RETRY_MAX_S = 0.05, 1.0
#: Seconds a waiter waits for its subscription to be confirmed before it falls back to polling.
SUBSCRIBE_WAIT_S = 1.0
#: Seconds between two reads of a waiter with a confirmed subscription: a safety net only.
SAFETY_POLL_S = 2.0
#: First and longest poll interval, in seconds, of a waiter without a subscription.
POLL_MIN_S, POLL_MAX_S = 0.01, 0.5
#: Seconds the pub/sub thread blocks on its socket before it looks at its state again.
LISTEN_TICK_S = 5.0
#: Keys per MGET of a scan.
SCAN_BATCH = 500

_OPTIONS = frozenset(
    {
        "key_prefix",
        "socket_timeout",
        "socket_connect_timeout",
        "retry_s",
        "max_connections",
        "health_check_interval",
        "client_name",
    }
)

_READY_LUA = " or ".join(f"status == '{state}'" for state in sorted(READY_STATES))

# KEYS[1]: the record's key. ARGV: JSON (with "status" first), ready (1/0), ttl_ms (0: none).
# The current status is read with a pattern, since this module writes "status" first; a
# record written by someone else is decoded in full.
_STORE = f"""
if ARGV[2] == '0' then
  local current = redis.call('GET', KEYS[1])
  if current then
    local status = string.match(current, '^{{"status":%s*"([^"]*)"')
    if not status then
      local ok, decoded = pcall(cjson.decode, current)
      if ok and type(decoded) == 'table' then status = decoded['status'] end
    end
    if {_READY_LUA} then return 0 end
  end
end
local ttl_ms = tonumber(ARGV[3])
if ttl_ms > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl_ms)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""

# Celery's CHORD_PART_RETURN_LUA (celery/backends/redis.py, ordered mode), returning the joined
# results with the claim, and counting a claim this caller already holds as taken (a retry
# after a lost reply). KEYS: .j .t .s .d <group key> .c. ARGV: task id, [1, id, state, result]
# as JSON, group_index score, expires (s, 0: none), claim seconds, claim token, the size the
# message gives (0: none; used only when .s is missing, for a chord sent without chord_start).
# Returns {-1} when the chord is done, {0} while incomplete or claimed by another, {1, parts}.
_CHORD_PART_RETURN = """
local jkey, tkey, skey, dkey, gkey, ckey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local tid, value, score = ARGV[1], ARGV[2], ARGV[3]
local expires, claim_expires, claim_token = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
if redis.call('GET', ckey) == 'done' then
  return {-1}
end
local member = tid .. ':' .. score
if redis.call('SISMEMBER', dkey, member) == 0 then
  redis.call('ZADD', jkey, score, value)
  redis.call('SADD', dkey, member)
end
local readycount = redis.call('ZCOUNT', jkey, '-inf', '+inf')
if expires > 0 then
  for _, key in ipairs({jkey, tkey, skey, dkey}) do
    redis.call('EXPIRE', key, expires)
  end
  redis.call('EXPIRE', gkey, expires)
end
local totaldiff = redis.call('GET', tkey)
local size = redis.call('GET', skey)
if not size and tonumber(ARGV[7]) > 0 then
  size = ARGV[7]
end
if size and readycount == tonumber(size) + tonumber(totaldiff or 0) then
  local holder = redis.call('GET', ckey)
  if holder == claim_token or (not holder and redis.call('SET', ckey, claim_token, 'NX', 'EX', claim_expires)) then
    return {1, redis.call('ZRANGE', jkey, 0, -1)}
  end
end
return {0}
"""

# Celery's CHORD_CLEANUP_LUA: drop the chord's keys and mark it done, if the claim is ours.
# KEYS: .c .j .t .s .d. ARGV: claim token, seconds the "done" mark lasts.
_CHORD_CLEANUP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
  redis.call('SET', KEYS[1], 'done', 'EX', tonumber(ARGV[2]))
  return 1
end
return 0
"""

# Give up the claim (KEYS[1], .c) if it is still ours (ARGV[1]): the body could not be sent.
_CHORD_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_T = TypeVar("_T")


class _PubSubConnection(Protocol):
    """The part of redis-py's (untyped) ``Connection`` that the listener uses."""

    def connect(self) -> None: ...
    def disconnect(self) -> None: ...
    def send_command(self, *args: str | bytes) -> None: ...
    def can_read(self, timeout: float = 0) -> bool: ...
    def read_response(self) -> Any: ...


class _Waiter:
    """One wait() in progress; the listener sets ``event`` when the task's channel speaks."""

    __slots__ = ("channel", "event", "payload", "subscribed")

    def __init__(self, channel: bytes) -> None:
        self.channel = channel
        self.subscribed = threading.Event()  # the channel's subscription is confirmed
        self.event = threading.Event()  # a message arrived, or the connection was replaced
        self.payload: bytes | None = None  # the last message, if any


class _Listener:
    """This process's pub/sub connection of one backend object, and the thread reading it.

    Waiter threads send SUBSCRIBE/UNSUBSCRIBE on the shared connection (under ``_lock``);
    only the listener thread reads from it, connects and reconnects.
    """

    def __init__(self, make_connection: Callable[[], _PubSubConnection], where: str) -> None:
        self._make_connection = make_connection
        self._where = where
        self._lock = threading.Lock()  # guards the state below and every send
        self._channels: dict[bytes, set[_Waiter]] = {}
        self._pending: collections.Counter[bytes] = collections.Counter()  # SUBSCRIBEs not yet confirmed
        self._confirmed: set[bytes] = set()
        self._conn: _PubSubConnection | None = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    def register(self, channel: bytes) -> _Waiter:
        waiter = _Waiter(channel)
        with self._lock:
            waiters = self._channels.get(channel)
            if waiters is None:
                waiters = self._channels[channel] = set()
                self._send_locked("SUBSCRIBE", channel)
            elif channel in self._confirmed:
                waiter.subscribed.set()
            waiters.add(waiter)
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(target=self._run, name="taskframe-redis-results", daemon=True)
                self._thread.start()
        return waiter

    def unregister(self, waiter: _Waiter) -> None:
        with self._lock:
            waiters = self._channels.get(waiter.channel)
            if waiters is None:
                return
            waiters.discard(waiter)
            if not waiters:
                del self._channels[waiter.channel]
                self._confirmed.discard(waiter.channel)
                self._send_locked("UNSUBSCRIBE", waiter.channel)

    def take(self, waiter: _Waiter) -> bytes | None:
        """The message that woke ``waiter`` (None: look at the store), and rearm it."""
        with self._lock:
            payload, waiter.payload = waiter.payload, None
            waiter.event.clear()
        return payload

    def close(self) -> None:
        with self._lock:
            self._closed.set()
            thread = self._thread
            # A PING makes the thread's blocked read return, so it sees the flag at once.
            self._send_locked("PING")
            self._wake_all_locked()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=LISTEN_TICK_S + 1)
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.disconnect()

    def _send_locked(self, *command: str | bytes) -> None:
        conn = self._conn
        if conn is None:
            return  # the thread subscribes every channel when it connects
        try:
            conn.send_command(*command)
        except (redis.exceptions.RedisError, OSError):
            return  # the thread's read fails too, and it reconnects and subscribes again
        if command[0] == "SUBSCRIBE":
            self._pending[command[1]] += 1  # type: ignore[index]

    def _lost_locked(self) -> None:
        """The connection is gone: no channel is subscribed until the thread reconnects.
        Waiters read the store once (a result published meanwhile was not heard) and poll
        until their subscription is confirmed again."""
        self._conn = None
        self._pending.clear()
        self._confirmed.clear()
        for waiters in self._channels.values():
            for waiter in waiters:
                waiter.subscribed.clear()
        self._wake_all_locked()

    def _wake_all_locked(self) -> None:
        for waiters in self._channels.values():
            for waiter in waiters:
                waiter.event.set()

    def _run(self) -> None:
        pause_s = RETRY_MIN_S
        reconnecting = False
        while not self._closed.is_set():
            conn = self._conn
            if conn is None:
                conn = self._connect(reconnecting)
                if conn is None:
                    self._closed.wait(pause_s)
                    pause_s = min(pause_s * 2, RETRY_MAX_S)
                    continue
                pause_s = RETRY_MIN_S
            try:
                if not conn.can_read(timeout=LISTEN_TICK_S):
                    continue
                reply = conn.read_response()
            except (redis.exceptions.RedisError, OSError) as exc:
                if not self._closed.is_set():
                    log.warning("result notifications from %s interrupted (%s); reconnecting", self._where, exc)
                with self._lock:
                    self._lost_locked()
                conn.disconnect()
                reconnecting = True
                continue
            self._dispatch(reply)

    def _connect(self, reconnecting: bool) -> _PubSubConnection | None:
        conn = self._make_connection()
        try:
            conn.connect()
        except (redis.exceptions.RedisError, OSError) as exc:
            log.debug("cannot subscribe to results on %s: %s", self._where, exc)
            conn.disconnect()
            return None
        with self._lock:
            if self._closed.is_set():
                conn.disconnect()
                return None
            self._conn = conn
            for channel in self._channels:
                self._send_locked("SUBSCRIBE", channel)
            if reconnecting:
                self._wake_all_locked()
        return conn

    def _dispatch(self, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) < 3:
            return  # PONG of close(), outside subscribed mode
        kind, channel = reply[0], reply[1]
        with self._lock:
            if kind == b"message":
                for waiter in self._channels.get(channel, ()):
                    waiter.payload = reply[2]
                    waiter.event.set()
            elif kind == b"subscribe":
                self._pending[channel] -= 1
                if self._pending[channel] <= 0:
                    del self._pending[channel]
                    if channel in self._channels:
                        self._confirmed.add(channel)
                        for waiter in self._channels[channel]:
                            waiter.subscribed.set()


class _ProcessState:
    """What a backend object keeps per process: a forked child builds a fresh one."""

    def __init__(self, url: str, pool_kwargs: dict[str, Any], where: str) -> None:
        self.pid = os.getpid()
        self.pool = connection_pool(url, **pool_kwargs)
        self.client = redis.Redis(connection_pool=self.pool)
        self.lane = DirectLane(self.pool)  # store and read on the hot path (see redis_wire)
        self.store_sha = hashlib.sha1(_STORE.encode()).hexdigest()
        self.chord_part_script = self.client.register_script(_CHORD_PART_RETURN)
        self.chord_cleanup_script = self.client.register_script(_CHORD_CLEANUP)
        self.chord_release_script = self.client.register_script(_CHORD_RELEASE)
        self.listener = _Listener(self._pubsub_connection, where)

    def _pubsub_connection(self) -> _PubSubConnection:
        kwargs = {
            **self.pool.connection_kwargs,
            # Reads come only from the listener thread: a health-check PING sent by a
            # subscribing thread would read (and lose) a message.
            "health_check_interval": 0,
            "retry": Retry(redis.backoff.NoBackoff(), 0),
        }
        return cast(_PubSubConnection, self.pool.connection_class(**kwargs))

    def store(self, key: str, args: tuple[str, int, int]) -> None:
        """The store script (EVALSHA, loaded after NOSCRIPT: Redis restarted)."""
        packed = resp("EVALSHA", self.store_sha, 1, key, *args)
        (reply,) = self.lane.send(packed, 1)
        if isinstance(reply, NoScriptError):
            self.client.script_load(_STORE)
            (reply,) = self.lane.send(packed, 1)
        if isinstance(reply, Exception):
            raise reply

    def get(self, key: str) -> bytes | None:
        (reply,) = self.lane.send(resp("GET", key), 1)
        if isinstance(reply, Exception):
            raise reply
        return cast("bytes | None", reply)

    def close(self) -> None:
        self.listener.close()
        self.lane.close()
        self.pool.disconnect()


#: States inherited through fork(): kept referenced, never closed by the child (the sockets
#: are the parent's too), and never used (a lock may have been held at fork time).
_INHERITED: list[_ProcessState] = []


class RedisBackend:
    """Results in Redis; see the module docstring for layout and guarantees."""

    supports_wait: ClassVar[bool] = True

    def __init__(self, url: str, conf: Settings) -> None:
        self.url = url
        options = dict(conf.backend_options)
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            msg = f"unknown backend_options {unknown} for the redis result backend; known: {sorted(_OPTIONS)}"
            raise ConfigurationError(msg)
        self.key_prefix = str(options.pop("key_prefix", ""))
        self.retry_s = _seconds(options, "retry_s", DEFAULT_RETRY_S)
        self._pool_kwargs: dict[str, Any] = {
            "socket_timeout": _seconds(options, "socket_timeout", DEFAULT_SOCKET_TIMEOUT_S),
            "socket_connect_timeout": _seconds(options, "socket_connect_timeout", DEFAULT_CONNECT_TIMEOUT_S),
            # No silent retries: a MULTI of incr() re-sent after a lost reply would count twice.
            # The pool replaces a connection the server closed when it is taken out; outages
            # are retried by _retrying, only for operations that are safe to repeat.
            "retry": Retry(redis.backoff.NoBackoff(), 0),
            "protocol": 2,  # RESP2: plain pub/sub replies on every redis-py version >= 5
            **options,
        }
        self._lock = threading.Lock()
        self._state: _ProcessState | None = None
        if "cluster=" in urlsplit(url).query.lower():
            # The broker's cluster option (brokers/redis.py); with no result_backend set, the
            # App hands the broker's URL on to here.
            msg = (
                f"the redis result backend runs on one Redis server, not a Redis Cluster ({mask_url(url)!r}): "
                "set result_backend to a single server's URL (without cluster=) or to another backend"
            )
            raise ConfigurationError(msg)
        try:
            connection_pool(url)  # parse now: a bad URL fails at App(), not at first use
        except ValueError as exc:
            expected = (
                "redis://[:password@]host[:port][/db] or redis+sentinel://host[:port][,host[:port]...]/service[/db]"
            )
            msg = f"bad redis result backend URL {mask_url(url)!r}: {exc}; expected {expected}"
            raise ConfigurationError(msg) from None

    def __repr__(self) -> str:
        return f"RedisBackend({mask_url(self.url)!r})"

    # -- task records -------------------------------------------------------------------------

    def store(self, task_id: str, record: ResultRecord, *, ttl_s: float | None) -> None:
        status = record.get("status")
        if not isinstance(status, str):
            msg = f"result record of task {task_id!r} has no 'status' string (got {status!r})"
            raise BackendError(msg)
        text = dump_json({"status": status, **record}, f"result of task {task_id!r}")
        args = (text, int(status in READY_STATES), _ttl_ms(ttl_s))
        key = self.task_key(task_id)
        self._retrying("store the result", lambda: self._state_now().store(key, args))

    def fetch(self, task_id: str) -> ResultRecord | None:
        key = self.task_key(task_id)
        raw = self._retrying("read the result", lambda: self._state_now().get(key))
        return None if raw is None else _loads(raw, f"result of task {task_id!r}")

    def wait(self, task_id: str, timeout_s: float) -> ResultRecord | None:
        deadline = time.monotonic() + timeout_s
        listener = self._state_now().listener
        waiter = listener.register(self.task_key(task_id).encode())
        try:
            confirmed = waiter.subscribed.wait(min(max(timeout_s, 0.0), SUBSCRIBE_WAIT_S))
            record = self.fetch(task_id)
            poll_s = POLL_MIN_S
            while record is None or record.get("status") not in READY_STATES:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    return None
                waiter.event.wait(min(remaining_s, SAFETY_POLL_S if confirmed else poll_s))
                payload = listener.take(waiter)
                if payload is not None:
                    record = _loads(payload, f"result of task {task_id!r}")
                    continue
                # Woken by a reconnect, the safety net, or a poll: read the store. Also read it
                # once the subscription is confirmed late: a write just before was not heard.
                confirmed = waiter.subscribed.is_set()
                poll_s = min(poll_s * 2, POLL_MAX_S)
                record = self.fetch(task_id)
            return record
        finally:
            listener.unregister(waiter)

    def forget(self, task_id: str) -> None:
        key = self.task_key(task_id)
        self._retrying("forget the result", lambda: self._client().delete(key))

    # -- counters and documents ---------------------------------------------------------------

    def incr(self, key: str, *, ttl_s: float | None) -> int:
        counter = self.counter_key(key)
        with self._errors("increment the counter"):
            pipe = self._client().pipeline(transaction=True)
            pipe.incr(counter)
            if ttl_s is None:
                pipe.persist(counter)
            else:
                pipe.pexpire(counter, _ttl_ms(ttl_s))
            value, _ = pipe.execute()
        return int(value)

    def put(self, key: str, value: dict[str, Any], *, ttl_s: float | None) -> None:
        text = dump_json(value, f"document {key!r}")
        doc_key, ttl_ms = self.doc_key(key), _ttl_ms(ttl_s)
        self._retrying("store the document", lambda: self._client().set(doc_key, text, px=ttl_ms or None))

    def get(self, key: str) -> dict[str, Any] | None:
        doc_key = self.doc_key(key)
        raw = self._retrying("read the document", lambda: self._state_now().get(doc_key))
        if raw is None:
            return None
        doc: dict[str, Any] = _loads(raw, f"document {key!r}")
        return doc

    def scan(self, prefix: str) -> list[dict[str, Any]]:
        """Every unexpired document whose key starts with ``prefix``, in key order."""
        pattern = _glob_escape(self.doc_key(prefix)) + "*"

        def run() -> list[Any]:
            client = self._client()
            keys = sorted(set(client.scan_iter(match=pattern, count=1000)))
            values: list[Any] = []
            for i in range(0, len(keys), SCAN_BATCH):
                values.extend(client.mget(keys[i : i + SCAN_BATCH]))
            return values

        values = self._retrying("scan documents", run)
        # A document that expired between SCAN and MGET reads as None: it is gone.
        return [_loads(raw, f"a document under {prefix!r}") for raw in values if raw is not None]

    def delete(self, key: str) -> None:
        """Delete the document and the counter stored under ``key``. Idempotent."""
        keys = (self.doc_key(key), self.counter_key(key))
        self._retrying("delete the key", lambda: self._client().delete(*keys))

    # -- chords (Celery's join protocol; see the module docstring) -----------------------------

    def chord_start(self, group_id: str, size: int, *, ttl_s: float | None) -> None:
        """Celery's ``set_chord_size``: a chord sent again under the same id starts afresh."""
        claim_key, size_key, ttl_ms = self.chord_key(group_id, ".c"), self.chord_key(group_id, ".s"), _ttl_ms(ttl_s)

        def run() -> None:
            pipe = self._client().pipeline(transaction=True)
            pipe.delete(claim_key)
            pipe.set(size_key, size, px=ttl_ms or None)
            pipe.execute()

        self._retrying("start the chord", run)

    def chord_part_return(self, part: ChordPart, *, ttl_s: float | None) -> ChordJoin | None:
        gid = part.group_id
        keys = [*(self.chord_key(gid, suffix) for suffix in (".j", ".t", ".s", ".d", "")), self.chord_key(gid, ".c")]
        value = dump_json([1, part.task_id, part.state, part.result], f"chord result of task {part.task_id!r}")
        score = "+inf" if part.group_index is None else str(part.group_index)
        expires_s = 0 if ttl_s is None else max(1, int(ttl_s + 0.999))
        token = uuid.uuid4().hex
        args: list[str | int] = [part.task_id, value, score, expires_s, CHORD_CLAIM_S, token, part.size or 0]
        # Safe to retry: the task counts once (.d), and a claim already ours counts as taken.
        reply = self._retrying(
            "count the chord's header task", lambda: self._state_now().chord_part_script(keys=keys, args=args)
        )
        if int(reply[0]) != 1:
            return None
        parts = []
        for raw in reply[1]:
            _, task_id, state, result = _loads(raw, f"a header result of chord {gid!r}")
            parts.append((str(task_id), str(state), result))
        return ChordJoin(gid, parts, token)

    def chord_done(self, join: ChordJoin) -> None:
        keys = [self.chord_key(join.group_id, suffix) for suffix in (".c", ".j", ".t", ".s", ".d")]
        args: list[str | int] = [join.token, CHORD_DONE_S]
        self._retrying("close the chord", lambda: self._state_now().chord_cleanup_script(keys=keys, args=args))

    def chord_release(self, join: ChordJoin) -> None:
        keys, args = [self.chord_key(join.group_id, ".c")], [join.token]
        self._retrying("release the chord", lambda: self._state_now().chord_release_script(keys=keys, args=args))

    # -- keys ---------------------------------------------------------------------------------

    def task_key(self, task_id: str) -> str:
        return f"{self.key_prefix}{TASK_KEY_PREFIX}{task_id}"

    def doc_key(self, key: str) -> str:
        if key.startswith(GROUP_DOC_PREFIX):
            return f"{self.key_prefix}{CELERY_GROUP_KEY_PREFIX}{key.removeprefix(GROUP_DOC_PREFIX)}"
        return f"{self.key_prefix}{DOC_KEY_PREFIX}{key}"

    def chord_key(self, group_id: str, suffix: str) -> str:
        """Celery's ``get_key_for_group(group_id, suffix)``."""
        return f"{self.key_prefix}{CELERY_GROUP_KEY_PREFIX}{group_id}{suffix}"

    def counter_key(self, key: str) -> str:
        return f"{self.key_prefix}{COUNTER_KEY_PREFIX}{key}"

    # -- connections --------------------------------------------------------------------------

    def close(self) -> None:
        """Close this process's connections and stop its pub/sub thread; a later call reopens."""
        state = self._state
        if state is not None and state.pid != os.getpid():
            self._lock = threading.Lock()  # the parent's may have been held at fork time
        with self._lock:
            state, self._state = self._state, None
        if state is None:
            return
        if state.pid == os.getpid():
            state.close()
        else:
            _INHERITED.append(state)

    def _state_now(self) -> _ProcessState:
        state = self._state
        if state is not None and state.pid == os.getpid():
            return state
        if state is not None and state.pid != os.getpid():
            # Forked: the parent's lock may have been held at fork time.
            self._lock = threading.Lock()
        with self._lock:
            state = self._state
            if state is None or state.pid != os.getpid():
                if state is not None:
                    _INHERITED.append(state)
                state = self._state = _ProcessState(self.url, self._pool_kwargs, f"redis {mask_url(self.url)}")
        return state

    def _client(self) -> redis.Redis:
        return self._state_now().client

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        where = f"redis result backend {mask_url(self.url)}"
        try:
            yield
        except (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError) as exc:
            msg = f"cannot {action} on {where}: {exc}; check the user and password in the URL"
            raise BackendError(msg) from exc
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            msg = f"cannot {action} on {where}: {str(exc).rstrip('.')}; is Redis running and reachable at that address?"
            raise _ConnectionLost(msg) from exc
        except redis.exceptions.RedisError as exc:
            msg = f"cannot {action} on {where}: {type(exc).__name__}: {exc}"
            raise BackendError(msg) from exc

    def _retrying(self, action: str, operation: Callable[[], _T]) -> _T:
        """Run an idempotent ``operation``, retrying a lost connection until ``retry_s`` ends."""
        deadline = time.monotonic() + self.retry_s
        pause_s = RETRY_MIN_S
        attempt = 0
        while True:
            attempt += 1
            try:
                with self._errors(action):
                    return operation()
            except _ConnectionLost as exc:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    msg = f"{exc} (gave up after {attempt} attempt(s) over {self.retry_s:g}s)"
                    raise BackendError(msg) from exc.__cause__
                if attempt == 1:
                    log.warning("%s; retrying for up to %gs", exc, self.retry_s)
                time.sleep(min(pause_s, remaining_s))
                pause_s = min(pause_s * 2, RETRY_MAX_S)


class _ConnectionLost(BackendError):
    """Redis could not be reached; the operation may succeed when retried."""


def _seconds(options: dict[str, Any], name: str, default: float) -> float:
    value = options.pop(name, default)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    # A socket timeout of 0 would make redis-py's sockets non-blocking.
    if not is_number or value < 0 or (value == 0 and name.startswith("socket")):
        msg = f"backend_options {name} must be a number of seconds (above 0 for socket timeouts), got {value!r}"
        raise ConfigurationError(msg)
    return float(value)


def _ttl_ms(ttl_s: float | None) -> int:
    """Milliseconds for PX/PEXPIRE (0: no expiry); at least 1, since PX 0 is an error."""
    return 0 if ttl_s is None else max(1, round(ttl_s * 1000))


def _loads(raw: bytes | str, what: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        msg = f"{what} in Redis is not JSON ({exc}); first bytes: {raw[:60]!r}"
        raise BackendError(msg) from exc


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis glob pattern (SCAN MATCH)."""
    return "".join("\\" + ch if ch in "\\*?[]" else ch for ch in text)
