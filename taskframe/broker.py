"""The broker interface that every module in ``taskframe.brokers`` implements.

A broker is only a transport of :class:`Envelope` objects between named queues; the App owns
tasks, settings and serialization. Every adapter gives the same guarantees, proved by
``tests/conformance/test_broker.py``:

- publishing creates the queue if needed, and published messages are durable where the
  broker has the notion;
- a message is removed only by :meth:`Consumer.ack`; a delivery that is neither acked nor
  renewed comes back after ``visibility_timeout`` seconds (a lease);
- each delivery counts; a message delivered more than ``max_deliveries`` times goes to the
  queue's dead-letter store instead of to a consumer;
- ``delay_s`` is held by the broker, never by a consumer's memory;
- priority 0-9, 9 most urgent, where ``supports_priority`` is true.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from .exceptions import BrokerError, MessageError

#: The lowest and highest priority; 9 is the most urgent, on every broker.
MIN_PRIORITY, MAX_PRIORITY = 0, 9
#: Priority of a message published without one: the middle, so users can go either way.
DEFAULT_PRIORITY = 4


def check_priority(priority: int) -> int:
    """Return ``priority`` if it is an integer from 0 to 9, else raise ValueError."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        msg = f"priority must be an integer from 0 to 9 (9 most urgent); got {priority!r}"
        raise ValueError(msg)
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        msg = f"priority {priority} is out of range: use 0 to 9 (9 most urgent)"
        raise ValueError(msg)
    return priority


def check_queues(queues: Sequence[str]) -> None:
    """The argument check every ``Broker.consumer`` makes."""
    if not queues:
        msg = "a consumer needs at least one queue name"
        raise ValueError(msg)


def check_receive(consumer: object, *, closed: bool, max_messages: int) -> None:
    """The argument checks every ``Consumer.receive`` makes before touching its broker."""
    if max_messages < 1:
        msg = f"max_messages must be at least 1; got {max_messages}"
        raise ValueError(msg)
    if closed:
        msg = f"{consumer!r} is closed; create a new consumer"
        raise BrokerError(msg)


#: Why a lease renewal usually misses (the adapters that know better say so).
LEASE_LOST_BECAUSE = "expired and received by another consumer, or acked"


def warn_lost_leases(log: logging.Logger, lost: int, total: int, because: str = LEASE_LOST_BECAUSE) -> None:
    """The one warning every ``Consumer.renew`` gives when some of its leases were gone,
    on the adapter's own logger (users filter by it)."""
    if lost:
        log.warning("%d of %d leases had been lost (%s); those messages may run twice", lost, total, because)


@dataclass(frozen=True)
class Envelope:
    """What a broker carries: a serialized body plus headers and properties, framed as AMQP does.

    Brokers that store one blob per message use :meth:`to_bytes` / :meth:`from_bytes`, which
    write the JSON envelope kombu's virtual transports use, so the layout stays familiar.
    """

    body: bytes
    headers: Mapping[str, Any]
    properties: Mapping[str, Any] = field(default_factory=dict)
    content_type: str = "application/json"
    content_encoding: str = "utf-8"

    @property
    def task_id(self) -> str | None:
        """The task id, where the headers carry one (protocol v2) or the properties do."""
        task_id = self.headers.get("id") or self.properties.get("correlation_id")
        return str(task_id) if task_id else None

    def to_bytes(self) -> bytes:
        if self.content_encoding == "binary":
            body, body_encoding = base64.b64encode(self.body).decode("ascii"), "base64"
        else:
            body, body_encoding = self.body.decode(self.content_encoding), "identity"
        return json.dumps(
            {
                "body": body,
                "content-encoding": self.content_encoding,
                "content-type": self.content_type,
                "headers": dict(self.headers),
                "properties": {**self.properties, "body_encoding": body_encoding},
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Envelope:
        """Parse :meth:`to_bytes` output; raise :class:`MessageError` on anything else."""
        try:
            frame = json.loads(raw)
            properties = dict(frame.get("properties") or {})
            body_encoding = properties.pop("body_encoding", "identity")
            encoding = frame.get("content-encoding", "utf-8")
            text = frame["body"]
            body = base64.b64decode(text) if body_encoding == "base64" else text.encode(encoding)
            return cls(
                body=body,
                headers=dict(frame.get("headers") or {}),
                properties=properties,
                content_type=frame.get("content-type", "application/json"),
                content_encoding=encoding,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            msg = f"not a taskframe envelope ({type(exc).__name__}: {exc}); first bytes: {raw[:60]!r}"
            raise MessageError(msg) from exc


@dataclass
class Delivery:
    """One received message, leased to the consumer that received it until acked or nacked.

    Attributes:
        envelope: the message; its ``body`` may be garbage if the producer was buggy.
        queue: the queue it came from.
        deliveries: how many times it has been delivered, this time included (1 = first).
        tag: the adapter's own handle (a row id, a delivery tag, a receipt handle).
    """

    envelope: Envelope
    queue: str
    deliveries: int
    tag: Any


@dataclass(frozen=True)
class QueueStats:
    """Message counts of one queue. ``reserved`` are leased to consumers and not yet acked."""

    queue: str
    ready: int
    delayed: int
    reserved: int
    dead: int


@dataclass(frozen=True)
class DeadLetter:
    """A message in a queue's dead-letter store."""

    id: str
    task: str | None
    queue: str
    deliveries: int
    reason: str
    dead_at: float  # UNIX time
    envelope: Envelope


@dataclass(frozen=True)
class Buried:
    """A message a consumer dead-lettered by itself while receiving: its ``max_deliveries``
    ran out (see :class:`ReportsBuried`)."""

    envelope: Envelope
    queue: str
    reason: str


class BuriedLog:
    """What a consumer dead-lettered by itself, kept until ``take_buried`` (see
    :class:`ReportsBuried`); thread-safe, as leases may run out on another thread."""

    def __init__(self) -> None:
        self._items: list[Buried] = []
        self._lock = threading.Lock()

    def add(self, envelope: Envelope, queue: str, reason: str) -> None:
        with self._lock:
            self._items.append(Buried(envelope, queue, reason))

    def add_frame(self, frame: bytes, queue: str, reason: str) -> None:
        """``add`` of a stored frame; one that cannot be read has no task id to report."""
        try:
            envelope = Envelope.from_bytes(frame)
        except MessageError:
            return
        self.add(envelope, queue, reason)

    def extend(self, other: BuriedLog) -> None:
        items = other.take()
        with self._lock:
            self._items += items

    def take(self) -> list[Buried]:
        with self._lock:
            items, self._items = self._items, []
        return items


@dataclass(frozen=True)
class OutgoingMessage:
    """One item of :meth:`Broker.publish_many`."""

    queue: str
    envelope: Envelope
    delay_s: float = 0.0
    priority: int = DEFAULT_PRIORITY


@runtime_checkable
class Consumer(Protocol):
    """Receives from a fixed set of queues on behalf of one worker."""

    def receive(self, timeout_s: float, *, max_messages: int = 1) -> list[Delivery]:
        """Lease up to ``max_messages`` ready messages, most urgent first, queues in order.

        Block at most ``timeout_s`` when nothing is ready, then return an empty list (an idle
        tick lets the worker check for stop). Messages whose count would pass
        ``max_deliveries`` go to the dead-letter store instead and are not returned.
        """
        ...

    def ack(self, delivery: Delivery) -> None:
        """Remove the message for good. Must be idempotent (a redelivered copy may exist)."""
        ...

    def nack(self, delivery: Delivery, *, requeue: bool, reason: str = "", delay_s: float = 0.0) -> None:
        """Give the message back: ``requeue=True`` makes it ready again (after ``delay_s``);
        ``requeue=False`` moves it to the dead-letter store with ``reason``."""
        ...

    def renew(self, deliveries: Sequence[Delivery]) -> None:
        """Extend the lease of each delivery to ``visibility_timeout`` seconds from now.

        May be called from another thread than :meth:`receive`; an adapter whose client is
        not thread-safe must hand the call to its own thread.
        """
        ...

    def close(self) -> None:
        """Stop receiving. Unacked deliveries come back when their lease ends."""
        ...


@runtime_checkable
class BatchAcker(Protocol):
    """Optional: a consumer that can remove several messages in one round trip.

    The worker acks a finished batch with :func:`ack_all`, which uses ``ack_many`` where a
    consumer has it. Same obligations as :meth:`Consumer.ack` for each delivery (idempotent;
    a delivery whose lease ended and was handed to someone else must not delete the new copy).
    """

    def ack_many(self, deliveries: Sequence[Delivery]) -> None: ...


@runtime_checkable
class AcksWithReceive(Protocol):
    """Optional: a consumer that can ack a finished batch and receive the next in one round trip.

    ``ack_and_receive(acks, t, max_messages=n)`` is ``ack_many(acks)`` then ``receive(t,
    max_messages=n)``, with the acks applied first; the worker uses it for the acks of the
    tasks that finished just before it asks for more. When it raises, the acks may not have
    been applied: the caller acks them again (acks are idempotent).
    """

    def ack_and_receive(
        self, acks: Sequence[Delivery], timeout_s: float, *, max_messages: int = 1
    ) -> list[Delivery]: ...


@runtime_checkable
class ReportsBuried(Protocol):
    """Optional: a consumer that says which messages it dead-lettered by itself because their
    ``max_deliveries`` ran out (the task crashed its worker each time, or its leases kept
    running out). The worker stores each one's result as FAILURE (``DeliveryLimitExceeded``),
    so ``get()`` does not wait for a task that will never run. ``take_buried()`` returns
    those since the last call and forgets them; a message whose frame cannot be read is not
    reported (it has no readable task id). SQS moves them by its own redrive policy, unseen."""

    def take_buried(self) -> list[Buried]: ...


@runtime_checkable
class ReleasesUnstarted(Protocol):
    """Optional: a consumer that can hand back deliveries whose task has not started without
    counting them toward ``max_deliveries``. A worker's warm shutdown releases what it had
    prefetched: a rolling restart must not use up a message's deliveries (and dead-letter
    it) without ever running it. Each delivery goes back to its queue as ``nack(requeue=True)``
    puts it, with the count it had before it was received. SQS counts receives itself and
    cannot take one back, so it has no ``release``: its hand-backs count."""

    def release(self, deliveries: Sequence[Delivery]) -> None: ...


@runtime_checkable
class FramePublisher(Protocol):
    """Optional: a broker that keeps messages as their :meth:`Envelope.to_bytes` frames can
    take a batch already framed: ``publish_frames({(queue, priority): [(task_id, frame), ...]})``
    is ``publish_many`` of those envelopes with no delay, in order per queue and priority. The
    App uses it for a ``send_many`` of plain calls, which it frames from a template without
    building envelopes."""

    def publish_frames(self, batches: Mapping[tuple[str, int], Sequence[tuple[str, bytes]]]) -> None: ...


def ack_all(consumer: Consumer, deliveries: Sequence[Delivery]) -> None:
    """Ack ``deliveries``: one ``ack_many`` call where the consumer supports it, else one by one."""
    if not deliveries:
        return
    if len(deliveries) > 1 and isinstance(consumer, BatchAcker):
        consumer.ack_many(deliveries)
        return
    for delivery in deliveries:
        consumer.ack(delivery)


@runtime_checkable
class Broker(Protocol):
    """A transport of envelopes between named queues.

    Adapters are built by the registry as ``BrokerClass(url, conf)`` where ``conf`` is the
    App's :class:`taskframe.settings.Settings`; they read ``visibility_timeout``,
    ``max_deliveries``, ``broker_connect_timeout`` and ``broker_options`` from it.
    A broker object must survive ``os.fork()``: a child process reconnects on first use.
    """

    #: True when priority orders delivery on this broker.
    supports_priority: ClassVar[bool]

    def publish(
        self,
        queue: str,
        envelope: Envelope,
        *,
        delay_s: float = 0.0,
        priority: int = DEFAULT_PRIORITY,
    ) -> None:
        """Store the message durably before returning; it becomes ready after ``delay_s``."""
        ...

    def publish_many(self, messages: Sequence[OutgoingMessage]) -> None:
        """Publish several messages, as one round trip where the broker allows."""
        ...

    def consumer(self, queues: Sequence[str], *, prefetch: int) -> Consumer:
        """A consumer of ``queues`` (earlier queues first on ties) holding at most ``prefetch``
        unacked deliveries where the broker enforces it. Must raise
        :class:`~taskframe.exceptions.BrokerConnectionError` when the broker cannot be reached
        (the worker's reconnection loop relies on it to back off)."""
        ...

    def stats(self, queue: str) -> QueueStats: ...

    def purge(self, queue: str) -> int:
        """Delete the ready and delayed messages of ``queue``; return how many."""
        ...

    def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]: ...

    def requeue_dead(self, queue: str) -> int:
        """Move every dead letter of ``queue`` back to it, with a fresh delivery count."""
        ...

    def purge_dead(self, queue: str) -> int: ...

    def close(self) -> None: ...
