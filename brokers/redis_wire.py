"""Talking to Redis without redis-py's per-command machinery: shared by the Redis broker
(brokers/redis.py) and the Redis result backend (backends/redis.py).

``Redis.execute_command`` takes a connection from the pool and gives it back (a poll of the
socket, events, metrics), packs the command and wraps it in retries: more client time than a
GET or an LPUSH costs Redis. On a worker's hot path (receive, store a result, read the
revocations version, ack) that was a third of the time per task. Here a command is packed
by hand (RESP) and written on a connection kept out of the pool (:class:`DirectLane`), and
the callers handle retries themselves, where they know what is safe to repeat.
"""

from __future__ import annotations

import inspect
import threading
import time
from typing import Any, Protocol, cast
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
import redis.sentinel

#: Seconds a connection may sit unused before it is checked (as redis-py's pool does) first.
IDLE_CHECK_S = 1.0
#: The scheme of a Redis found through Sentinel, and a Sentinel's default port.
SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
#: Query options of a Sentinel URL meant for the Sentinels themselves, not for Redis.
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")


class RawConnection(Protocol):
    """The part of redis-py's (untyped) ``Connection`` used to talk to Redis directly."""

    def send_packed_command(self, command: list[bytes]) -> None: ...
    def read_response(self) -> Any: ...
    def can_read(self) -> bool: ...
    def connect(self) -> None: ...
    def disconnect(self) -> None: ...


def _get_connection_args() -> tuple[str, ...]:
    """What ``ConnectionPool.get_connection`` needs: a command name before redis-py 5.3, and
    nothing since (an argument then only earns a DeprecationWarning)."""
    parameter = inspect.signature(redis.ConnectionPool.get_connection).parameters.get("command_name")
    return ("EVALSHA",) if parameter is not None and parameter.default is inspect.Parameter.empty else ()


GET_CONNECTION_ARGS = _get_connection_args()


def resp(*args: bytes | str | int) -> bytes:
    """One command in Redis's wire format (RESP)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        out += (b"$%d\r\n" % len(raw), raw, b"\r\n")
    return b"".join(out)


def check(conn: RawConnection) -> None:
    """What redis-py's pool does to a connection it hands out: one that Redis closed (it
    restarted, or dropped an idle client) is replaced before a command goes out on it, since
    a command whose reply is lost cannot be safely repeated."""
    try:
        stale = conn.can_read()  # an idle connection has nothing to read but an EOF
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
        stale = True
    if stale:
        conn.disconnect()
        conn.connect()


def exchange(conn: RawConnection, packed: bytes, replies: int) -> list[Any]:
    """Write ``packed`` on ``conn`` and read ``replies`` replies: one round trip.

    An error reply comes back in the list as its exception, so that the other replies are
    still read off the socket; a lost connection raises (and the socket is dropped: a reply
    may be half read).
    """
    try:
        conn.send_packed_command([packed])  # a list: redis-py iterates over it
        results: list[Any] = []
        for _ in range(replies):
            try:
                results.append(conn.read_response())
            except redis.exceptions.ResponseError as exc:
                results.append(exc)
        return results
    except BaseException:
        conn.disconnect()
        raise


class DirectLane:
    """One connection kept out of ``pool`` for whichever thread finds it free; a thread that
    finds it busy uses a pooled one. Connected on first use; fork-unaware (the owner makes a
    new one in a forked child)."""

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self.pool = pool
        self._own = cast(RawConnection, pool.make_connection())
        self._own_lock = threading.Lock()
        self._own_used = 0.0  # time.monotonic() of its last use

    def send(self, packed: bytes, replies: int) -> list[Any]:
        """:func:`exchange` on the kept connection, or on a pooled one while it is busy."""
        if self._own_lock.acquire(blocking=False):
            try:
                now = time.monotonic()
                if now - self._own_used > IDLE_CHECK_S:
                    check(self._own)
                self._own_used = now
                return exchange(self._own, packed, replies)
            finally:
                self._own_lock.release()
        return self.send_pooled(packed, replies)

    def send_pooled(self, packed: bytes, replies: int) -> list[Any]:
        """:func:`exchange` on a connection of the pool (for a command that blocks: the kept
        one stays free for others meanwhile)."""
        pool = self.pool
        pooled = pool.get_connection(*GET_CONNECTION_ARGS)
        try:
            return exchange(cast(RawConnection, pooled), packed, replies)
        finally:
            pool.release(pooled)

    def close(self) -> None:
        with self._own_lock:
            self._own.disconnect()


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() == SENTINEL_SCHEME


def connection_pool(url: str, **kwargs: Any) -> redis.ConnectionPool:
    """redis-py's pool for ``url``: ``redis://``/``rediss://``/``unix://`` as redis-py reads
    them, or a Redis found through Sentinel::

        redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db][?options]

    The hosts are the Sentinels (port 26379 unless given); the user and password, the
    database and the options are the Redis server's, except ``sentinel_username`` and
    ``sentinel_password`` (for Sentinels that require them). Every connection asks the
    Sentinels for the current master when it connects, and one to a master that was demoted
    fails (READONLY becomes a connection error), so callers reconnect to the new one as after
    any lost connection. Raises ValueError for a malformed URL.
    """
    if not is_sentinel_url(url):
        return redis.ConnectionPool.from_url(url, **kwargs)
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    sentinels = [_host_port(member) for member in hosts.split(",")]
    service, _, db = parts.path.strip("/").partition("/")
    if not service or "/" in db:
        msg = "expected redis+sentinel://host[:port][,host[:port]...]/service_name[/db]"
        raise ValueError(msg)
    query = dict(parse_qsl(parts.query))
    sentinel_kwargs = {name[len("sentinel_") :]: query.pop(name) for name in _SENTINEL_OPTIONS if name in query}
    credentials = parts.netloc.rpartition("@")[0]
    # redis-py parses the Redis part (user, password, db, typed options) from an equivalent URL.
    plain = f"redis://{credentials + '@' if credentials else ''}sentinel/{db or 0}?{urlencode(query)}"
    # The URL's options win over the caller's defaults, as in redis-py's from_url.
    options = {**kwargs, **redis.connection.parse_url(plain)}  # type: ignore[no-untyped-call]
    options.pop("host", None)
    options.pop("port", None)
    for name in ("socket_timeout", "socket_connect_timeout", "retry"):
        if name in options:  # a Sentinel that does not answer must not hang the caller either
            sentinel_kwargs.setdefault(name, options[name])
    manager = redis.sentinel.Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    return redis.sentinel.SentinelConnectionPool(service, manager, **options)  # type: ignore[no-untyped-call]


def _host_port(member: str) -> tuple[str, int]:
    host, _, port = member.strip().rpartition(":") if ":" in member else (member.strip(), "", "")
    if not host:
        msg = f"a Sentinel host is missing in {member!r}"
        raise ValueError(msg)
    try:
        return host, int(port) if port else SENTINEL_PORT
    except ValueError:
        msg = f"bad Sentinel port in {member!r}"
        raise ValueError(msg) from None
