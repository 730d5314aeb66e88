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

import redis

#: Seconds a connection may sit unused before it is checked (as redis-py's pool does) first.
IDLE_CHECK_S = 1.0


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
