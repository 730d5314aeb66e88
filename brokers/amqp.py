"""RabbitMQ broker (AMQP 0-9-1 through pika), laid out as Celery lays out its queues.

Connection string
=================

.. code-block::

    amqp://user:password@host:5672/vhost
    amqp://guest:guest@localhost:5672//        the vhost "/" (Celery's spelling)
    amqp://guest:guest@localhost:5672/%2F      the vhost "/" too
    amqps://user:password@host:5671/vhost      TLS with the system's default CA store
    amqp://host/vhost?heartbeat=30&socket_timeout=5&max_priority=9

Query parameters are pika's (``heartbeat``, ``socket_timeout``, ``blocked_connection_timeout``,
``connection_attempts``, ``ssl_options``, ...) plus this adapter's options, which
``broker_options`` may also set (``broker_options`` wins):

* ``max_priority``: 1-255; declares each queue with ``x-max-priority`` so priority orders
  delivery (``supports_priority`` is true when it is 9 or more: taskframe's 0-9 map to AMQP's
  0-9, 9 most urgent on both). Without it a priority is sent but ignored, as RabbitMQ does.
* ``queue_type``: ``"classic"`` (default) or ``"quorum"`` (replicated; RabbitMQ then counts
  deliveries itself in ``x-delivery-count``; no priorities on RabbitMQ 3.x).

Topology (Celery wire compatibility)
====================================
For a queue ``Q``: a durable direct exchange ``Q`` and a durable queue ``Q`` bound with routing
key ``Q``, with no queue arguments unless an option asks for them, as Celery declares them,
so Celery and taskframe producers and workers can share queues. Messages are protocol v2:
Celery's headers as AMQP headers, ``correlation_id`` = task id, ``priority``,
``content_type``/``content_encoding`` from the envelope, ``delivery_mode=2`` (persistent).
A float header (a ``timelimit`` of 2.5) travels as an AMQP double, as Celery writes it
(pika itself writes none: this module adds the encoding). Publishing declares what it needs first
(cached per connection), so a message sent before any worker starts is kept. Everything
else lives in separate objects:

* ``Q.dead``: the dead letters (a plain durable queue, whatever ``queue_type``), with ``x-taskframe-reason``,
  ``x-taskframe-deliveries`` and ``x-taskframe-dead-at`` headers.
* ``Q.delay.<2^k>ms``: the delay queues (below); exchanges ``taskframe.delay.<2^k>ms`` and
  ``taskframe.delay.deliver`` are shared by every queue of the vhost.

Delays without a plugin
=======================
RabbitMQ holds ``countdown``/``eta`` with per-queue TTLs and dead-letter routing, no delayed
message exchange needed. Delays are whole milliseconds up to 2^32-1 (49.7 days; longer
ones are capped, and the worker sends a message back when it arrives before its ``eta``).
Level ``k`` (0-31) is a queue ``Q.delay.<2^k>ms`` with ``x-message-ttl`` = 2^k ms. A message
delayed by ``d`` ms waits in the level of every 1-bit of ``d``, highest first, and nowhere
else: its routing key spells the 32 bits of ``d`` (then a hash of ``Q``), each level's topic
exchange routes a 1 at its bit into the level queue and a 0 on to the next lower level's
exchange, and a level queue dead-letters to the next lower level's exchange, so the hops are
the broker's, not a worker's. Level 0 passes on to ``taskframe.delay.deliver``, which routes
to ``Q``. Every message of a level queue has the same TTL, so they expire in arrival order:
a short delay is never stuck behind a long one. ``stats().delayed`` counts the level queues.
Gap: RabbitMQ dead-letters classic queues at most once, so a message moving between two
levels when the broker crashes can be lost (a clean restart loses nothing: all persistent).
With ``queue_type=quorum`` the level queues are quorum queues that dead-letter at least
once (``x-dead-letter-strategy``, RabbitMQ 3.10+): a crash can deliver a delayed message
twice, not lose it. A level queue that exists with other arguments (an earlier version's)
is used as it is, with a warning.

Consuming, leases and who drives the connection
================================================
pika is not thread-safe, so each broker object owns one connection in each process that uses
it, held by one thread at a time (``_Link``): a receive, an ack or a publish takes the
connection, does its work on the caller's own thread and gives it back, so it costs its
network round trip and no thread hop. An ack never waits: when another thread holds the
connection, the holder sends it before letting go. A holder that only waits for events (an
idle consumer waiting for a message) lets other threads in: a thread that wants the
connection pokes it (``add_callback_threadsafe``) and the listener yields at once. A keeper
thread (``taskframe-amqp``) drives the connection whenever nobody else has for ``TICK_S``:
heartbeats keep flowing while a ``solo`` worker runs a 10-minute task and calls nothing, and
leases that ran out are handed back. A forked child never touches its parent's socket or
thread: it opens its own on first use.

``receive`` pulls with ``basic.get``, so a batch holds every ready message up to
``max_messages``, most urgent first across queues, queues in order on ties, exactly as the
contract says (a pushed prefetch buffer would reorder, hold messages nobody asked for, and
hide them from ``stats().ready``). The gets are pipelined (``_Getter``): a consumer of one
queue sends ``max_messages`` gets at once, in one write, and RabbitMQ answers them in
order, so a batch costs one round trip, not one per message; a consumer of several queues asks each queue
for one candidate at once, then one get per message taken (the most urgent candidate).
The worker's ``max_messages`` (free slots + ``worker_prefetch``) bounds what it holds;
``basic.qos`` does not apply to ``basic.get``. When nothing is ready the consumer listens:
it registers a consumer (``basic.consume``) on each of its queues with a prefetch of one,
and RabbitMQ pushes the next message the moment it arrives. That is the fast way to an idle
worker: a classic queue answers a ``basic.get`` for a fresh persistent message only once it
has written it to disk (~0.3-0.5 ms here), while it pushes it to a waiting consumer before.
A pushed message is returned alone (a get for the rest of a batch would wait for that
write); the next receive gets the rest. The listeners live only while the consumer waits:
one queue's listener, holding its one message, is sent nothing more and is cancelled without
a wait; the listeners of several queues, and any listener when the wait times out, are
cancelled and waited for (Basic.CancelOk), so a message sent meanwhile is taken by this
receive, not held by nobody, and a receive that returns holds nothing it did not return
(besides one candidate per queue, as above). ``basic.cancel`` is written directly: pika's
own rejects what arrives before the CancelOk, which would come back marked redelivered and
count as a delivery.

``ack_many`` acks a finished batch with one ``basic.ack(multiple=True)`` when no other
delivery of the channel below the highest tag is still held, else one ack per delivery;
``ack_and_receive`` (what a worker calls between batches) writes those ack frames and the
next gets in one write.

Speed (issue #6; one 2-core host shared with other jobs, so figures vary by 2x between runs;
see docs/brokers/rabbitmq.md): in one process, receive+ack of batches of 5 went from
~2,300 to ~4,500-7,000 a second. An idle consumer in another process has a new message
~0.47 ms after the publish call began (it was ~4 ms with a polling get, then ~0.95 ms with
a wake-up queue that was sent a copy and a get after it). Driving the connection from the
caller's thread instead of a dedicated I/O thread (a hop there and back per call) took an
in-process solo worker's drain from ~3,600 to ~4,200 tasks a second. A one-call ``publish``
(~1,100-1,600 a second here, as raw pika with the same headers) is bound by RabbitMQ's
confirm of a persistent message, which waits for its disk write. ``publish_many`` pipelines confirms.
Header tables are read by ``_decode_table_fast`` (patched into pika.data), 2.5x pika's
own reader on a task message's ~20 headers (19.5 us -> 7.8 us a message).

Leases. In AMQP an unacked message returns to its queue when its channel or connection
closes: a dead worker's messages come back at once (faster than ``visibility_timeout``).
On top of that this adapter keeps the taskframe lease: a delivery that is neither acked nor
renewed for ``visibility_timeout`` seconds is handed back (a copy with its count raised is
published, then the original acked), so one stuck consumer cannot hold a message forever.
``renew`` only moves a deadline in memory: no network call. Gap: a late ack after such a
hand-back cannot delete the copy, which then runs again (the task ran twice).

RabbitMQ closes a channel whose oldest unacked delivery is older than ``consumer_timeout``
(default 30 minutes) and redelivers its messages, whatever the lease. Tasks that may run
longer need it raised in rabbitmq.conf (``consumer_timeout = 21600000`` for 6 hours) or, on
RabbitMQ 3.12+, per queue with a ``consumer-timeout`` policy; this adapter sets no
``x-consumer-timeout`` argument, which would break Celery's declarations. When it happens the
worker logs it and reconnects.

Delivery counting and dead letters
==================================
A classic queue only says ``redelivered`` (delivered at least once before). The count
travels in a header, ``x-taskframe-deliveries``: a nack with requeue, or a lease that ran
out, publishes a copy with the count raised (confirmed) and acks the original. A message
that comes back ``redelivered`` (its worker's connection died, e.g. it crashed the worker)
is republished at the tail with its count raised before it runs again, so a task that keeps
killing its worker stops after ``max_deliveries``. Quorum queues use ``x-delivery-count``.
A message whose count reached ``max_deliveries``, or nacked without requeue, goes to
``Q.dead``. ``dead_letters`` browses with ``basic.get`` and then closes its channel, which
puts them all back in order (cost: one round trip per listed message).

Stats: ``ready`` and ``dead`` are RabbitMQ's ready counts (passive declares); ``delayed`` sums
the 32 level queues. A passive declare of a missing queue closes its channel, so
``_Link.counts`` asks each queue on a channel of its own, all opened, asked and closed at
once: ``stats`` costs about three round trips instead of ~35 (measured ~20 ms instead of
~40 on the shared host: RabbitMQ's work per channel remains). ``reserved`` counts only what
this process's consumers hold: AMQP does not report unacked messages (the management API
would; it is not used).

Delivery guarantee
==================
At least once. Publishes wait for publisher confirms (``CONFIRM_TIMEOUT_S``) and retry on a
lost connection (``PUBLISH_ATTEMPTS``), so a publish that returns is stored; one that raised
after a lost confirm may still have been stored (a duplicate, never a loss). A lost
connection is reopened on next use, with the topology declared again; ``receive`` reports
it once with ``BrokerConnectionError`` (the worker then opens a new consumer), and the
deliveries it held are back in their queues.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import decimal
import functools
import hashlib
import logging
import math
import os
import re
import socket
import struct
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, urlencode

import pika
import pika.data
import pika.exceptions
import pika.frame

from taskframe.broker import (
    DEFAULT_PRIORITY,
    MAX_PRIORITY,
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
    MessageTooLarge,
)
from taskframe.settings import mask_url

if TYPE_CHECKING:
    from taskframe.broker import Broker, Consumer
    from taskframe.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a publish waits for RabbitMQ's confirm before raising BrokerError.
CONFIRM_TIMEOUT_S = 30.0
#: Attempts of one publish when the connection is lost, and the pauses (seconds) between them.
PUBLISH_ATTEMPTS = 3
PUBLISH_PAUSES_S = (0.5, 1.5)
#: Seconds one connection attempt may take (pika's socket_timeout, unless the URL sets it).
CONNECT_TIMEOUT_S = 5.0
#: Seconds a call waits for the connection (held by another thread) before raising BrokerError.
CALL_TIMEOUT_S = 120.0
#: Longest time (seconds) nobody drives the connection: the keeper's tick (heartbeats, leases).
TICK_S = 1.0
#: Delay levels: level k holds a message 2**k milliseconds; together up to 2**32-1 ms.
DELAY_LEVELS = 32
MAX_DELAY_MS = 2**DELAY_LEVELS - 1
#: Messages moved per confirm round trip by requeue_dead.
REQUEUE_BATCH = 200

HEADER_DELIVERIES = "x-taskframe-deliveries"
HEADER_PROPERTIES = "x-taskframe-properties"
HEADER_REASON = "x-taskframe-reason"
HEADER_DEAD_AT = "x-taskframe-dead-at"
HEADER_DEAD_ID = "x-taskframe-dead-id"
#: Headers RabbitMQ adds on its own (dead-lettering, quorum counts): never part of an envelope,
#: and never copied into a republished message (RabbitMQ would take a delay for a cycle).
BROKER_HEADERS = frozenset(
    {
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        "x-delivery-count",
    }
)
#: AMQP properties carried over from an envelope's properties when set.
PASSED_PROPERTIES = ("reply_to", "message_id", "type", "app_id", "timestamp")
DELIVER_EXCHANGE = "taskframe.delay.deliver"
OPTIONS = ("max_priority", "queue_type")

_TOO_LARGE = re.compile(r"message size (\d+) is larger than configured max size (\d+)")


def check_queue_name(queue: str) -> str:
    if not isinstance(queue, str) or not queue:
        msg = f"a queue name must be a non-empty string; got {queue!r}"
        raise ValueError(msg)
    if queue.startswith("amq."):
        msg = f"queue name {queue!r} is reserved by RabbitMQ (names starting 'amq.'); choose another"
        raise ValueError(msg)
    if len(queue.encode()) > 200:
        msg = f"queue name {queue[:40]!r}... is over 200 bytes; RabbitMQ allows 255 including '.delay.<n>ms'"
        raise ValueError(msg)
    return queue


# -- options and URL ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    max_priority: int | None = None
    queue_type: str = "classic"

    @property
    def queue_arguments(self) -> dict[str, Any]:
        arguments: dict[str, Any] = {}
        if self.max_priority:
            arguments["x-max-priority"] = self.max_priority
        if self.queue_type == "quorum":
            arguments["x-queue-type"] = "quorum"
        return arguments

    def level_queue_arguments(self, level: int) -> dict[str, Any]:
        """Delay level ``level``: its TTL, and where its messages go when it ends."""
        arguments: dict[str, Any] = {"x-message-ttl": 2**level, "x-dead-letter-exchange": _level_exchange(level - 1)}
        if self.queue_type == "quorum":
            # Replicated too, and a message moves on at least once: RabbitMQ keeps it in this
            # level until the next one has confirmed it (classic queues move it at most once).
            arguments |= {
                "x-queue-type": "quorum",
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            }
        return arguments


def _split_url(url: str, conf: Settings) -> tuple[str, _Options]:
    """The URL for pika, and this adapter's options from the query and ``broker_options``."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("amqp", "amqps"):
        msg = f"not an AMQP URL: {mask_url(url)!r}; expected 'amqp://user:password@host:5672/vhost'"
        raise ConfigurationError(msg)
    base, _, query = rest.partition("?")
    authority, slash, path = base.partition("/")
    if path == "/":  # Celery's "//" means the vhost "/"; pika would read an empty name
        path = "%2F"
    kept, ours = [], {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in OPTIONS:
            ours[key] = value
        else:
            kept.append((key, value))
    raw: dict[str, Any] = {**ours, **conf.broker_options}
    unknown = sorted(set(raw) - set(OPTIONS))
    if unknown:
        msg = f"unknown amqp broker option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}"
        raise ConfigurationError(msg)
    options = _Options(
        max_priority=_max_priority(raw.get("max_priority")),
        queue_type=str(raw.get("queue_type") or "classic"),
    )
    if options.queue_type not in ("classic", "quorum"):
        msg = f"amqp queue_type must be 'classic' or 'quorum'; got {options.queue_type!r}"
        raise ConfigurationError(msg)
    if options.queue_type == "quorum" and options.max_priority:
        msg = "amqp: quorum queues have no x-max-priority on RabbitMQ 3.x; drop max_priority or use classic queues"
        raise ConfigurationError(msg)
    pika_url = f"{scheme}://{authority}{slash}{path}" + (f"?{urlencode(kept)}" if kept else "")
    return pika_url, options


def _max_priority(value: Any) -> int | None:
    if value in (None, "", 0, "0"):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if not 1 <= number <= 255:
        msg = f"amqp max_priority must be an integer from 1 to 255 (9 covers taskframe's 0-9); got {value!r}"
        raise ConfigurationError(msg)
    return number


def _parameters(pika_url: str, url: str) -> Any:
    try:
        params = pika.URLParameters(pika_url)
    except (ValueError, TypeError, KeyError) as exc:
        msg = f"bad amqp URL {mask_url(url)!r}: {exc}"
        raise ConfigurationError(msg) from None
    query = dict(parse_qsl(pika_url.partition("?")[2]))
    if "socket_timeout" not in query:
        params.socket_timeout = CONNECT_TIMEOUT_S
    if "blocked_connection_timeout" not in query:
        # A broker under a memory or disk alarm blocks publishers; fail instead of hanging.
        params.blocked_connection_timeout = CONFIRM_TIMEOUT_S
    params.client_properties = {"connection_name": f"taskframe {os.getpid()}@{socket.gethostname()}"}
    return params


# -- names and the delay layout -------------------------------------------------------------------


def _dead_queue(queue: str) -> str:
    return f"{queue}.dead"


def _level_queue(queue: str, level: int) -> str:
    return f"{queue}.delay.{2**level}ms"


def _level_queues(queue: str) -> list[str]:
    return [_level_queue(queue, level) for level in range(DELAY_LEVELS)]


def _level_exchange(level: int) -> str:
    return f"taskframe.delay.{2**level}ms" if level >= 0 else DELIVER_EXCHANGE


def _token(queue: str) -> str:
    """One routing-key word naming ``queue`` (queue names may hold dots, '*' or '#')."""
    return hashlib.sha256(queue.encode()).hexdigest()[:20]


def _bits(delay_ms: int) -> list[str]:
    """The delay as 32 words, most significant bit first."""
    return [str((delay_ms >> level) & 1) for level in range(DELAY_LEVELS - 1, -1, -1)]


def _pattern(queue_token: str, level: int, bit: str) -> str:
    words = ["*"] * DELAY_LEVELS
    if level >= 0:
        words[DELAY_LEVELS - 1 - level] = bit
    return ".".join([*words, queue_token])


def _levels_of(delay_ms: int) -> list[int]:
    return [level for level in range(DELAY_LEVELS) if delay_ms >> level & 1]


# -- envelopes <-> AMQP messages -------------------------------------------------------------------


def _properties_from(props: Any) -> dict[str, Any]:
    """The envelope properties an AMQP message implies (reply_to always, others when set)."""
    out: dict[str, Any] = {}
    for name in ("correlation_id", "reply_to", "priority", "delivery_mode", *PASSED_PROPERTIES[1:]):
        value = getattr(props, name, None)
        if value is not None or name == "reply_to":
            out[name] = value
    return out


_pika_encode_value = pika.data.encode_value


def _encode_value_with_doubles(pieces: list[bytes], value: Any) -> int:
    """pika's table encoder, plus floats as AMQP doubles (``d``), which pika itself does not
    write; RabbitMQ and py-amqp (Celery's transport) read them as floats."""
    if isinstance(value, float):
        pieces.append(b"d" + struct.pack(">d", value))
        return 9
    return int(_pika_encode_value(pieces, value))


_pika_decode_value = pika.data.decode_value


def _decode_value_with_doubles(encoded: bytes, offset: int) -> tuple[Any, int]:
    """pika's table decoder, but an AMQP double or float (``d``/``f``) read as a float: pika 1.x
    truncates both to an integer, which would turn a Celery ``timelimit`` of 2.5 into 2."""
    kind = encoded[offset : offset + 1]
    if kind == b"d":
        return struct.unpack_from(">d", encoded, offset + 1)[0], offset + 9
    if kind == b"f":
        return struct.unpack_from(">f", encoded, offset + 1)[0], offset + 5
    value, end = _pika_decode_value(encoded, offset)
    return value, int(end)


_unpack_uint = struct.Struct(">I").unpack_from
_unpack_int = struct.Struct(">i").unpack_from
_unpack_longlong = struct.Struct(">q").unpack_from


def _decode_table_fast(encoded: bytes, offset: int) -> tuple[dict[Any, Any], int]:
    """pika's table decoder with the kinds a task message's headers use (long strings, ints,
    void, booleans, arrays, tables) decoded inline: the headers of every delivery pass
    here, and pika's one-call-per-value reading was about a fifth
    of a drained message's CPU time. Other kinds go to ``_decode_value_with_doubles``."""
    result: dict[Any, Any] = {}
    limit = offset + 4 + _unpack_uint(encoded, offset)[0]
    offset += 4
    while offset < limit:
        length = encoded[offset]
        raw = encoded[offset + 1 : offset + 1 + length]
        offset += 1 + length
        try:
            key: Any = raw.decode("utf8")
        except UnicodeDecodeError:
            key = raw
        result[key], offset = _decode_value_fast(encoded, offset)
    return result, offset


def _decode_value_fast(encoded: bytes, offset: int) -> tuple[Any, int]:
    kind = encoded[offset]
    if kind == 0x53:  # S: long string, text when it is UTF-8 (as pika reads it)
        end = offset + 5 + _unpack_uint(encoded, offset + 1)[0]
        raw = encoded[offset + 5 : end]
        try:
            return raw.decode("utf8"), end
        except UnicodeDecodeError:
            return raw, end
    if kind == 0x56:  # V: void
        return None, offset + 1
    if kind == 0x49:  # I: signed 32-bit
        return _unpack_int(encoded, offset + 1)[0], offset + 5
    if kind == 0x6C:  # l: signed 64-bit
        return _unpack_longlong(encoded, offset + 1)[0], offset + 9
    if kind == 0x74:  # t: boolean
        return bool(encoded[offset + 1]), offset + 2
    if kind == 0x41:  # A: array
        end = offset + 5 + _unpack_uint(encoded, offset + 1)[0]
        offset += 5
        values = []
        while offset < end:
            value, offset = _decode_value_fast(encoded, offset)
            values.append(value)
        return values, offset
    if kind == 0x46:  # F: table
        return _decode_table_fast(encoded, offset + 1)
    return _decode_value_with_doubles(encoded, offset)


# pika.data.encode_table / decode_table look encode_value / decode_value up by name, and
# pika.spec looks decode_table up by name, for every table this process writes or reads;
# patched once, when this adapter is imported.
pika.data.encode_value = _encode_value_with_doubles
pika.data.decode_value = _decode_value_with_doubles
pika.data.decode_table = _decode_table_fast


def _to_table_value(value: Any) -> Any:
    """``value`` in a form pika can write into an AMQP table: a float is written as a double
    (above), so a Celery worker reads a ``timelimit`` of 2.5 as the float 2.5."""
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): _to_table_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_table_value(v) for v in value]
    return value


#: Types a decoded table value has that need no conversion (checked first: most headers).
_PLAIN_TYPES = frozenset({str, int, bool, float, bytes, type(None)})


def _from_table_value(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, dict):
        return {k: _from_table_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_table_value(v) for v in value]
    return value


def _to_amqp(envelope: Envelope, priority: int, extra_headers: Mapping[str, Any]) -> Any:
    """pika BasicProperties for ``envelope``; its own properties travel in a header only when
    the AMQP properties cannot say them (never for the messages an App sends)."""
    basic: dict[str, Any] = {
        "content_type": envelope.content_type,
        "content_encoding": envelope.content_encoding,
        "delivery_mode": 2,
        "priority": priority,
    }
    if envelope.task_id:
        basic["correlation_id"] = envelope.task_id
    for name in PASSED_PROPERTIES:
        value = envelope.properties.get(name)
        if value is not None:
            basic[name] = int(value) if name == "timestamp" else str(value)
    headers = {k: _to_table_value(v) for k, v in envelope.headers.items() if k not in BROKER_HEADERS}
    headers.update(extra_headers)
    props = pika.BasicProperties(**basic)
    if _properties_from(props) != dict(envelope.properties):
        headers[HEADER_PROPERTIES] = _to_table_value(dict(envelope.properties))
    props.headers = headers
    return props


def _from_amqp(props: Any, body: bytes) -> tuple[Envelope, dict[str, Any]]:
    """The envelope of a received message, and the adapter's own ``x-taskframe-*`` headers."""
    headers = {k: v if type(v) in _PLAIN_TYPES else _from_table_value(v) for k, v in (props.headers or {}).items()}
    ours = {k: headers.pop(k) for k in list(headers) if k.startswith("x-taskframe-")}
    for name in BROKER_HEADERS & headers.keys():
        ours[name] = headers.pop(name)
    carried = ours.get(HEADER_PROPERTIES)
    properties = dict(carried) if isinstance(carried, dict) else _properties_from(props)
    envelope = Envelope(
        body=bytes(body),
        headers=headers,
        properties=properties,
        content_type=props.content_type or "application/json",
        content_encoding=props.content_encoding or "utf-8",
    )
    return envelope, ours


def _describe(exc: BaseException) -> str:
    name, text = type(exc).__name__, str(exc) or repr(exc)
    return text if text.startswith(name) else f"{name}: {text}"


@dataclass
class _Outgoing:
    """One message ready for basic.publish, and what must be declared before it."""

    queue: str
    properties: Any
    body: bytes
    delay_ms: int = 0

    @property
    def exchange(self) -> str:
        return _level_exchange(self.delay_ms.bit_length() - 1) if self.delay_ms else self.queue

    @property
    def routing_key(self) -> str:
        if not self.delay_ms:
            return self.queue
        return ".".join([*_bits(self.delay_ms), _token(self.queue)])

    def prepare(self, link: _Link) -> None:
        """Declare what this message is routed through (cached per connection)."""
        link.declare(self.queue)
        if self.delay_ms:
            link.declare_delay(self.queue, self.delay_ms)


def _delay_ms(delay_s: float) -> int:
    if not delay_s or delay_s <= 0:
        return 0
    delay_ms = int(round(delay_s * 1000))
    if delay_ms > MAX_DELAY_MS:
        log.warning("delay of %.0fs is over the AMQP maximum (49.7 days); capped", delay_s)
        delay_ms = MAX_DELAY_MS
    return delay_ms


# -- the connection and its holder ----------------------------------------------------------------

#: pika's own channels of this module's probes: a passive declare of a missing queue is how
#: a count of zero is asked, so the warning pika logs when RabbitMQ then closes the channel
#: is dropped for those channels only.
_PROBES: weakref.WeakSet[Any] = weakref.WeakSet()


class _QuietProbes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (len(args) == 3 and args[0] == 404 and any(args[2] is probe for probe in _PROBES))


logging.getLogger("pika.channel").addFilter(_QuietProbes())


def _noop() -> None:
    pass


class _Publisher:
    """A channel in confirm mode whose publishes are pipelined: a batch costs one round trip.

    pika's BlockingChannel waits for each confirm without a bound, so this drives the
    channel's underlying asynchronous object (``BlockingChannel._impl``, stable across pika
    1.x) and waits on the connection with a deadline instead.
    """

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.channel = link.connection.channel()
        self._impl = self.channel._impl
        self._seq = 0
        self._status: dict[int, bool | None] = {}
        self._returned: list[tuple[str, str, bytes, str]] = []
        self.closed_because: str | None = None
        selected: list[bool] = []
        self._impl.add_on_return_callback(self._on_return)
        self._impl.add_on_close_callback(self._on_close)

        def on_select_ok(_frame: Any) -> None:
            self._wake()
            selected.append(True)

        self._impl.confirm_delivery(ack_nack_callback=self._on_confirm, callback=on_select_ok)
        self.link.wait_for(
            lambda: bool(selected) or self.closed_because is not None, CONFIRM_TIMEOUT_S, "confirm.select"
        )
        if self.closed_because:
            raise BrokerError(self.closed_because)

    @property
    def is_open(self) -> bool:
        return self.closed_because is None and bool(self.channel.is_open)

    def _wake(self) -> None:
        self.link.wake_loop()

    def _on_confirm(self, frame: Any) -> None:
        self._wake()
        method = frame.method
        ok = isinstance(method, pika.spec.Basic.Ack)
        tags = [t for t in self._status if t <= method.delivery_tag] if method.multiple else [method.delivery_tag]
        for tag in tags:
            if self._status.get(tag, False) is None:
                self._status[tag] = ok

    def _on_return(self, _channel: Any, method: Any, _props: Any, body: bytes) -> None:
        self._wake()
        self._returned.append((method.exchange, method.routing_key, bytes(body), method.reply_text))

    def _on_close(self, _channel: Any, reason: BaseException) -> None:
        self._wake()
        self.closed_because = _describe(reason)

    def publish(self, messages: Sequence[_Outgoing]) -> list[tuple[_Outgoing, str]]:
        """Publish and wait for every confirm; return the messages RabbitMQ could not route."""
        self._returned.clear()
        tags = []
        for message in messages:
            self._impl.basic_publish(
                message.exchange, message.routing_key, message.body, message.properties, mandatory=True
            )
            self._seq += 1
            self._status[self._seq] = None
            tags.append(self._seq)

        def settled() -> bool:
            return self.closed_because is not None or all(self._status[t] is not None for t in tags)

        self.link.wait_for(settled, CONFIRM_TIMEOUT_S, f"the confirm of {len(tags)} message(s)")
        if self.closed_because is not None:
            self._raise_closed(messages)
        refused = sum(1 for t in tags if self._status.pop(t) is False)
        if refused:
            msg = (
                f"RabbitMQ at {mask_url(self.link.url)} refused {refused} of {len(tags)} message(s) (basic.nack):"
                " it could not store them (a full queue with overflow=reject-publish, or a broker fault); retry"
            )
            raise BrokerError(msg)
        unroutable = []
        for message in messages:
            for index, (exchange, key, body, text) in enumerate(self._returned):
                if (exchange, key, body) == (message.exchange, message.routing_key, message.body):
                    unroutable.append((message, text))
                    del self._returned[index]
                    break
        return unroutable

    def _raise_closed(self, messages: Sequence[_Outgoing]) -> None:
        reason = self.closed_because or "closed"
        match = _TOO_LARGE.search(reason)
        if match:
            raise MessageTooLarge(int(match.group(1)), int(match.group(2)), "RabbitMQ")
        queues = sorted({m.queue for m in messages})
        msg = f"RabbitMQ at {mask_url(self.link.url)} closed the channel while publishing to {queues}: {reason}"
        raise (_NotFound if "NOT_FOUND" in reason else BrokerError)(msg)


class _NotFound(BrokerError):
    """An exchange this connection had declared is gone (deleted behind its back)."""


class _Getter:
    """``basic.get`` pipelined on one channel: a batch of gets costs one round trip.

    pika allows one ``basic.get`` at a time per channel (BlockingChannel waits for each
    answer), so this writes the Basic.Get methods on the channel's asynchronous object
    (``BlockingChannel._impl``) and takes the answers itself. RabbitMQ answers the gets of
    one channel in the order asked, each with a message (Basic.GetOk) or Basic.GetEmpty, so
    a batch holds the first ready messages of its queues, in queue order, as single gets would.
    """

    def __init__(self, link: _Link, channel: Any) -> None:
        self.link = link
        self._impl = channel._impl
        self._answers: list[tuple[Any, Any, bytes] | None] = []
        self._expected = 0
        self._acks = b""  # marshaled Basic.Ack frames for the next write
        self._get_frames: dict[str, bytes] = {}  # a queue's marshaled Basic.Get (the same every time)
        # pika calls ``self._on_getok`` for every Basic.GetOk: an instance attribute takes it.
        self._impl._on_getok = self._on_getok
        # BlockingChannel's own Basic.GetEmpty handler expects one get at a time: replaced too
        # (so this channel's BlockingChannel.basic_get must not be used).
        number, empty = self._impl.channel_number, pika.spec.Basic.GetEmpty
        self._impl.callbacks.remove(number, empty, channel._basic_getempty_result.set_value_once)
        self._impl.callbacks.add(number, empty, self._on_getempty, False)

    def ack_later(self, tags: Sequence[int], *, multiple: bool) -> None:
        """Send these acks with the next gets (or ``flush``): one write for both."""
        number = self._impl.channel_number
        self._acks += b"".join(
            pika.frame.Method(number, pika.spec.Basic.Ack(delivery_tag=tag, multiple=multiple)).marshal()
            for tag in tags
        )

    def flush(self) -> None:
        """Write the acks still waiting for gets; dropped with a closed channel, whose
        deliveries RabbitMQ has taken back."""
        acks, self._acks = self._acks, b""
        if acks and self._impl.is_open:
            self.link.write_now(acks)

    def _on_getok(self, method_frame: Any, header_frame: Any, body: bytes) -> None:
        self._answer((method_frame.method, header_frame.properties, bytes(body)))

    def _on_getempty(self, _frame: Any) -> None:
        self._answer(None)

    def _answer(self, answer: tuple[Any, Any, bytes] | None) -> None:
        self._answers.append(answer)
        if len(self._answers) == self._expected:  # the whole batch is in: wait_for may return
            self.link.wake_loop()

    def get(self, queues: Sequence[str]) -> list[tuple[Any, Any, bytes] | None] | None:
        """One answer per queue of ``queues`` (None: it was empty); None when the channel closed
        meanwhile (what it got went back to the queues with it)."""
        self._answers = []
        self._expected = count = len(queues)
        if not self._impl.is_open:
            return None
        # One write for the whole batch: pika would make a send() call per frame.
        number = self._impl.channel_number
        frames = self._get_frames
        for queue in queues:
            if queue not in frames:
                frames[queue] = pika.frame.Method(number, pika.spec.Basic.Get(queue=queue, no_ack=False)).marshal()
        gets = b"".join([frames[queue] for queue in queues])
        acks, self._acks = self._acks, b""
        self._impl.connection._output_marshaled_frames([acks + gets])
        try:
            self.link.wait_for(
                lambda: len(self._answers) >= count or not self._impl.is_open, CONFIRM_TIMEOUT_S, "basic.get answers"
            )
        except BrokerError:
            # Late answers must not be taken for the next batch's: close the channel, which
            # also sends back what it got (the consumer reports the loss on its next call).
            if self._impl.is_open:
                self._impl.close()
            raise
        if not self._impl.is_open:
            return None
        answers, self._answers = self._answers, []
        return answers


class _Link:
    """One connection for one broker object in one process, driven by the thread that holds it.

    pika is not thread-safe, so the connection has one holder at a time: ``call`` takes it,
    runs the work on the caller's own thread and gives it back (no thread hop: a receive, an
    ack or a publish costs its network round trip, not two context switches). ``submit``
    runs work the same way when the connection is free and otherwise leaves it to the holder,
    who runs it before letting go, so an ack never waits. A holder that only waits for events
    (an idle consumer waiting for a message) lets waiting threads take a turn: they poke
    the connection (``add_callback_threadsafe``, its one thread-safe call) and it yields.
    The keeper thread (``taskframe-amqp``) drives the connection when nobody else does, at
    least every ``TICK_S`` (and at the next lease deadline): heartbeats flow while a ``solo``
    worker runs a 10-minute task and calls nothing, and leases that ran out are handed back.
    """

    def __init__(self, broker: AMQPBroker) -> None:
        self.url = broker.url
        self.params = broker._params
        self.options = broker.options
        self.pid = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None  # threading.get_ident() of the holder
        self._waiting = 0  # threads waiting to take the connection
        self._listening = False  # the holder only waits for events: poke it to let others in
        self._jobs: collections.deque[Callable[[], Any]] = collections.deque()
        self._closing = False
        self.closed = False
        # Everything below belongs to the holder.
        self.connection: Any = None
        self.generation = 0
        self.publisher: _Publisher | None = None
        self._admin: Any = None
        self._probe: Any = None
        self.declared: set[str] = set()
        self.consumers: dict[str, AMQPConsumer] = {}
        self._keeper = threading.Thread(target=self._keep, name="taskframe-amqp", daemon=True)
        self._keeper.start()

    # -- holding the connection (any thread) -----------------------------------------------------

    def call(self, fn: Callable[[], T], timeout_s: float = CALL_TIMEOUT_S) -> T:
        """Run ``fn`` holding the connection and return its result (or raise its error)."""
        if self._owner == threading.get_ident():
            return self._run(fn)
        self._take(timeout_s)
        try:
            return self._run(fn)
        finally:
            self._give_back()

    def submit(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` holding the connection, now if it is free, else before its holder lets go;
        never waits. Errors are the holder's to log, not the caller's."""
        with self._cond:
            self._check_open()
            self._jobs.append(fn)
            if self._owner is not None:
                if self._listening:
                    self._poke()
                return
            self._owner = threading.get_ident()
        self._give_back()

    def _take(self, timeout_s: float) -> None:
        with self._cond:
            self._check_open()
            if not self._wait_turn(timeout_s):
                msg = (
                    f"RabbitMQ at {mask_url(self.url)} did not answer within {timeout_s:g}s;"
                    " is it overloaded, or blocked by a memory or disk alarm (rabbitmqctl status)?"
                )
                raise BrokerError(msg)

    def _wait_turn(self, timeout_s: float) -> bool:
        """With the condition held: wait until nobody holds the connection (a listening holder
        is poked to let go), then hold it; False after ``timeout_s``."""
        self._waiting += 1
        try:
            if self._listening:
                self._poke()
            if not self._cond.wait_for(lambda: self._owner is None, timeout_s):
                return False
            self._owner = threading.get_ident()
            return True
        finally:
            self._waiting -= 1

    def _give_back(self) -> None:
        while True:
            with self._cond:
                if not self._jobs:
                    self._owner = None
                    self._listening = False
                    self._cond.notify_all()
                    return
                job = self._jobs.popleft()
            self._run_job(job)

    def _run_job(self, job: Callable[[], Any]) -> None:
        try:
            self._run(job)
        except BrokerError as exc:
            log.debug("queued work on the RabbitMQ connection failed: %s", mask_url(str(exc)))
        except Exception:
            log.debug("queued work on the RabbitMQ connection failed", exc_info=True)

    def _run(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except BaseException as exc:
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from None

    def _check_open(self) -> None:
        if self._closing:
            msg = f"the amqp broker {mask_url(self.url)} is closed; create a new one"
            raise BrokerError(msg)

    def _poke(self) -> None:
        connection = self.connection
        if connection is not None:
            # Makes the holder's process_data_events return; the only thread-safe call of a
            # BlockingConnection.
            with contextlib.suppress(Exception):
                connection.add_callback_threadsafe(_noop)

    def listen(self, condition: Callable[[], bool], timeout_s: float) -> None:
        """Holding the connection, process its events until ``condition()`` holds or ``timeout_s``
        passed; other threads' work runs in between (see the class docstring)."""
        deadline = time.monotonic() + timeout_s
        me = threading.get_ident()
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with self._cond:
                self._check_open()
                turn = bool(self._waiting)
                job = self._jobs.popleft() if self._jobs else None
                self._listening = not turn and job is None
            if job is not None:
                self._run_job(job)
                continue
            if turn:
                with self._cond:
                    self._owner = None
                    self._cond.notify_all()
                    self._cond.wait_for(lambda: self._owner is None and not self._waiting)
                    self._owner = me
                continue
            connection = self.connection
            if connection is None or not connection.is_open:
                return  # lost: the caller finds out on its next step
            try:
                connection.process_data_events(time_limit=min(remaining, TICK_S))
            finally:
                with self._cond:
                    self._listening = False

    def close(self, timeout_s: float = 10.0) -> None:
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()  # the keeper stops; a listener wakes to its _check_open
            self._poke()
            taken = self._owner == threading.get_ident() or self._wait_turn(timeout_s)
        if not taken:
            log.debug("%s: the connection was still in use at close", mask_url(self.url))
            return
        try:
            self._shutdown()
        finally:
            self._give_back()

    # -- the keeper thread ---------------------------------------------------------------------

    def _keep(self) -> None:
        while True:
            now = time.monotonic()
            timeout_s = TICK_S
            for consumer in list(self.consumers.values()):
                due = consumer.next_deadline()
                if due is not None:
                    timeout_s = min(timeout_s, max(0.0, due - now))
            with self._cond:
                self._cond.wait_for(lambda: self._closing, timeout_s)
                if self._closing:
                    return
                if self._owner is not None and not self._listening:
                    continue  # its holder is at work and drives it
            try:
                self._take(CALL_TIMEOUT_S)  # a holder that only listens lets go for a moment
            except BrokerError:
                continue
            try:
                self._tick()
            finally:
                self._give_back()

    def _tick(self) -> None:
        connection = self.connection
        if connection is not None and connection.is_open:
            try:
                connection.process_data_events(time_limit=0)
            except Exception as exc:
                self._translate(exc)
        for consumer in list(self.consumers.values()):
            try:
                consumer.io_expire_leases()
            except Exception as exc:
                log.warning("could not hand back expired leases: %s", mask_url(str(self._translate(exc))))

    def _translate(self, exc: BaseException) -> BaseException:
        connection_gone = self.connection is None or not self.connection.is_open
        if isinstance(exc, pika.exceptions.AMQPConnectionError | OSError) or (
            connection_gone and isinstance(exc, pika.exceptions.AMQPError)
        ):
            self.lost(exc)
            msg = f"lost the connection to RabbitMQ at {mask_url(self.url)}: {_describe(exc)}"
            return BrokerConnectionError(msg)
        if isinstance(exc, pika.exceptions.AMQPError):
            return BrokerError(f"RabbitMQ at {mask_url(self.url)}: {_describe(exc)}")
        return exc

    def _shutdown(self) -> None:
        for consumer in list(self.consumers.values()):
            consumer.close_quietly()
        connection, self.connection = self.connection, None
        if connection is not None and connection.is_open:
            with contextlib.suppress(Exception):
                connection.close()
        self.closed = True

    # -- helpers for the holder -------------------------------------------------------------------

    def write_now(self, frames: bytes) -> None:
        """Write marshaled frames to the socket before returning (pika would write them in its
        I/O loop, whenever the connection is next driven)."""
        self.connection._impl._output_marshaled_frames([frames])
        self.connection._flush_output()

    def wake_loop(self) -> None:
        """Make ``process_data_events`` return: for callbacks that run inside pika's I/O loop,
        which BlockingConnection does not leave for them (a no-op timer is an event it does)."""
        if self.connection is not None:
            self.connection.call_later(0, _noop)

    def wait_for(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Process connection events until ``condition()`` holds; BrokerError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                msg = (
                    f"RabbitMQ at {mask_url(self.url)} did not send {what} within {timeout_s:g}s;"
                    " is it overloaded, or blocked by a memory or disk alarm (rabbitmqctl status)?"
                )
                raise BrokerError(msg)
            self.connection.process_data_events(time_limit=min(remaining, TICK_S))

    def ensure_connection(self) -> Any:
        if self.connection is not None and self.connection.is_open:
            return self.connection
        if self.connection is not None:
            self.lost(None)
        masked = mask_url(self.url)
        try:
            connection = pika.BlockingConnection(self.params)
        except (pika.exceptions.ProbableAuthenticationError, pika.exceptions.AuthenticationError) as exc:
            msg = f"RabbitMQ at {masked} refused the login ({_describe(exc)}); check the user name and password"
            raise BrokerConnectionError(msg) from None
        except pika.exceptions.ProbableAccessDeniedError as exc:
            msg = (
                f"RabbitMQ at {masked} refused access to vhost {self.params.virtual_host!r} ({_describe(exc)});"
                " create it (rabbitmqctl add_vhost) and grant the user permissions (rabbitmqctl set_permissions)"
            )
            raise BrokerConnectionError(msg) from None
        except (pika.exceptions.AMQPError, OSError) as exc:
            msg = f"cannot connect to RabbitMQ at {masked}: {_describe(exc)}; is it running and reachable?"
            raise BrokerConnectionError(msg) from None
        self.connection = connection
        self.generation += 1
        self.declared = set()
        self.publisher = None
        self._admin = self._probe = None
        if self.generation > 1:
            log.info("reconnected to RabbitMQ at %s", masked)
        return connection

    def lost(self, exc: BaseException | None) -> None:
        """Forget the connection and everything on it; the next call opens a new one."""
        connection, self.connection = self.connection, None
        self.publisher = None
        self._admin = self._probe = None
        self.declared = set()
        reason = _describe(exc) if exc is not None else "closed"
        if exc is not None:
            log.warning("lost the connection to RabbitMQ at %s: %s", mask_url(self.url), reason)
        for consumer in list(self.consumers.values()):
            consumer.io_connection_lost(reason)
        if connection is not None and connection.is_open:
            with contextlib.suppress(Exception):
                connection.close()

    def admin(self) -> Any:
        """A plain channel for declarations and counts; reopened after RabbitMQ closes it."""
        connection = self.ensure_connection()
        if self._admin is None or not self._admin.is_open:
            self._admin = connection.channel()
        return self._admin

    def count(self, queue: str) -> int | None:
        """Ready messages of ``queue``, or None when it does not exist."""
        connection = self.ensure_connection()
        if self._probe is None or not self._probe.is_open:
            # Its own channel: RabbitMQ closes it at each missing queue, and reopening it must
            # not disturb the declarations on the admin channel.
            self._probe = connection.channel()
            _PROBES.add(self._probe._impl)
        try:
            return int(self._probe.queue_declare(queue, passive=True).method.message_count)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return None
            raise

    def counts(self, queues: Sequence[str]) -> list[int | None]:
        """Ready messages of each of ``queues`` (None: it does not exist), in three round trips.

        A passive declare of a missing queue closes its channel, so each queue is asked on a
        channel of its own; all are opened, asked and closed at once on pika's asynchronous
        objects (RabbitMQ has no call that counts several queues; its management API is not used).
        """
        impl = self.ensure_connection()._impl
        answers: dict[int, int | None] = {}
        refused: list[BaseException] = []
        opened: list[Any] = []

        def answer(index: int, count: int | None) -> None:
            answers.setdefault(index, count)
            self.wake_loop()

        def on_close(index: int, _channel: Any, reason: BaseException) -> None:
            if index not in answers and getattr(reason, "reply_code", None) != 404:
                refused.append(reason)
            answer(index, None)

        def ask(index: int, queue: str, channel: Any) -> None:
            _PROBES.add(channel)
            opened.append(channel)
            channel.add_on_close_callback(functools.partial(on_close, index))
            channel.queue_declare(
                queue, passive=True, callback=lambda frame: answer(index, int(frame.method.message_count))
            )

        for index, queue in enumerate(queues):
            impl.channel(on_open_callback=functools.partial(ask, index, queue))
        self.wait_for(lambda: len(answers) == len(queues), CONFIRM_TIMEOUT_S, "queue counts")
        for channel in opened:
            if channel.is_open:
                channel.close()
        # Waited for: BlockingConnection.close() fails on a channel it did not open that is
        # still open or closing (it has no BlockingChannel to close), leaving the socket open.
        self.wait_for(lambda: all(channel.is_closed for channel in opened), CONFIRM_TIMEOUT_S, "channel.close-ok")
        if refused:
            raise refused[0]
        return [answers[index] for index in range(len(queues))]

    def declare(self, queue: str) -> None:
        """Declare exchange and queue ``queue`` as Celery does, once per connection."""
        if queue in self.declared:
            return
        channel = self.admin()
        arguments = self.options.queue_arguments
        try:
            channel.exchange_declare(queue, exchange_type="direct", durable=True)
            channel.queue_declare(queue, durable=True, arguments=arguments or None)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 406:
                raise
            msg = (
                f"queue or exchange {queue!r} on {mask_url(self.url)} exists with other settings ({exc.reply_text});"
                f" taskframe declares both durable, the queue with arguments {arguments or 'none'}: delete them"
                " (rabbitmqctl delete_queue) or make broker_options max_priority/queue_type match"
            )
            raise BrokerError(msg) from None
        channel.queue_bind(queue, queue, routing_key=queue)
        self.declared.add(queue)

    def declare_dead(self, queue: str) -> str:
        name = _dead_queue(queue)
        if name not in self.declared:
            # A classic queue whatever ``queue_type``: listing dead letters puts them back,
            # and a quorum queue would count that as a delivery (RabbitMQ 4 drops a message
            # after 20 of them).
            self.admin().queue_declare(name, durable=True)
            self.declared.add(name)
        return name

    def _declare_level_queue(self, name: str, arguments: dict[str, Any]) -> None:
        """Declare a delay queue; one that exists with other arguments (declared by an earlier
        version, or before ``queue_type`` changed) is used as it is, with a warning."""
        try:
            self.admin().queue_declare(name, durable=True, arguments=arguments)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 406:
                raise
            log.warning(
                "queue %r on %s exists with other arguments than %s (%s); it is used as it is:"
                " delete it when it is empty (rabbitmqctl delete_queue %s) to have it declared again",
                name,
                mask_url(self.url),
                arguments,
                exc.reply_text,
                name,
            )
            self.admin().queue_declare(name, passive=True)

    def declare_delay(self, queue: str, delay_ms: int) -> None:
        """The level queues ``delay_ms`` passes through, and the shared exchanges."""
        channel = self.admin()
        if DELIVER_EXCHANGE not in self.declared:
            for level in range(-1, DELAY_LEVELS):
                channel.exchange_declare(_level_exchange(level), exchange_type="topic", durable=True)
            for level in range(DELAY_LEVELS):
                # A 0 at this level's bit passes straight on to the next lower level.
                channel.exchange_bind(_level_exchange(level - 1), _level_exchange(level), _pattern("*", level, "0"))
            self.declared.add(DELIVER_EXCHANGE)
        token = _token(queue)
        if f"{queue} delivery" not in self.declared:
            channel.queue_bind(queue, DELIVER_EXCHANGE, routing_key=_pattern(token, -1, ""))
            self.declared.add(f"{queue} delivery")
        for level in _levels_of(delay_ms):
            name = _level_queue(queue, level)
            if name in self.declared:
                continue
            self._declare_level_queue(name, self.options.level_queue_arguments(level))
            # admin(), not ``channel``: a refused declaration closed that channel.
            self.admin().queue_bind(name, _level_exchange(level), routing_key=_pattern(token, level, "1"))
            self.declared.add(name)

    def publish(self, messages: Sequence[_Outgoing]) -> None:
        """Declare what ``messages`` need, publish them, and wait for every confirm."""
        self.ensure_connection()
        for message in messages:
            message.prepare(self)
        if self.publisher is None or not self.publisher.is_open:
            self.publisher = _Publisher(self)
        try:
            unroutable = self.publisher.publish(messages)
        except _NotFound:
            # Publishing to a missing exchange closes the channel: declare again, once. The
            # messages before the failing one may be stored twice (at least once).
            self.declared = set()
            for message in messages:
                message.prepare(self)
            self.publisher = _Publisher(self)
            unroutable = self.publisher.publish(messages)
        if unroutable:
            # A queue or binding deleted behind our back: declare again, send those once more.
            self.declared = set()
            for message, _text in unroutable:
                message.prepare(self)
            again = self.publisher.publish([m for m, _ in unroutable])
            if again:
                message, text = again[0]
                msg = (
                    f"RabbitMQ at {mask_url(self.url)} could not route a message to queue {message.queue!r}"
                    f" ({text}) even after declaring it again; is something deleting it?"
                )
                raise BrokerError(msg)


# -- the broker ----------------------------------------------------------------------------------------

#: Connection threads of this process, closed at exit so RabbitMQ sees a clean close.
_LINKS: weakref.WeakSet[_Link] = weakref.WeakSet()
#: Links inherited across fork(): kept referenced, never used or closed by this process.
_INHERITED: list[_Link] = []


@atexit.register
def _close_links_at_exit() -> None:
    for link in list(_LINKS):
        if link.pid == os.getpid():
            link.close(timeout_s=2.0)


class _Holder:
    """The broker's link, apart from the broker so a finalizer can close it."""

    def __init__(self) -> None:
        self.link: _Link | None = None
        self.lock = threading.Lock()
        self.pid = os.getpid()

    def close(self) -> None:
        link, self.link = self.link, None
        if link is not None and link.pid == os.getpid():
            link.close()
            _LINKS.discard(link)


class AMQPBroker:
    """The ``amqp://`` and ``amqps://`` broker; see the module docstring.

    Built as ``AMQPBroker(url, conf)``; with ``max_priority`` >= 9 the object is an
    :class:`AMQPPriorityBroker`, whose ``supports_priority`` is true.
    """

    supports_priority: ClassVar[bool] = False

    def __new__(cls, url: str, conf: Settings) -> AMQPBroker:
        _, options = _split_url(url, conf)
        target = AMQPPriorityBroker if (options.max_priority or 0) >= MAX_PRIORITY else cls
        return object.__new__(target)

    def __init__(self, url: str, conf: Settings) -> None:
        self.url = url
        pika_url, self.options = _split_url(url, conf)
        self._params = _parameters(pika_url, url)
        self.visibility_timeout_s = conf.visibility_timeout
        self.max_deliveries = conf.max_deliveries
        self._holder = _Holder()
        self._finalizer = weakref.finalize(self, _Holder.close, self._holder)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {mask_url(self.url)}>"

    def _link(self) -> _Link:
        holder = self._holder
        pid = os.getpid()
        if holder.pid != pid:
            # A forked child: the parent's thread is gone and its socket is not ours. Keep the
            # old link referenced (its sockets must not be closed here) and start afresh.
            if holder.link is not None:
                _INHERITED.append(holder.link)
            self._holder = holder = _Holder()
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _Holder.close, holder)
        link = holder.link
        if link is None or link.closed:
            with holder.lock:
                if holder.link is None or holder.link.closed:
                    holder.link = _Link(self)
                    _LINKS.add(holder.link)
                link = holder.link
        return link

    def close(self) -> None:
        """Close this process's connection; a later call opens a new one."""
        if self._holder.pid == os.getpid():
            self._holder.close()

    # -- publishing --------------------------------------------------------------------------

    def _outgoing(self, queue: str, envelope: Envelope, delay_s: float, priority: int) -> _Outgoing:
        check_priority(priority)
        check_queue_name(queue)
        return _Outgoing(queue, _to_amqp(envelope, priority, {}), envelope.body, _delay_ms(delay_s))

    def publish(
        self,
        queue: str,
        envelope: Envelope,
        *,
        delay_s: float = 0.0,
        priority: int = DEFAULT_PRIORITY,
    ) -> None:
        self._publish([self._outgoing(queue, envelope, delay_s, priority)])

    def publish_many(self, messages: Sequence[OutgoingMessage]) -> None:
        outgoing = [self._outgoing(m.queue, m.envelope, m.delay_s, m.priority) for m in messages]
        if outgoing:
            self._publish(outgoing)

    def _publish(self, messages: list[_Outgoing]) -> None:
        queues = ", ".join(sorted({m.queue for m in messages}))
        started = time.monotonic()
        for attempt in range(1, PUBLISH_ATTEMPTS + 1):
            try:
                link = self._link()
                link.call(functools.partial(link.publish, messages))
                return
            except BrokerConnectionError as exc:
                if attempt == PUBLISH_ATTEMPTS:
                    msg = (
                        f"could not publish {len(messages)} message(s) to {queues} after {attempt} attempts"
                        f" ({time.monotonic() - started:.1f}s): {exc} (a message whose confirm was lost may have"
                        " been stored all the same)"
                    )
                    raise BrokerConnectionError(msg) from None
                pause_s = PUBLISH_PAUSES_S[min(attempt, len(PUBLISH_PAUSES_S)) - 1]
                log.warning("publish to %s failed (%s); retrying in %.1fs", queues, mask_url(str(exc)), pause_s)
                time.sleep(pause_s)

    # -- consuming ---------------------------------------------------------------------------

    def consumer(self, queues: Sequence[str], *, prefetch: int) -> AMQPConsumer:
        return AMQPConsumer(self, queues, prefetch=prefetch)

    # -- inspection and administration -------------------------------------------------------

    def stats(self, queue: str) -> QueueStats:
        link = self._link()

        def read() -> QueueStats:
            ready, dead, *levels = link.counts([queue, _dead_queue(queue), *_level_queues(queue)])
            reserved = sum(c.held(queue) for c in link.consumers.values())
            return QueueStats(
                queue, ready=ready or 0, delayed=sum(n or 0 for n in levels), reserved=reserved, dead=dead or 0
            )

        return link.call(read)

    def purge(self, queue: str) -> int:
        link = self._link()

        def purge() -> int:
            names = [queue, *_level_queues(queue)]
            found = link.counts(names)
            if found[0] is None:
                return 0
            existing = [name for name, count in zip(names, found, strict=True) if count is not None]
            return sum(int(link.admin().queue_purge(name).method.message_count) for name in existing)

        return link.call(purge)

    def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        link = self._link()

        def browse() -> list[DeadLetter]:
            if link.count(_dead_queue(queue)) is None:
                return []
            # Unacked gets, then closing the channel: every message goes back in its place.
            channel = link.ensure_connection().channel()
            letters: list[DeadLetter] = []
            try:
                while len(letters) < limit:
                    method, props, body = channel.basic_get(_dead_queue(queue), auto_ack=False)
                    if method is None:
                        break
                    letters.append(_dead_letter(queue, props, body))
            finally:
                if channel.is_open:
                    channel.close()
            return letters

        return link.call(browse)

    def requeue_dead(self, queue: str) -> int:
        link = self._link()

        def requeue() -> int:
            if link.count(_dead_queue(queue)) is None:
                return 0
            channel = link.admin()
            moved = 0
            while True:
                batch: list[_Outgoing] = []
                last_tag = None
                while len(batch) < REQUEUE_BATCH:
                    method, props, body = channel.basic_get(_dead_queue(queue), auto_ack=False)
                    if method is None:
                        break
                    envelope, _ours = _from_amqp(props, body)
                    priority = props.priority if props.priority is not None else DEFAULT_PRIORITY
                    batch.append(_Outgoing(queue, _to_amqp(envelope, priority, {}), envelope.body))
                    last_tag = method.delivery_tag
                if not batch:
                    return moved
                link.publish(batch)  # confirmed before the dead letters are acked
                channel.basic_ack(last_tag, multiple=True)
                moved += len(batch)

        return link.call(requeue)

    def purge_dead(self, queue: str) -> int:
        link = self._link()

        def purge() -> int:
            if link.count(_dead_queue(queue)) is None:
                return 0
            return int(link.admin().queue_purge(_dead_queue(queue)).method.message_count)

        return link.call(purge)


class AMQPPriorityBroker(AMQPBroker):
    """An :class:`AMQPBroker` whose queues have ``x-max-priority`` >= 9: priority orders delivery."""

    supports_priority: ClassVar[bool] = True


def _dead_letter(queue: str, props: Any, body: bytes) -> DeadLetter:
    envelope, ours = _from_amqp(props, body)
    task = envelope.headers.get("task")
    return DeadLetter(
        id=str(ours.get(HEADER_DEAD_ID) or props.message_id or envelope.task_id or ""),
        task=str(task) if task is not None else None,
        queue=queue,
        deliveries=int(ours.get(HEADER_DELIVERIES) or 0),
        reason=str(ours.get(HEADER_REASON) or ""),
        dead_at=float(ours.get(HEADER_DEAD_AT) or 0) / 1000,
        envelope=envelope,
    )


# -- the consumer -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tag:
    """A delivery's handle: acks of another consumer or of a lost channel are no-ops."""

    consumer: str
    epoch: int
    delivery_tag: int


@dataclass
class _Pending:
    """A message got from a queue and not yet given to the caller."""

    queue_index: int
    queue: str
    delivery_tag: int
    redelivered: bool
    properties: Any
    body: bytes

    @property
    def priority(self) -> int:
        return int(self.properties.priority or 0)


@dataclass
class _Lease:
    delivery: Delivery
    pending: _Pending
    deadline: float  # time.monotonic()


@dataclass
class _State:
    """What a consumer holds on its current channel (``epoch``); guarded by the consumer's lock."""

    leases: dict[int, _Lease] = field(default_factory=dict)
    candidates: dict[int, _Pending] = field(default_factory=dict)
    pushed: list[_Pending] = field(default_factory=list)  # delivered to an idle wait, not yet taken


class AMQPConsumer:
    """Pulls from a fixed list of queues on its own channel; see the module docstring.

    ``prefetch`` is recorded but not enforced: the worker asks for what it has room for
    through ``max_messages``, and ``basic.get`` fetches only that.
    """

    def __init__(self, broker: AMQPBroker, queues: Sequence[str], *, prefetch: int) -> None:
        check_queues(queues)
        self.broker = broker
        self.queues = [check_queue_name(q) for q in queues]
        self.prefetch = prefetch
        self.id = uuid.uuid4().hex[:16]
        self._lock = threading.Lock()
        self._state = _State()
        self._buried = BuriedLog()  # leases also run out on the keeper thread
        self._lost: str | None = None
        self._closed = False
        # Connection-thread state.
        self._channel: Any = None
        self._epoch = 0
        self._listeners: dict[str, int] = {}  # consumer tag -> queue index, while waiting idle
        self._cancelling: dict[str, int] = {}  # listeners cancelled, Basic.CancelOk not yet in
        self._dropped = False  # RabbitMQ cancelled a listener
        self._getter: _Getter | None = None
        self._link = broker._link()
        self._link.call(self._io_open)

    def __repr__(self) -> str:
        return f"<AMQPConsumer {self.id} of {self.queues} on {self.broker!r}>"

    # -- public API (any thread) ---------------------------------------------------------------

    def receive(self, timeout_s: float, *, max_messages: int = 1) -> list[Delivery]:
        check_receive(self, closed=self._closed, max_messages=max_messages)
        return self._link.call(lambda: self._io_receive((), timeout_s, max_messages))

    def ack_and_receive(self, acks: Sequence[Delivery], timeout_s: float, *, max_messages: int = 1) -> list[Delivery]:
        """Ack ``acks`` and receive: the ack frames go out in the same write as the first gets."""
        check_receive(self, closed=self._closed, max_messages=max_messages)
        batch = list(acks)
        return self._link.call(lambda: self._io_receive(batch, timeout_s, max_messages))

    def take_buried(self) -> list[Buried]:
        """What this consumer dead-lettered after ``max_deliveries`` since the last call."""
        return self._buried.take()

    def ack(self, delivery: Delivery) -> None:
        """Send the ack, or leave it to the connection's holder (``_Link.submit``): basic.ack
        has no reply to wait for. If the connection is lost first, the message is back in its
        queue anyway, which the next ``receive`` reports."""
        self._link.submit(lambda: self._io_settle(delivery, "ack"))

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Ack ``deliveries`` in one go, as ``ack`` does."""
        batch = list(deliveries)
        if batch:
            self._link.submit(lambda: self._io_ack_many(batch))

    def nack(self, delivery: Delivery, *, requeue: bool, reason: str = "", delay_s: float = 0.0) -> None:
        if requeue:
            self._link.call(lambda: self._io_settle(delivery, "requeue", delay_s=delay_s))
        else:
            self._link.call(lambda: self._io_settle(delivery, "dead", reason=reason or "rejected by the worker"))

    def release(self, deliveries: Sequence[Delivery]) -> None:
        """Hand back deliveries whose task never started: republished with the count they had
        before this delivery (the original acked), as a requeue is."""
        batch = list(deliveries)

        def release() -> None:
            with self._lock:
                leases = [lease for lease in map(self._lease_of, batch) if lease is not None]
                for lease in leases:
                    del self._state.leases[lease.pending.delivery_tag]
            if not leases:
                return
            # All confirmed in one round trip, then the originals acked.
            self._link.publish(
                [
                    self._copy_of(lease.pending, lease.delivery.envelope, lease.delivery.deliveries - 1)
                    for lease in leases
                ]
            )
            for lease in leases:
                self._io_basic_ack(lease.pending.delivery_tag)

        if batch:
            self._link.call(release)

    def renew(self, deliveries: Sequence[Delivery]) -> None:
        """Move the lease deadlines in memory (thread-safe, no network call)."""
        if not deliveries:
            return
        deadline = time.monotonic() + self.broker.visibility_timeout_s
        lost = 0
        with self._lock:
            for delivery in deliveries:
                lease = self._lease_of(delivery)
                if lease is None:
                    lost += 1
                else:
                    lease.deadline = deadline
        warn_lost_leases(log, lost, len(deliveries), "handed back after visibility_timeout, or their connection closed")

    def close(self) -> None:
        """Close the channel: what it holds goes back to the queues at once."""
        if self._closed:
            return
        self._closed = True
        if self._link.pid == os.getpid() and not self._link.closed:
            with contextlib.suppress(BrokerError):
                self._link.call(self._io_close)

    def close_quietly(self) -> None:
        """The broker is closing: what this consumer holds goes back with the connection."""
        self._closed = True
        with self._lock:
            self._state = _State()

    def held(self, queue: str) -> int:
        """Deliveries of ``queue`` this consumer holds (leased, or got and not yet returned)."""
        with self._lock:
            leased = sum(1 for lease in self._state.leases.values() if lease.pending.queue == queue)
            waiting = [*self._state.candidates.values(), *self._state.pushed]
            return leased + sum(1 for p in waiting if p.queue == queue)

    def next_deadline(self) -> float | None:
        with self._lock:
            return min((lease.deadline for lease in self._state.leases.values()), default=None)

    def _lease_of(self, delivery: Delivery) -> _Lease | None:
        tag = delivery.tag
        if not isinstance(tag, _Tag) or tag.consumer != self.id or tag.epoch != self._epoch:
            return None
        return self._state.leases.get(tag.delivery_tag)

    # -- holding the connection -------------------------------------------------------------------

    def _io_open(self) -> None:
        link = self._link
        link.ensure_connection()
        for queue in self.queues:
            link.declare(queue)
        self._channel = link.connection.channel()
        # Per consumer (global=False): an idle wait's listener is pushed one message at a
        # time. basic.get, which brings everything else, is not subject to it.
        self._channel.basic_qos(prefetch_count=1)
        self._getter = _Getter(link, self._channel)
        self._epoch += 1
        self._listeners.clear()
        self._cancelling.clear()
        # The listeners are consumers of the channel's asynchronous object: BlockingChannel's
        # own handlers of their replies expect its basic_consume (one at a time) and would
        # fail on theirs, so they are replaced (this channel's BlockingChannel.basic_consume
        # must not be used).
        impl, number = self._channel._impl, self._channel.channel_number
        impl.callbacks.remove(number, pika.spec.Basic.ConsumeOk, self._channel._basic_consume_ok_result.signal_once)
        impl.callbacks.remove(number, pika.spec.Basic.Cancel, self._channel._on_consumer_cancelled_by_broker)
        impl.add_on_cancel_callback(self._on_server_cancel)
        impl.callbacks.add(number, pika.spec.Basic.CancelOk, self._on_cancel_ok, False)
        link.consumers[self.id] = self

    def _io_check(self) -> Any:
        """The open channel; reports a lost connection once, then reopens."""
        if self._closed:
            msg = f"{self!r} is closed; create a new consumer"
            raise BrokerError(msg)
        with self._lock:
            lost, self._lost = self._lost, None
        if lost is not None:
            self._channel = None
            msg = (
                f"lost the RabbitMQ channel of {self!r}: {lost}; the messages it held went back to their"
                " queues and will be delivered again"
            )
            if "acknowledgement" in lost and "timed out" in lost:
                msg += (
                    "; RabbitMQ's consumer_timeout ran out for a long task: raise it (rabbitmq.conf"
                    " consumer_timeout, or a consumer-timeout policy on RabbitMQ 3.12+)"
                )
            log.error("%s", mask_url(msg))
            raise BrokerConnectionError(msg)
        channel = self._channel
        if channel is not None and not channel.is_open and self._epoch:
            # Closed by RabbitMQ since the last call (e.g. its consumer_timeout): say so once.
            reason = getattr(channel, "_closing_reason", None)
            with self._lock:
                held = len(self._state.leases) + len(self._state.candidates) + len(self._state.pushed)
                self._state = _State()
            self._channel = None
            if held:
                with self._lock:
                    self._lost = _describe(reason) if reason else "channel closed"
                return self._io_check()
        if self._channel is None or not self._channel.is_open:
            self._io_open()
        return self._channel

    def io_connection_lost(self, reason: str) -> None:
        with self._lock:
            held = len(self._state.leases) + len(self._state.candidates) + len(self._state.pushed)
            self._state = _State()
            self._lost = reason if not self._closed else None
        self._channel = None
        self._listeners.clear()
        self._cancelling.clear()
        if held and not self._closed:
            log.warning("%d message(s) held by %r went back to their queues: %s", held, self, reason)

    def _io_fetch(self, channel: Any, indices: Sequence[int]) -> list[_Pending | None]:
        """One ``basic.get`` per queue index of ``indices``, all in one round trip; an empty
        list when the channel was lost meanwhile (``self._lost`` then says why)."""
        assert self._getter is not None
        answers = self._getter.get([self.queues[index] for index in indices])
        if answers is None:
            reason = getattr(channel, "_closing_reason", None)
            if getattr(reason, "reply_code", None) == 404:  # deleted behind our back: declare again
                for index in set(indices):
                    self._link.declared.discard(self.queues[index])
            self._channel = None
            with self._lock:
                self._state = _State()  # all of it went back to the queues with the channel
                self._lost = _describe(reason) if reason is not None else "channel closed"
            return []
        return [
            None
            if answer is None
            else _Pending(index, self.queues[index], answer[0].delivery_tag, bool(answer[0].redelivered), *answer[1:])
            for index, answer in zip(indices, answers, strict=True)
        ]

    def _io_receive(self, acks: Sequence[Delivery], timeout_s: float, max_messages: int) -> list[Delivery]:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        if acks:
            self._io_ack_many(acks, ride=True)
        try:
            while True:
                deliveries = self._io_collect(max_messages)
                if deliveries:
                    return deliveries
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if not self._listeners:
                    # RabbitMQ pushes what is ready at once, so a message that came between
                    # the gets and the listeners is not missed.
                    self._io_listen()
                self._link.listen(self._woken, remaining)
                if not self._woken() and time.monotonic() >= deadline:
                    break
            if not self._listeners:
                return []
            # Timed out: stop listening, and take what was pushed before RabbitMQ heard it.
            self._io_unlisten(wait=True)
            return self._io_collect(max_messages) if self._state.pushed else []
        except (pika.exceptions.AMQPConnectionError, OSError) as exc:
            # Noticed here first: say what it means for this consumer (``_io_check``).
            self._link.lost(exc)
            self._io_check()
            raise
        finally:
            if self._getter is not None:
                self._getter.flush()  # acks that found no get to ride with

    def _woken(self) -> bool:
        return bool(self._state.pushed) or self._dropped or self._lost is not None

    def _io_collect(self, max_messages: int) -> list[Delivery]:
        channel = self._io_check()
        out: list[Delivery] = []
        if self._listeners:
            # Woken: stop listening. One queue's listener, with its one message unacked, is
            # sent nothing more, so it is cancelled without a wait; the listeners of several
            # queues may each have a message on the way: wait until RabbitMQ has them all back.
            self._io_unlisten(wait=len(self.queues) > 1 or not self._state.pushed)
        self._dropped = False
        if self._state.pushed:
            # Returned alone: a basic.get for the rest of a batch would wait for RabbitMQ to
            # write the message just pushed (see "Consuming"); the next receive takes them.
            self._io_take_pushed(max_messages, out)
        elif len(self.queues) == 1:
            self._io_collect_one(channel, max_messages, out)
        else:
            self._io_collect_across(channel, max_messages, out)
        if not out and self._lost is not None:
            self._io_check()  # raises
        return out

    def _io_take_pushed(self, max_messages: int, out: list[Delivery]) -> None:
        """Lease what listeners were pushed, most urgent first, queues in order on ties; what
        does not fit in ``max_messages`` waits as its queue's candidate."""
        with self._lock:
            pushed, self._state.pushed = self._state.pushed, []
        for pending in sorted(pushed, key=lambda p: (-p.priority, p.queue_index)):
            if len(out) < max_messages:
                delivery = self._io_admit(pending)
                if delivery is not None:
                    out.append(delivery)
                continue
            with self._lock:
                if pending.queue_index in self._state.candidates:
                    self._state.pushed.append(pending)  # still held: taken by the next receive
                else:
                    self._state.candidates[pending.queue_index] = pending

    def _io_collect_one(self, channel: Any, max_messages: int, out: list[Delivery]) -> None:
        """One queue: the first ``max_messages`` ready messages, ``max_messages`` gets a round trip."""
        while len(out) < max_messages and self._lost is None:
            answers = self._io_fetch(channel, [0] * (max_messages - len(out)))
            moved = False  # republished with its count raised (it is at the tail now), or buried
            for pending in answers:
                if pending is not None:
                    delivery = self._io_admit(pending)
                    if delivery is not None:
                        out.append(delivery)
                    moved = moved or delivery is None
            if not answers or (answers[-1] is None and not moved):
                return  # the queue is empty (or the channel lost): nothing more to wait for

    def _io_collect_across(self, channel: Any, max_messages: int, out: list[Delivery]) -> None:
        """Several queues: one candidate per queue, the most urgent first, queues in order on ties."""
        empty: set[int] = set()
        candidates = self._state.candidates
        while len(out) < max_messages and self._lost is None:
            missing = [i for i in range(len(self.queues)) if i not in candidates and i not in empty]
            for index, pending in zip(missing, self._io_fetch(channel, missing) if missing else [], strict=False):
                if pending is None:
                    empty.add(index)
                else:
                    with self._lock:
                        candidates[index] = pending
            if self._lost is not None or not candidates:
                return
            best = min(candidates.values(), key=lambda p: (-p.priority, p.queue_index))
            with self._lock:
                del candidates[best.queue_index]
            delivery = self._io_admit(best)
            if delivery is not None:
                out.append(delivery)

    def _io_admit(self, pending: _Pending) -> Delivery | None:
        """Lease ``pending``, or dead-letter it, or republish it with its count raised."""
        envelope, ours = _from_amqp(pending.properties, pending.body)
        before = int(ours.get(HEADER_DELIVERIES) or 0)
        quorum = self._link.options.queue_type == "quorum"
        if quorum:
            before += int(ours.get("x-delivery-count") or 0)
        elif pending.redelivered:
            before += 1  # its last delivery ended with a lost connection: count that one
        limit = self.broker.max_deliveries
        if before >= limit:
            reason = (
                f"delivered {before} times without an ack (max_deliveries={limit}):"
                " the task probably crashed its worker"
            )
            self._io_bury(pending, envelope, before, reason)
            log.warning("task %s of queue %r dead-lettered: %s", envelope.task_id, pending.queue, reason)
            self._buried.add(envelope, pending.queue, reason)
            return None
        if pending.redelivered and not quorum:
            # Persist the count before it runs again, so a task that kills its worker stops.
            self._io_republish(pending, envelope, before, 0.0)
            return None
        delivery = Delivery(envelope, pending.queue, before + 1, _Tag(self.id, self._epoch, pending.delivery_tag))
        deadline = time.monotonic() + self.broker.visibility_timeout_s
        with self._lock:
            self._state.leases[pending.delivery_tag] = _Lease(delivery, pending, deadline)
        return delivery

    def _io_republish(self, pending: _Pending, envelope: Envelope, deliveries: int, delay_s: float) -> None:
        """A copy with ``deliveries`` recorded, confirmed, then the original acked."""
        self._link.publish([self._copy_of(pending, envelope, deliveries, delay_s)])
        self._io_basic_ack(pending.delivery_tag)

    @staticmethod
    def _copy_of(pending: _Pending, envelope: Envelope, deliveries: int, delay_s: float = 0.0) -> _Outgoing:
        """What a hand-back publishes: ``pending`` again, with ``deliveries`` recorded."""
        properties = _to_amqp(envelope, pending.priority, {HEADER_DELIVERIES: deliveries})
        return _Outgoing(pending.queue, properties, envelope.body, _delay_ms(delay_s))

    def _io_bury(self, pending: _Pending, envelope: Envelope, deliveries: int, reason: str) -> None:
        link = self._link
        dead = link.declare_dead(pending.queue)
        headers = {
            HEADER_DELIVERIES: deliveries,
            HEADER_REASON: reason,
            HEADER_DEAD_AT: int(time.time() * 1000),  # milliseconds: pika writes no float
            HEADER_DEAD_ID: uuid.uuid4().hex,
        }
        properties = _to_amqp(envelope, pending.priority, headers)
        # Published by its queue name through the default exchange: no binding to keep.
        link.publish([_DeadOutgoing(pending.queue, properties, envelope.body, dead_queue=dead)])
        self._io_basic_ack(pending.delivery_tag)

    def _io_basic_ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        channel = self._channel
        if channel is None or not channel.is_open:
            return  # the channel is gone, and with it the delivery: RabbitMQ has it back
        try:
            channel.basic_ack(delivery_tag, multiple=multiple)
        except pika.exceptions.AMQPChannelError as exc:
            self._channel = None
            with self._lock:
                self._lost = _describe(exc)

    def _io_settle(self, delivery: Delivery, action: str, *, delay_s: float = 0.0, reason: str = "") -> None:
        with self._lock:
            lease = self._lease_of(delivery)
            if lease is not None:
                del self._state.leases[lease.pending.delivery_tag]
        if lease is None:
            # Already settled, handed back after its lease, or its channel is gone (then
            # RabbitMQ has it back in the queue): nothing of ours to act on.
            log.debug("%s of %s ignored: %r no longer holds it", action, delivery.envelope.task_id, self)
            return
        if action == "ack":
            self._io_basic_ack(lease.pending.delivery_tag)
        elif action == "requeue":
            self._io_republish(lease.pending, delivery.envelope, delivery.deliveries, delay_s)
        else:
            self._io_bury(lease.pending, delivery.envelope, delivery.deliveries, reason)

    def _io_ack_many(self, deliveries: Sequence[Delivery], *, ride: bool = False) -> None:
        """Ack ``deliveries``; with ``ride``, the frames wait for the next gets' write."""
        with self._lock:
            tags = []
            for delivery in deliveries:
                lease = self._lease_of(delivery)
                if lease is not None:
                    del self._state.leases[lease.pending.delivery_tag]
                    tags.append(lease.pending.delivery_tag)
            highest = max(tags, default=0)
            # basic.ack with multiple=True acks every unacked delivery of the channel up to its
            # tag: one frame, but right only when no other delivery below it is still held.
            waiting = [*self._state.candidates.values(), *self._state.pushed]
            held = [*self._state.leases, *(p.delivery_tag for p in waiting)]
            multiple = len(tags) > 1 and all(tag > highest for tag in held)
        getter, channel = self._getter, self._channel
        if ride and tags and getter is not None and channel is not None and channel.is_open:
            getter.ack_later([highest] if multiple else sorted(tags), multiple=multiple)
            return
        if multiple:
            self._io_basic_ack(highest, multiple=True)
            return
        for tag in sorted(tags):
            self._io_basic_ack(tag)

    def io_expire_leases(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [lease for lease in self._state.leases.values() if lease.deadline <= now]
            for lease in expired:
                del self._state.leases[lease.pending.delivery_tag]
        for lease in expired:
            delivery = lease.delivery
            limit = self.broker.max_deliveries
            if delivery.deliveries >= limit:
                reason = (
                    f"delivered {delivery.deliveries} times without an ack (max_deliveries={limit}):"
                    " its lease ran out each time"
                )
                self._io_bury(lease.pending, delivery.envelope, delivery.deliveries, reason)
                log.warning("task %s dead-lettered: %s", delivery.envelope.task_id, reason)
                self._buried.add(delivery.envelope, delivery.queue, reason)
                continue
            log.warning(
                "lease of task %s ran out (visibility_timeout=%gs without renew); handed back to %r",
                delivery.envelope.task_id,
                self.broker.visibility_timeout_s,
                delivery.queue,
            )
            self._io_republish(lease.pending, delivery.envelope, delivery.deliveries, 0.0)

    def _io_listen(self) -> None:
        """A consumer on each queue (prefetch 1, set at ``_io_open``): RabbitMQ pushes a message
        the moment it arrives, before writing it to disk, which a basic.get would wait for."""
        impl = self._channel._impl
        for index, queue in enumerate(self.queues):
            tag = impl.basic_consume(queue, self._on_push)
            self._listeners[tag] = index

    def _io_unlisten(self, *, wait: bool) -> None:
        """Cancel the listeners; with ``wait``, until RabbitMQ has confirmed it (Basic.CancelOk),
        so that everything they were sent is in ``pushed``.

        Basic.Cancel is written here rather than through pika's basic_cancel, which rejects
        (requeues) what arrives for a cancelled consumer before its CancelOk: such a message
        would come back marked redelivered, which counts as a delivery (see "Delivery
        counting"), and at the tail of its queue."""
        channel, listeners = self._channel, dict(self._listeners)
        self._listeners.clear()
        if channel is None or not channel.is_open or not listeners:
            return
        impl = channel._impl
        number = impl.channel_number
        frames = b"".join(
            pika.frame.Method(number, pika.spec.Basic.Cancel(consumer_tag=tag)).marshal() for tag in listeners
        )
        self._cancelling.update(listeners)
        self._link.write_now(frames)
        if wait:
            self._link.wait_for(
                lambda: not (self._cancelling.keys() & listeners.keys()) or not impl.is_open,
                CONFIRM_TIMEOUT_S,
                "basic.cancel-ok",
            )

    def _on_push(self, _channel: Any, method: Any, properties: Any, body: bytes) -> None:
        """pika's I/O loop, on the holder's thread: a listener's message (handled by the receive)."""
        tag = method.consumer_tag
        index = self._listeners.get(tag, self._cancelling.get(tag))
        if index is None:  # cannot happen: pika hands this callback only the tags it was given
            log.warning("%r was pushed a message for an unknown consumer %s; it comes back with the channel", self, tag)
            return
        pending = _Pending(index, self.queues[index], method.delivery_tag, bool(method.redelivered), properties, body)
        with self._lock:
            self._state.pushed.append(pending)
        self._link.wake_loop()

    def _on_cancel_ok(self, frame: Any) -> None:
        tag = frame.method.consumer_tag
        if self._cancelling.pop(tag, None) is not None and self._channel is not None:
            self._channel._impl._cleanup_consumer_ref(tag)
        self._link.wake_loop()

    def _on_server_cancel(self, frame: Any) -> None:
        """RabbitMQ cancelled a listener (its queue was deleted): wake the receive, whose next
        basic.get finds out what happened."""
        tag = frame.method.consumer_tag
        self._cancelling.pop(tag, None)  # RabbitMQ sends no CancelOk for it now
        if self._listeners.pop(tag, None) is not None:
            self._dropped = True
        self._link.wake_loop()

    def _io_close(self) -> None:
        self._link.consumers.pop(self.id, None)
        with self._lock:
            self._state = _State()
        channel, self._channel = self._channel, None
        if channel is not None and channel.is_open:
            channel.close()


@dataclass
class _DeadOutgoing(_Outgoing):
    """A dead letter: published straight into ``Q.dead`` through the default exchange."""

    dead_queue: str = ""

    @property
    def exchange(self) -> str:
        return ""

    @property
    def routing_key(self) -> str:
        return self.dead_queue

    def prepare(self, link: _Link) -> None:
        link.declare_dead(self.queue)


if TYPE_CHECKING:  # mypy proves the adapter still fits the core's protocols

    def _fits(url: str, conf: Settings) -> tuple[Broker, Consumer]:
        broker = AMQPBroker(url, conf)
        return broker, broker.consumer(["q"], prefetch=1)
