"""In-memory broker, for tests and for a producer and worker in one process.

Messages live in the broker object and are passed only between threads of one process;
each ``MemoryBroker`` object is its own store (nothing is shared at class level), so an App
and the worker it starts in-process must share the object, as
``taskframe.testing.start_worker`` does.

Connection string
=================

.. code-block::

    memory://

Features
========
* Priority: yes, 0-9, 9 most urgent (``supports_priority = True``).
* Delays, leases with ``visibility_timeout``, ``renew``, delivery counts and dead letters:
  yes, with the same semantics as the SQLite broker, so tests written against this broker
  hold on the real ones. Lease and delay times use ``time.monotonic()``.
* Envelopes are stored as bytes (``Envelope.to_bytes``), so a message that would not survive
  a real broker does not survive this one either.
* Durability: none. Messages are gone when the process ends.

Delivery guarantee
==================
At least once within the process. As with the SQLite broker, each receive issues a fresh
lease token; ack, nack and renew act only while the delivery still holds the lease, so a
late ack after the message was received again by someone else is a no-op.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from taskframe.broker import (
    DEFAULT_PRIORITY,
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
from taskframe.exceptions import MessageError

if TYPE_CHECKING:
    from taskframe.broker import Broker, Consumer
    from taskframe.settings import Settings

log = logging.getLogger(__name__)

#: Stale timer entries (from acks and renewals) tolerated before the timer heap is rebuilt,
#: as a multiple of the live message count.
TIMER_SLACK = 2


@dataclass(eq=False)
class _Message:
    id: int
    queue: str
    priority: int
    body: bytes  # Envelope.to_bytes()
    created_at: float  # UNIX time
    visible_at: float = 0.0  # time.monotonic(): ready when visible_at <= now
    deliveries: int = 0
    lease: str | None = None  # token of the receive that leased it last
    version: int = 0  # bumped on every reschedule; heap entries of older versions are stale


@dataclass(frozen=True)
class _Dead:
    id: int
    queue: str
    priority: int
    deliveries: int
    body: bytes
    reason: str
    dead_at: float  # UNIX time
    created_at: float


#: Ready heap entry: (-priority, became ready at, id, version); the smallest is delivered first.
_ReadyEntry = tuple[int, float, int, int]
#: Timer heap entry: (visible_at, id, version).
_TimerEntry = tuple[float, int, int]


class MemoryBroker:
    """The ``memory://`` broker; see the module docstring. Thread-safe."""

    supports_priority: ClassVar[bool] = True

    def __init__(self, url: str, conf: Settings) -> None:
        self.url = url
        self.visibility_timeout_s = conf.visibility_timeout
        self.max_deliveries = conf.max_deliveries
        # One condition guards all state below; receive() waits on it for publishes/requeues.
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._messages: dict[int, _Message] = {}
        self._ready: dict[str, list[_ReadyEntry]] = {}
        self._timers: list[_TimerEntry] = []
        self._dead: dict[str, dict[int, _Dead]] = {}

    def __repr__(self) -> str:
        return f"<MemoryBroker {self.url} at {id(self):#x}>"

    # -- state changes; callers hold self._cond -----------------------------------------

    def _schedule(self, message: _Message, visible_at: float, now: float) -> None:
        """Make ``message`` ready at ``visible_at``; older heap entries become stale."""
        message.visible_at = visible_at
        message.version += 1
        if visible_at <= now:
            entry = (-message.priority, visible_at, message.id, message.version)
            heapq.heappush(self._ready.setdefault(message.queue, []), entry)
        else:
            heapq.heappush(self._timers, (visible_at, message.id, message.version))
            if len(self._timers) > TIMER_SLACK * len(self._messages) + 1000:
                self._compact_timers(now)

    def _promote(self, now: float) -> None:
        """Move messages whose delay or lease has ended to their queue's ready heap."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            visible_at, message_id, version = heapq.heappop(timers)
            message = self._messages.get(message_id)
            if message is not None and message.version == version:
                entry = (-message.priority, visible_at, message_id, version)
                heapq.heappush(self._ready.setdefault(message.queue, []), entry)

    def _compact_timers(self, now: float) -> None:
        # Acked messages leave their lease timers behind until they fall due; with a long
        # visibility timeout and a fast worker, that is many entries, so drop them now.
        self._promote(now)
        self._timers = [(m.visible_at, m.id, m.version) for m in self._messages.values() if m.visible_at > now]
        heapq.heapify(self._timers)

    def _peek_ready(self, queue: str) -> _ReadyEntry | None:
        heap = self._ready.get(queue)
        while heap:
            entry = heap[0]
            message = self._messages.get(entry[2])
            if message is not None and message.version == entry[3]:
                return entry
            heapq.heappop(heap)  # acked, purged or rescheduled since it was pushed
        return None

    def _bury(self, message: _Message, reason: str) -> None:
        del self._messages[message.id]
        message.version += 1
        dead = _Dead(
            id=next(self._ids),
            queue=message.queue,
            priority=message.priority,
            deliveries=message.deliveries,
            body=message.body,
            reason=reason,
            dead_at=time.time(),
            created_at=message.created_at,
        )
        self._dead.setdefault(message.queue, {})[dead.id] = dead

    def _leased(self, tag: tuple[int, str]) -> _Message | None:
        """The message if the delivery with this tag still holds its lease."""
        message_id, token = tag
        message = self._messages.get(message_id)
        if message is None or message.lease != token:
            return None
        return message

    def _add(self, queue: str, body: bytes, delay_s: float, priority: int, now: float) -> None:
        message = _Message(next(self._ids), queue, priority, body, created_at=time.time())
        self._messages[message.id] = message
        self._schedule(message, now + max(delay_s, 0.0), now)

    # -- publishing ----------------------------------------------------------------------

    def publish(
        self,
        queue: str,
        envelope: Envelope,
        *,
        delay_s: float = 0.0,
        priority: int = DEFAULT_PRIORITY,
    ) -> None:
        check_priority(priority)
        body = envelope.to_bytes()
        with self._cond:
            self._add(queue, body, delay_s, priority, time.monotonic())
            self._cond.notify_all()

    def publish_many(self, messages: Sequence[OutgoingMessage]) -> None:
        items = [(m, check_priority(m.priority), m.envelope.to_bytes()) for m in messages]
        with self._cond:
            now = time.monotonic()
            for m, priority, body in items:
                self._add(m.queue, body, m.delay_s, priority, now)
            self._cond.notify_all()

    # -- consuming -----------------------------------------------------------------------

    def consumer(self, queues: Sequence[str], *, prefetch: int) -> MemoryConsumer:
        return MemoryConsumer(self, queues, prefetch=prefetch)

    def _claim(self, queues: Sequence[str], limit: int, token: str, buried: BuriedLog) -> list[Delivery]:
        """Lease up to ``limit`` ready messages; callers hold self._cond. What ran out of
        deliveries is dead-lettered and added to ``buried``."""
        now = time.monotonic()
        self._promote(now)
        deliveries: list[Delivery] = []
        while len(deliveries) < limit:
            best: tuple[_ReadyEntry, int] | None = None
            for index, queue in enumerate(queues):
                entry = self._peek_ready(queue)
                if entry is not None and (best is None or _ahead(entry, index, *best)):
                    best = (entry, index)
            if best is None:
                break
            heapq.heappop(self._ready[queues[best[1]]])
            delivery = self._lease(self._messages[best[0][2]], token, now, buried)
            if delivery is not None:
                deliveries.append(delivery)
        return deliveries

    def _lease(self, message: _Message, token: str, now: float, buried: BuriedLog) -> Delivery | None:
        if message.deliveries >= self.max_deliveries:
            reason = (
                f"delivered {message.deliveries} times without an ack"
                f" (max_deliveries={self.max_deliveries}): the task probably crashed its worker"
            )
            self._bury(message, reason)
            log.warning("message %s of queue %r dead-lettered: %s", message.id, message.queue, reason)
            buried.add_frame(message.body, message.queue, reason)
            return None
        try:
            envelope = Envelope.from_bytes(message.body)
        except MessageError as exc:  # cannot happen for bytes we wrote, but never loop on it
            self._bury(message, f"unreadable frame: {exc}")
            return None
        message.deliveries += 1
        message.lease = token
        self._schedule(message, now + self.visibility_timeout_s, now)
        return Delivery(envelope, message.queue, message.deliveries, (message.id, token))

    def _wait_s(self, deadline: float) -> float:
        """How long receive() may sleep: until the deadline or the next due timer."""
        now = time.monotonic()
        wait_s = deadline - now
        if self._timers:
            wait_s = min(wait_s, self._timers[0][0] - now)
        return wait_s

    # -- inspection and administration --------------------------------------------------

    def stats(self, queue: str) -> QueueStats:
        with self._cond:
            now = time.monotonic()
            ready = delayed = reserved = 0
            for message in self._messages.values():
                if message.queue != queue:
                    continue
                if message.visible_at <= now:
                    ready += 1
                elif message.lease is None:
                    delayed += 1
                else:
                    reserved += 1
            dead = len(self._dead.get(queue, ()))
        return QueueStats(queue, ready=ready, delayed=delayed, reserved=reserved, dead=dead)

    def purge(self, queue: str) -> int:
        with self._cond:
            now = time.monotonic()
            doomed = [
                m for m in self._messages.values() if m.queue == queue and (m.lease is None or m.visible_at <= now)
            ]
            for message in doomed:
                del self._messages[message.id]
                message.version += 1
            # What is left of the queue is leased, hence in the timer heap: nothing is ready.
            self._ready.pop(queue, None)
        return len(doomed)

    def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        with self._cond:
            dead = list(self._dead.get(queue, {}).values())[:limit]
        return [_dead_letter(d) for d in dead]

    def requeue_dead(self, queue: str) -> int:
        with self._cond:
            dead = self._dead.pop(queue, {})
            now = time.monotonic()
            for d in dead.values():
                message = _Message(next(self._ids), queue, d.priority, d.body, d.created_at)
                self._messages[message.id] = message
                self._schedule(message, now, now)
            self._cond.notify_all()
        return len(dead)

    def purge_dead(self, queue: str) -> int:
        with self._cond:
            return len(self._dead.pop(queue, {}))

    def close(self) -> None:
        # Nothing to release: the messages stay, as a real broker keeps them after a client
        # disconnects.
        pass


class MemoryConsumer:
    """Leases messages of a fixed list of queues from a :class:`MemoryBroker`."""

    def __init__(self, broker: MemoryBroker, queues: Sequence[str], *, prefetch: int) -> None:
        check_queues(queues)
        self.broker = broker
        self.queues = list(queues)
        self.prefetch = prefetch
        self.id = uuid.uuid4().hex[:16]
        self._receipts = itertools.count(1)
        self._closed = False
        self._buried = BuriedLog()

    def __repr__(self) -> str:
        return f"<MemoryConsumer {self.id} of {self.queues} on {self.broker!r}>"

    def take_buried(self) -> list[Buried]:
        """What this consumer dead-lettered after ``max_deliveries`` since the last call."""
        return self._buried.take()

    def receive(self, timeout_s: float, *, max_messages: int = 1) -> list[Delivery]:
        check_receive(self, closed=self._closed, max_messages=max_messages)
        broker = self.broker
        deadline = time.monotonic() + max(timeout_s, 0.0)
        token = f"{self.id}.{next(self._receipts)}"
        with broker._cond:
            while True:
                deliveries = broker._claim(self.queues, max_messages, token, self._buried)
                if deliveries:
                    return deliveries
                wait_s = broker._wait_s(deadline)
                if time.monotonic() >= deadline:
                    return []
                if wait_s > 0:
                    broker._cond.wait(wait_s)

    def ack(self, delivery: Delivery) -> None:
        broker = self.broker
        with broker._cond:
            message = broker._leased(delivery.tag)
            if message is not None:
                del broker._messages[message.id]
                message.version += 1

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Ack a batch under one lock acquisition."""
        broker = self.broker
        with broker._cond:
            for delivery in deliveries:
                message = broker._leased(delivery.tag)
                if message is not None:
                    del broker._messages[message.id]
                    message.version += 1

    def ack_and_receive(self, acks: Sequence[Delivery], timeout_s: float, *, max_messages: int = 1) -> list[Delivery]:
        """``ack_many(acks)`` then ``receive``: no round trip to save in memory, but the worker
        takes this path with the brokers that have one (taskframe.broker.AcksWithReceive), so
        tests on this broker exercise it too."""
        self.ack_many(acks)
        return self.receive(timeout_s, max_messages=max_messages)

    def nack(self, delivery: Delivery, *, requeue: bool, reason: str = "", delay_s: float = 0.0) -> None:
        broker = self.broker
        with broker._cond:
            message = broker._leased(delivery.tag)
            if message is None:
                return
            if not requeue:
                broker._bury(message, reason or "rejected by the worker")
                return
            message.lease = None
            now = time.monotonic()
            broker._schedule(message, now + max(delay_s, 0.0), now)
            broker._cond.notify_all()

    def release(self, deliveries: Sequence[Delivery]) -> None:
        """Hand back deliveries whose task never started, with the count they had before."""
        broker = self.broker
        with broker._cond:
            now = time.monotonic()
            for delivery in deliveries:
                message = broker._leased(delivery.tag)
                if message is not None:
                    message.lease = None
                    message.deliveries = max(message.deliveries - 1, 0)
                    broker._schedule(message, now, now)
            broker._cond.notify_all()

    def renew(self, deliveries: Sequence[Delivery]) -> None:
        broker = self.broker
        lost = 0
        with broker._cond:
            now = time.monotonic()
            for delivery in deliveries:
                message = broker._leased(delivery.tag)
                if message is None:
                    lost += 1
                else:
                    broker._schedule(message, now + broker.visibility_timeout_s, now)
        warn_lost_leases(log, lost, len(deliveries))

    def close(self) -> None:
        self._closed = True


def _ahead(entry: _ReadyEntry, index: int, best: _ReadyEntry, best_index: int) -> bool:
    """True when ``entry`` of queue ``index`` goes before ``best``: priority, queue order,
    then the time it became ready, then id."""
    return (entry[0], index, entry[1], entry[2]) < (best[0], best_index, best[1], best[2])


def _dead_letter(dead: _Dead) -> DeadLetter:
    try:
        envelope = Envelope.from_bytes(dead.body)
    except MessageError:
        envelope = Envelope(body=dead.body, headers={}, content_encoding="binary")
    task = envelope.headers.get("task")
    return DeadLetter(
        id=str(dead.id),
        task=str(task) if task is not None else None,
        queue=dead.queue,
        deliveries=dead.deliveries,
        reason=dead.reason,
        dead_at=dead.dead_at,
        envelope=envelope,
    )


if TYPE_CHECKING:  # mypy proves the adapter still fits the core's protocols

    def _fits(url: str, conf: Settings) -> tuple[Broker, Consumer]:
        broker = MemoryBroker(url, conf)
        return broker, broker.consumer(["q"], prefetch=1)
