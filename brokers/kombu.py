"""Any kombu transport as a taskframe broker, laid out exactly as Celery 5 lays out its queues.

Connection string
=================

.. code-block::

    kombu+redis://[:password@]host:6379/0        kombu's Redis transport (Celery's "redis://")
    kombu+amqp://guest:guest@host:5672//         py-amqp (Celery's "amqp://")
    kombu+memory://                              kombu's in-process transport (tests only)

Everything after ``kombu+`` is a kombu URL. ``broker_options`` become kombu's
``transport_options`` (``visibility_timeout`` defaults to the App's ``visibility_timeout``;
``confirm_publish`` defaults to true on AMQP), plus ``polling_interval``: the seconds an idle
``receive`` sleeps between polls (default 0.1).

Topology (Celery wire compatibility)
====================================
For a queue ``Q``: a durable direct exchange ``Q`` and a durable queue ``Q`` bound with routing
key ``Q``: what a Celery app with default settings declares, so ``celery worker -Q Q`` runs
what taskframe publishes and the other way round. On Redis that is the list ``Q`` (plus
``Q\\x06\\x163``, ``...6``, ``...9`` for priorities) and the set ``_kombu.binding.Q``. Messages
are protocol v2 as Celery sends them: the envelope's headers as message headers,
``correlation_id`` = task id, ``reply_to``, ``delivery_mode`` 2 (persistent), a ``priority``,
the envelope's content type and encoding, the body untouched. Two more queues per ``Q``,
declared the same way: ``Q.delay`` (delayed messages, below) and ``Q.dead`` (dead letters).

Priority
========
taskframe's 9 is the most urgent. kombu's Redis transport pops priority 0 first, so a message
goes out with ``9 - priority`` there; AMQP (and memory) take it as is (RabbitMQ orders only
queues declared with ``x-max-priority``, which Celery does not declare by default, so priority
is sent but ignored there). Redis keeps Celery's default ``priority_steps`` [0, 3, 6, 9] so a
Celery worker still sees every message: taskframe 9-7, 6-4, 3-1 and 0 are four levels, each
FIFO. That is coarser than the contract's ten levels, hence ``supports_priority = False``.

Receiving
=========
``receive`` polls its queues in order with ``basic_get`` (``Queue.get``), up to
``max_messages``, sleeping ``polling_interval`` between empty polls. Not ``drain_events``
with a kombu Consumer: on Redis that keeps a ``BRPOP`` in flight after ``receive`` returns,
and a message it pops then sits in the client's socket, in no queue and under no lease (lost
if the worker dies, late if it is busy); ``basic_get`` holds exactly what it returned, so
``prefetch`` is not needed. The cost: an idle consumer polls (on Redis, one ``RPOP`` per
priority step and queue every 0.1 s), and each message costs kombu's round trips.

Leases and delivery counts
==========================
kombu-redis moves a fetched message into the ``unacked`` hash (scored in ``unacked_index``)
and puts it back, marked ``redelivered``, once it is older than ``visibility_timeout``: every
consumer of this adapter runs that sweep (``restore_visible``) while it polls, at most every
quarter lease. ``renew`` rescores the delivery in ``unacked_index``. Caveats: the hash is shared
by every kombu client of the Redis database, so they must all use the same
``visibility_timeout``; and the fetch is not atomic (RPOP, then a MULTI into the hash): a crash
between the two loses that message. Other transports keep no lease: on AMQP an unacked
message comes back when its connection closes (a dead worker's at once), on memory never. There
this adapter keeps the lease in the process: a delivery neither acked nor renewed for
``visibility_timeout`` is handed back (a copy with the count raised, then an ack of the
original) by the next poll of any consumer of the same broker object; ``renew`` moves its
deadline, with no network call. RabbitMQ's ``consumer_timeout`` still applies.

Counts travel in the header ``x-taskframe-deliveries`` (deliveries before this one). A nack
with requeue publishes a copy with the count raised and acks the original. A message that
comes back ``redelivered`` (lease ran out, worker crashed) is republished at the tail with its
count raised before anyone runs it, so it gets a new delivery tag: a late ack, renew or nack
of the old delivery does nothing (the message may run twice, never gets lost). A message whose
next delivery would pass ``max_deliveries``, or nacked without requeue, is published to
``Q.dead`` with ``x-taskframe-reason``, ``x-taskframe-dead-at`` and its count.

Delays
======
kombu has no delays; Celery publishes a countdown at once with its ``eta`` header and its
worker holds the message unacked in memory until due (on Redis a countdown longer than
``visibility_timeout`` then runs twice). Two routes, so Celery and taskframe both work:

* a task message with an ``eta`` header (what the App sends for a countdown) is published to
  ``Q`` at once, exactly as Celery does, so a Celery worker honours it; a taskframe consumer
  that fetches a message more than ``EARLY_ETA_S`` before its ``eta`` (from either side)
  does not return it: it moves it to ``Q.delay``. This also ends the loop of a worker
  sending an early message back to ``Q`` again and again;
* ``delay_s`` without an ``eta`` header, and ``nack`` with ``delay_s``, go to ``Q.delay``.

``Q.delay`` messages carry the due time in ``x-taskframe-due``. A consumer of ``Q`` fetches
them (they are leased like any message), holds the early ones unacked, renewing their lease
while it polls, and at the due time publishes them to ``Q`` and acks the held copy. So a
delay is never held only in a worker's memory beyond a lease: if the worker dies, or stops
polling for a lease, the message goes back to ``Q.delay`` (Redis) or when the connection
closes (AMQP). Delays are only as punctual as some consumer of ``Q`` polling; a consumer
holds at most ``MAX_HELD_DELAYS``, and looks at ``Q.delay`` once per ``polling_interval``.

Stats, purge, dead letters
==========================
Ready and dead counts are the transport's queue sizes (Redis: list lengths over the priority
levels; AMQP: a passive ``queue_declare``). ``reserved`` is exact on Redis (the ``unacked``
entries routed to ``Q``; one ``HVALS`` of the whole hash, so it costs more as it grows) and
counts this process's deliveries elsewhere; ``delayed`` adds ``Q.delay`` and delays held by
consumers (any process's on Redis, this process's elsewhere); ``purge`` deletes those too.
``dead_letters`` reads the Redis lists without removing anything; elsewhere it fetches and
returns them by closing a channel (order may change on the memory transport).

Threads and processes
=====================
kombu connections are not thread-safe: one connection and channel per broker object and
process, every call under one lock (``renew`` from the worker's keeper thread included); no
call sleeps holding it. A forked child opens its own connection on first use. A lost
connection raises :class:`~taskframe.exceptions.BrokerConnectionError` and is reopened on the
next call.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

import kombu
import kombu.exceptions
import kombu.transport

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
)
from taskframe.exceptions import BrokerConnectionError, BrokerError, ConfigurationError
from taskframe.message import parse_isoformat
from taskframe.settings import mask_url

if TYPE_CHECKING:
    from taskframe.settings import Settings

#: kombu's classes carry no annotations (mypy --strict refuses untyped calls), so they are Any here.
kombu_api: Any = kombu

HEADER_DELIVERIES = "x-taskframe-deliveries"
HEADER_DUE = "x-taskframe-due"
HEADER_REASON = "x-taskframe-reason"
HEADER_DEAD_AT = "x-taskframe-dead-at"
HEADER_PROPERTIES = "x-taskframe-properties"
#: Headers kombu adds on its own (kombu-redis marks restored messages): never part of an envelope.
KOMBU_HEADERS = frozenset({"redelivered", "compression"})
#: Seconds an idle receive sleeps between polls, unless broker_options sets ``polling_interval``.
POLLING_INTERVAL_S = 0.1
#: Seconds before its eta a message counts as early, and is parked in ``Q.delay`` instead of delivered.
EARLY_ETA_S = 0.05
#: Most delayed messages one consumer holds unacked while waiting for their due time.
MAX_HELD_DELAYS = 1000
#: Transports whose priority 0 is the most urgent (kombu maps Celery's priority steps there).
REVERSED_PRIORITY_DRIVERS = frozenset({"redis"})


def _delay_queue(queue: str) -> str:
    return f"{queue}.delay"


def _dead_queue(queue: str) -> str:
    return f"{queue}.dead"


def _kombu_queue(name: str) -> Any:
    """The queue Celery declares for ``name``: durable direct exchange ``name``, routing key ``name``."""
    return kombu_api.Queue(name, kombu_api.Exchange(name, type="direct", durable=True), routing_key=name, durable=True)


def _split_url(url: str) -> str:
    """The kombu URL inside ``kombu+<url>``; a ConfigurationError when kombu cannot use it."""
    scheme, sep, rest = url.partition("+")
    transport = urlsplit(rest).scheme if "://" in rest else ""
    if scheme != "kombu" or not sep or not transport:
        msg = f"kombu broker URL {mask_url(url)!r} must look like 'kombu+redis://host:6379/0'"
        raise ConfigurationError(msg)
    try:
        kombu.transport.resolve_transport(transport)
    except KeyError:
        known = ", ".join(sorted(kombu.transport.TRANSPORT_ALIASES))
        msg = f"kombu has no transport {transport!r} (in {mask_url(url)!r}); known: {known}"
        raise ConfigurationError(msg) from None
    return rest


def _connection_errors(url: str, kombu_url: str) -> tuple[type[BaseException], ...]:
    """What the transport raises when its server cannot be reached (and kombu's own such errors)."""
    try:
        transport_errors = tuple(kombu_api.Connection(kombu_url).connection_errors)
    except ImportError as exc:
        msg = f"kombu's transport for {mask_url(url)!r} needs a client library that is missing: {exc}"
        raise ConfigurationError(msg) from None
    errors: tuple[type[BaseException], ...] = (kombu.exceptions.OperationalError, OSError, *transport_errors)
    return errors


def _eta_of(envelope: Envelope) -> float | None:
    """The UNIX time of a protocol v2 ``eta`` header (Celery's countdown), or None."""
    eta = envelope.headers.get("eta")
    if not isinstance(eta, str) or not eta:
        return None
    try:
        return parse_isoformat(eta).timestamp()
    except ValueError:
        return None  # the worker reports a malformed eta; the broker only routes


def _describe(exc: BaseException) -> str:
    name, text = type(exc).__name__, str(exc) or repr(exc)
    return text if text.startswith(name) else f"{name}: {text}"


# -- messages -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outgoing:
    """One message to publish on kombu: its queue, envelope, the adapter's own headers, priority."""

    queue: str
    envelope: Envelope
    priority: int = DEFAULT_PRIORITY
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: Seconds from the moment it is sent (not from when it was built: declaring may take a while).
    delay_s: float = 0.0


def _properties_from(properties: Mapping[str, Any], reverse_priority: bool) -> dict[str, Any]:
    """The envelope properties a kombu message implies, priority back on taskframe's scale."""
    out: dict[str, Any] = {"correlation_id": properties.get("correlation_id"), "reply_to": properties.get("reply_to")}
    priority = properties.get("priority")
    if isinstance(priority, int):
        out["priority"] = MAX_PRIORITY - priority if reverse_priority else priority
    out["delivery_mode"] = properties.get("delivery_mode", 2)
    return out


def _envelope_of(message: Any, reverse_priority: bool) -> tuple[Envelope, dict[str, Any]]:
    """The envelope of a received kombu message, and the adapter's own ``x-taskframe-*`` headers."""
    headers = dict(message.headers or {})
    ours = {k: headers.pop(k) for k in list(headers) if k.startswith("x-taskframe-")}
    for name in KOMBU_HEADERS & headers.keys():
        headers.pop(name)
    carried = ours.get(HEADER_PROPERTIES)
    properties = dict(carried) if isinstance(carried, dict) else _properties_from(message.properties, reverse_priority)
    body = message.body
    envelope = Envelope(
        body=body.encode() if isinstance(body, str) else bytes(body or b""),
        headers=headers,
        properties=properties,
        content_type=message.content_type or "application/json",
        content_encoding=message.content_encoding or "utf-8",
    )
    return envelope, ours


def _dead_letter(queue: str, message: Any, reverse_priority: bool) -> DeadLetter:
    envelope, ours = _envelope_of(message, reverse_priority)
    task = envelope.headers.get("task")
    return DeadLetter(
        id=str(envelope.task_id or message.delivery_tag),
        task=str(task) if task is not None else None,
        queue=queue,
        deliveries=int(ours.get(HEADER_DELIVERIES) or 0),
        reason=str(ours.get(HEADER_REASON) or ""),
        dead_at=float(ours.get(HEADER_DEAD_AT) or 0),
        envelope=envelope,
    )


# -- the connection of one process ----------------------------------------------------------------


class _Link:
    """One kombu connection and channel, owned by one process; every call under the broker's lock."""

    def __init__(self, broker: KombuBroker) -> None:
        self.broker = broker
        self.pid = os.getpid()
        self.connection: Any = kombu_api.Connection(
            broker.kombu_url,
            transport_options=dict(broker.transport_options),
            connect_timeout=broker.connect_timeout,
        )
        self.connection.connect()
        self.channel: Any = self.connection.channel()
        self.producer: Any = kombu_api.Producer(self.channel)
        self.reverse_priority = self.connection.transport.driver_type in REVERSED_PRIORITY_DRIVERS
        self.is_redis = self.reverse_priority and hasattr(self.channel, "unacked_key")
        self.is_virtual = hasattr(self.channel, "_size")
        self.declared: set[str] = set()
        self.last_restore = 0.0

    def close(self) -> None:
        try:
            self.channel.close()
        finally:
            self.connection.release()

    def declare(self, name: str) -> Any:
        bound = _kombu_queue(name).bind(self.channel)
        if name not in self.declared:
            bound.declare()
            self.declared.add(name)
        return bound

    def publish(self, out: _Outgoing) -> None:
        envelope = out.envelope
        headers = {k: v for k, v in envelope.headers.items() if k not in KOMBU_HEADERS}
        headers.update(out.extra)
        kombu_priority = MAX_PRIORITY - out.priority if self.reverse_priority else out.priority
        properties: dict[str, Any] = {"delivery_mode": 2, "priority": kombu_priority}
        if envelope.task_id:
            properties["correlation_id"] = envelope.task_id
        reply_to = envelope.properties.get("reply_to")
        if reply_to is not None:
            properties["reply_to"] = str(reply_to)
        implied = {**properties, "reply_to": reply_to}
        if _properties_from(implied, self.reverse_priority) != dict(envelope.properties):
            headers[HEADER_PROPERTIES] = dict(envelope.properties)
        self.declare(out.queue)
        if out.delay_s > 0:
            headers[HEADER_DUE] = time.time() + out.delay_s
        self.producer.publish(
            envelope.body,
            exchange=out.queue,
            routing_key=out.queue,
            headers=headers,
            content_type=envelope.content_type,
            content_encoding=envelope.content_encoding,
            retry=False,
            **properties,
        )

    def get(self, name: str) -> Any:
        """Fetch one message of queue ``name`` unacked, or None."""
        return self.declare(name).get(no_ack=False, accept=None)

    def size(self, name: str) -> int:
        if self.is_virtual:
            return int(self.channel._size(name))
        channel = self.connection.channel()  # a failed passive declare closes its channel
        try:
            _, count, _ = channel.queue_declare(queue=name, passive=True)
            return int(count)
        except self.connection.channel_errors:
            return 0
        finally:
            channel.close()

    def purge(self, name: str) -> int:
        if self.is_virtual:
            return int(self.channel._purge(name)) if self.channel._has_queue(name) else 0
        return int(self.declare(name).purge() or 0)

    # Redis specifics: the unacked hash is where kombu-redis keeps leases.

    def restore_expired(self, every_s: float) -> None:
        """Put back every kombu-redis delivery older than ``visibility_timeout`` (any client's)."""
        now = time.monotonic()
        if self.is_redis and now - self.last_restore >= every_s:
            self.last_restore = now
            self.channel.qos.restore_visible(num=1000, interval=1)

    def holds(self, tag: str) -> bool:
        """Whether a delivery still holds its lease (Redis; elsewhere only the connection knows)."""
        if not self.is_redis:
            return True
        return bool(self.channel.client.hexists(self.channel.unacked_key, tag))

    def renew(self, tag: str) -> bool:
        if not self.is_redis:
            return True
        changed = self.channel.client.zadd(self.channel.unacked_index_key, {tag: time.time()}, xx=True, ch=True)
        return bool(changed)

    def drop_unacked(self, routing_key: str) -> int:
        """Delete the kombu-redis deliveries routed to ``routing_key`` (leases included); how many."""
        if not self.is_redis:
            return 0
        client, index_key, dropped = self.channel.client, self.channel.unacked_index_key, 0
        for tag, raw in client.hgetall(self.channel.unacked_key).items():
            try:
                _, _, key = json.loads(raw)
            except (ValueError, TypeError):
                continue
            if key == routing_key:
                client.pipeline().zrem(index_key, tag).hdel(self.channel.unacked_key, tag).execute()
                dropped += 1
        return dropped

    def unacked_routes(self) -> Counter[str]:
        """How many kombu-redis deliveries are unacked, per routing key."""
        routes: Counter[str] = Counter()
        for raw in self.channel.client.hvals(self.channel.unacked_key):
            try:
                _, _, routing_key = json.loads(raw)
            except (ValueError, TypeError):
                continue
            routes[str(routing_key)] += 1
        return routes

    def browse(self, name: str, limit: int) -> list[Any]:
        """Up to ``limit`` messages of ``name``, oldest first, left in place."""
        if self.is_redis:
            channel, found = self.channel, []
            for pri in channel.priority_steps:
                key = channel._q_for_pri(name, pri)
                for raw in reversed(channel.client.lrange(key, -limit, -1)):  # kombu LPUSHes, pops the right
                    found.append(channel.Message(json.loads(raw), channel=channel))
                if len(found) >= limit:
                    break
            return found[:limit]
        channel = self.connection.channel()  # on AMQP, closing it without acks puts them back in order
        try:
            found = []
            queue = _kombu_queue(name).bind(channel)
            while len(found) < limit and (message := queue.get(no_ack=False, accept=None)) is not None:
                found.append(message)
            if self.is_virtual:  # kombu's memory transport restores nothing at close: put them back
                for message in found:
                    message.requeue()
            return found
        finally:
            channel.close()


# -- the broker -----------------------------------------------------------------------------------


class KombuBroker:
    """Queues on any kombu transport, declared as Celery declares them (see the module docstring)."""

    supports_priority: ClassVar[bool] = False

    def __init__(self, url: str, conf: Settings) -> None:
        self.url = url
        self.kombu_url = _split_url(url)
        options = dict(conf.broker_options)
        self.polling_interval_s = float(options.get("polling_interval", POLLING_INTERVAL_S))
        options.setdefault("visibility_timeout", conf.visibility_timeout)
        if urlsplit(self.kombu_url).scheme in ("amqp", "amqps", "pyamqp"):
            options.setdefault("confirm_publish", True)
        self.transport_options = options
        self.visibility_timeout = float(options["visibility_timeout"])
        self.max_deliveries = conf.max_deliveries
        self.connect_timeout = conf.broker_connect_timeout or None
        self.connection_errors = _connection_errors(url, self.kombu_url)
        self.lock = threading.RLock()
        self.generation = 0
        self._link: _Link | None = None
        self._parents: list[_Link] = []  # a forked child's copies of its parent's link, never used
        #: Deliveries this process's consumers hold, by kombu delivery tag.
        self.leases: dict[str, _Lease] = {}
        #: Delayed messages this process's consumers hold until due, by kombu delivery tag.
        self.delays: dict[str, _HeldDelay] = {}

    def __repr__(self) -> str:
        return f"KombuBroker({mask_url(self.url)!r})"

    @contextmanager
    def io(self, what: str) -> Iterator[_Link]:
        """The link of this process, under the lock; connection failures become BrokerConnectionError."""
        with self.lock:
            link = self._link
            if link is not None and link.pid != os.getpid():
                self._parents.append(link)  # the parent's sockets: never used nor closed here
                self._forget_holdings()  # the parent's deliveries are the parent's to settle
                link = self._link = None
            try:
                if link is None:
                    self.generation += 1
                    link = self._link = _Link(self)
                yield link
            except self.connection_errors as exc:
                self._drop()
                msg = f"{self!r}: {what} failed: {mask_url(_describe(exc))}; is the broker running and reachable?"
                raise BrokerConnectionError(msg) from exc

    def _forget_holdings(self) -> None:
        """Leases and held delays die with their connection: a new one must not hand back copies."""
        self.leases.clear()
        self.delays.clear()

    def _drop(self) -> None:
        self._forget_holdings()
        link, self._link = self._link, None
        if link is not None:
            # Forget the broken sockets without a goodbye; a broken connection may fail in any way here.
            with contextlib.suppress(Exception):
                link.connection.collect()

    def close(self) -> None:
        with self.lock:
            self._forget_holdings()
            link, self._link = self._link, None
            if link is not None and link.pid == os.getpid():
                try:
                    link.close()
                except (kombu.exceptions.KombuError, OSError, *link.connection.connection_errors):
                    pass

    # publishing

    def publish(
        self, queue: str, envelope: Envelope, *, delay_s: float = 0.0, priority: int = DEFAULT_PRIORITY
    ) -> None:
        self.publish_many([OutgoingMessage(queue, envelope, delay_s=delay_s, priority=priority)])

    def publish_many(self, messages: Sequence[OutgoingMessage]) -> None:
        for m in messages:
            check_priority(m.priority)
        outgoing = [self.outgoing(m.queue, m.envelope, m.priority, delay_s=m.delay_s) for m in messages]
        if outgoing:
            with self.io("publish") as link:
                for out in outgoing:
                    link.publish(out)

    @staticmethod
    def outgoing(
        queue: str, envelope: Envelope, priority: int, *, delay_s: float = 0.0, deliveries: int = 0
    ) -> _Outgoing:
        extra: dict[str, Any] = {HEADER_DELIVERIES: deliveries} if deliveries else {}
        # A task message with an eta goes to Q at once, as Celery sends a countdown, so Celery
        # workers (which hold it until due) see it; a taskframe consumer parks it (KombuConsumer._admit).
        if delay_s > 0 and _eta_of(envelope) is None:
            return _Outgoing(_delay_queue(queue), envelope, priority, extra, delay_s=delay_s)
        return _Outgoing(queue, envelope, priority, extra)

    def consumer(self, queues: Sequence[str], *, prefetch: int) -> KombuConsumer:
        check_queues(queues)
        with self.io("connect"):
            pass  # fail here, where the worker's reconnection loop expects it
        return KombuConsumer(self, queues)

    # inspection

    def stats(self, queue: str) -> QueueStats:
        with self.io("stats") as link:
            ready = link.size(queue)
            delayed = link.size(_delay_queue(queue))
            dead = link.size(_dead_queue(queue))
            if link.is_redis:
                routes = link.unacked_routes()
                reserved, delayed = routes[queue], delayed + routes[_delay_queue(queue)]
            else:
                reserved = sum(1 for lease in self.leases.values() if lease.queue == queue)
                delayed += sum(1 for held in self.delays.values() if held.queue == queue)
        return QueueStats(queue=queue, ready=ready, delayed=delayed, reserved=reserved, dead=dead)

    def purge(self, queue: str) -> int:
        with self.io("purge") as link:
            # Delays a consumer holds are unacked entries on Redis: deleting them is what stops their release.
            delays = _delay_queue(queue)
            return link.purge(queue) + link.purge(delays) + link.drop_unacked(delays) + self._drop_held(link, queue)

    def _drop_held(self, link: _Link, queue: str) -> int:
        """Ack the delays of ``queue`` consumers hold, where no unacked hash says who holds what."""
        if link.is_redis:
            return 0  # drop_unacked did it; their consumers notice at the due time
        dropped = [tag for tag, held in self.delays.items() if held.queue == queue]
        for tag in dropped:
            self.delays.pop(tag).message.ack()
        return len(dropped)

    def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        if limit < 1:
            return []
        with self.io("dead_letters") as link:
            return [_dead_letter(queue, m, link.reverse_priority) for m in link.browse(_dead_queue(queue), limit)]

    def requeue_dead(self, queue: str) -> int:
        moved = 0
        with self.io("requeue_dead") as link:
            while (message := link.get(_dead_queue(queue))) is not None:
                envelope, _ = _envelope_of(message, link.reverse_priority)
                priority = _priority_of(envelope)
                link.publish(self.outgoing(queue, envelope, priority))
                message.ack()
                moved += 1
        return moved

    def purge_dead(self, queue: str) -> int:
        with self.io("purge_dead") as link:
            return link.purge(_dead_queue(queue))


def _priority_of(envelope: Envelope) -> int:
    """The taskframe priority an envelope asks for (its properties), DEFAULT_PRIORITY when none fits."""
    priority = envelope.properties.get("priority")
    if isinstance(priority, int) and not isinstance(priority, bool) and 0 <= priority <= MAX_PRIORITY:
        return priority
    return DEFAULT_PRIORITY


# -- the consumer ---------------------------------------------------------------------------------


@dataclass
class _Tag:
    """Delivery.tag: the kombu message, and the connection generation it came on."""

    message: Any
    generation: int


@dataclass
class _Lease:
    """A delivery a consumer of this process holds; ``deadline`` (monotonic) counts where kombu has no lease."""

    message: Any
    queue: str
    envelope: Envelope
    deliveries: int
    deadline: float


@dataclass
class _HeldDelay:
    owner: KombuConsumer
    message: Any
    queue: str
    due: float  # UNIX time
    renewed_at: float  # monotonic


class KombuConsumer:
    """Polls its queues with ``basic_get`` (exactly ``max_messages``, nothing buffered)."""

    def __init__(self, broker: KombuBroker, queues: Sequence[str]) -> None:
        self.broker = broker
        self.queues = list(queues)
        self.closed = False
        self.delays_checked_at = 0.0  # monotonic
        self._buried = BuriedLog()

    def take_buried(self) -> list[Buried]:
        """What this consumer dead-lettered after ``max_deliveries`` since the last call."""
        return self._buried.take()

    def __repr__(self) -> str:
        return f"KombuConsumer({mask_url(self.broker.url)!r}, {self.queues!r})"

    def receive(self, timeout_s: float, *, max_messages: int = 1) -> list[Delivery]:
        check_receive(self, closed=self.closed, max_messages=max_messages)
        deadline = time.monotonic() + timeout_s
        while True:
            with self.broker.io("receive") as link:
                deliveries = self._poll(link, max_messages)
                next_due = min((h.due for h in self._held()), default=None)
            if deliveries:
                return deliveries
            now = time.monotonic()
            if now >= deadline:
                return []
            pause = min(self.broker.polling_interval_s, deadline - now)
            if next_due is not None:
                pause = max(0.0, min(pause, next_due - time.time()))
            time.sleep(pause)

    def _poll(self, link: _Link, max_messages: int) -> list[Delivery]:
        lease_s = self.broker.visibility_timeout
        link.restore_expired(every_s=min(1.0, lease_s / 4))
        if not link.is_redis:
            self._expire_leases(link)
        self._tend_delays(link)
        deliveries: list[Delivery] = []
        for queue in self.queues:
            while len(deliveries) < max_messages:
                message = link.get(queue)
                if message is None:
                    break
                delivery = self._admit(link, queue, message)
                if delivery is not None:
                    deliveries.append(delivery)
        return deliveries

    def _admit(self, link: _Link, queue: str, message: Any) -> Delivery | None:
        """The delivery of a fetched message, or None when it was republished or dead-lettered."""
        envelope, ours = _envelope_of(message, link.reverse_priority)
        before = int(ours.get(HEADER_DELIVERIES) or 0)
        redelivered = bool((message.delivery_info or {}).get("redelivered"))
        if redelivered:
            before += 1  # the delivery that ended without an ack: its lease ran out, or its worker died
        max_deliveries = self.broker.max_deliveries
        if before + 1 > max_deliveries:
            reason = f"delivered {before} times without an ack (max_deliveries={max_deliveries})"
            self._bury(link, queue, message, envelope, before, reason)
            self._buried.add(envelope, queue, reason)
            return None
        if redelivered:  # at the tail with the count raised, and a new delivery tag
            link.publish(self.broker.outgoing(queue, envelope, _priority_of(envelope), deliveries=before))
            message.ack()
            return None
        eta = _eta_of(envelope)
        early_s = eta - time.time() if eta is not None else 0.0
        if early_s > EARLY_ETA_S:  # a countdown sent to Q (by Celery, or by us): park it in Q.delay
            extra = {HEADER_DELIVERIES: before} if before else {}
            link.publish(_Outgoing(_delay_queue(queue), envelope, _priority_of(envelope), extra, delay_s=early_s))
            message.ack()
            return None
        deadline = time.monotonic() + self.broker.visibility_timeout
        self.broker.leases[message.delivery_tag] = _Lease(message, queue, envelope, before + 1, deadline)
        return Delivery(envelope, queue, before + 1, _Tag(message, self.broker.generation))

    def _bury(self, link: _Link, queue: str, message: Any, envelope: Envelope, deliveries: int, reason: str) -> None:
        extra = {HEADER_DELIVERIES: deliveries, HEADER_REASON: reason, HEADER_DEAD_AT: time.time()}
        link.publish(_Outgoing(_dead_queue(queue), envelope, _priority_of(envelope), extra))
        message.ack()

    def _expire_leases(self, link: _Link) -> None:
        """Hand back the deliveries of every consumer of this broker whose lease ran out (where kombu
        keeps no lease itself): a copy with the count raised, then an ack of the original."""
        now, leases = time.monotonic(), self.broker.leases
        for tag in [tag for tag, lease in leases.items() if lease.deadline <= now]:
            lease = leases.pop(tag)
            if lease.message.acknowledged:
                continue
            max_deliveries = self.broker.max_deliveries
            if lease.deliveries >= max_deliveries:
                reason = f"delivered {lease.deliveries} times without an ack (max_deliveries={max_deliveries})"
                self._bury(link, lease.queue, lease.message, lease.envelope, lease.deliveries, reason)
                self._buried.add(lease.envelope, lease.queue, reason)
            else:
                priority = _priority_of(lease.envelope)
                link.publish(self.broker.outgoing(lease.queue, lease.envelope, priority, deliveries=lease.deliveries))
                lease.message.ack()

    # delays

    def _tend_delays(self, link: _Link) -> None:
        """Release due delays to their queue, renew the held ones, and fetch new ones from ``Q.delay``."""
        lease_s, now = self.broker.visibility_timeout, time.monotonic()
        for held in self._held():
            tag = held.message.delivery_tag
            if link.is_redis and now - held.renewed_at > lease_s * 0.8:  # kombu may have put it back
                self._forget_delay(tag)
            elif held.due <= time.time():
                self._release(link, tag)
            elif now - held.renewed_at > lease_s / 3:
                if link.renew(tag):
                    held.renewed_at = now
                else:
                    self._forget_delay(tag)
        # New delays need not be seen at once (only their due time matters), and an empty Q.delay
        # costs a round trip per priority step on Redis: look once per polling interval.
        if now - self.delays_checked_at < self.broker.polling_interval_s:
            return
        self.delays_checked_at = now
        room = MAX_HELD_DELAYS - len(self._held())
        for queue in self.queues:
            while room > 0 and (message := link.get(_delay_queue(queue))) is not None:
                due = float((message.headers or {}).get(HEADER_DUE) or 0)
                tag = message.delivery_tag
                self.broker.delays[tag] = _HeldDelay(self, message, queue, due, time.monotonic())
                room -= 1
                if due <= time.time():
                    self._release(link, tag)

    def _held(self) -> list[_HeldDelay]:
        return [held for held in self.broker.delays.values() if held.owner is self]

    def _release(self, link: _Link, tag: str) -> None:
        held = self.broker.delays[tag]
        if not link.holds(tag):  # purged, or put back by kombu after its lease
            self._forget_delay(tag)
            return
        envelope, ours = _envelope_of(held.message, link.reverse_priority)
        deliveries = int(ours.get(HEADER_DELIVERIES) or 0)
        link.publish(self.broker.outgoing(held.queue, envelope, _priority_of(envelope), deliveries=deliveries))
        held.message.ack()
        self._forget_delay(tag)

    def _forget_delay(self, tag: str) -> None:
        self.broker.delays.pop(tag, None)

    # settling

    def _settle(
        self, delivery: Delivery, action: Callable[[_Link, Any], None], what: str, *, check_lease: bool = True
    ) -> None:
        """Run ``action`` on the delivery's message if this delivery still holds it. ``check_lease``
        asks the broker too (Redis: kombu may have put it back); an ack needs no check, as
        acking a message kombu put back deletes nothing."""
        tag = delivery.tag
        if not isinstance(tag, _Tag):
            msg = f"{delivery!r} was not received by a kombu consumer"
            raise BrokerError(msg)
        with self.broker.io(what) as link:
            lease = self.broker.leases.get(tag.message.delivery_tag)
            if lease is None or lease.message is not tag.message or tag.generation != self.broker.generation:
                return  # settled already, handed back, or its connection is gone (and so is the lease)
            del self.broker.leases[tag.message.delivery_tag]
            if not tag.message.acknowledged and (not check_lease or link.holds(tag.message.delivery_tag)):
                action(link, tag.message)

    def ack(self, delivery: Delivery) -> None:
        self._settle(delivery, lambda link, message: message.ack(), "ack", check_lease=False)

    def nack(self, delivery: Delivery, *, requeue: bool, reason: str = "", delay_s: float = 0.0) -> None:
        if requeue:
            self._settle(delivery, self._put_back(delivery, delivery.deliveries, delay_s), "nack")
            return

        def bury(link: _Link, message: Any) -> None:
            self._bury(link, delivery.queue, message, delivery.envelope, delivery.deliveries, reason or "nacked")

        self._settle(delivery, bury, "nack")

    def release(self, deliveries: Sequence[Delivery]) -> None:
        """Hand back deliveries whose task never started: republished with the count they had
        before this delivery (the original acked), as a requeue is."""
        for delivery in deliveries:
            self._settle(delivery, self._put_back(delivery, delivery.deliveries - 1, 0.0), "release")

    def _put_back(self, delivery: Delivery, deliveries: int, delay_s: float) -> Callable[[_Link, Any], None]:
        """The settle action of a requeue: a copy with ``deliveries`` recorded, then the original acked."""

        def put_back(link: _Link, message: Any) -> None:
            envelope = delivery.envelope
            queue, priority = delivery.queue, _priority_of(envelope)
            link.publish(self.broker.outgoing(queue, envelope, priority, delay_s=delay_s, deliveries=deliveries))
            message.ack()

        return put_back

    def renew(self, deliveries: Sequence[Delivery]) -> None:
        with self.broker.io("renew") as link:
            now = time.monotonic()
            for delivery in deliveries:
                tag = delivery.tag
                lease = self.broker.leases.get(tag.message.delivery_tag) if isinstance(tag, _Tag) else None
                if lease is not None and lease.message is tag.message:
                    lease.deadline = now + self.broker.visibility_timeout
                    link.renew(tag.message.delivery_tag)
            for held in self._held():  # the keeper thread keeps held delays too
                if link.renew(held.message.delivery_tag):
                    held.renewed_at = now

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with self.broker.lock:
            link = self.broker._link
            for held in self._held():
                tag = held.message.delivery_tag
                if link is not None and link.pid == os.getpid():
                    try:
                        held.message.requeue()  # back to Q.delay now, not at the end of a lease
                    except (kombu.exceptions.KombuError, OSError, *link.connection.connection_errors):
                        pass
                self._forget_delay(tag)


def _fits(url: str, conf: Settings) -> tuple[Any, Any]:
    """Type check only: KombuBroker and KombuConsumer satisfy the protocols."""
    from taskframe.broker import Broker, Consumer

    broker: Broker = KombuBroker(url, conf)
    consumer: Consumer = broker.consumer(["q"], prefetch=1)
    return broker, consumer
