"""The broker contract (DESIGN.md section 5), run against every adapter in ``brokers.py``.

Each test uses a fresh queue name, so adapters backed by a shared service (Redis, RabbitMQ)
cannot see another test's messages. Lease and delay tests scale with the adapter's
``lease_s``; the settings used here are ``visibility_timeout=lease_s, max_deliveries=3``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from taskframe.broker import (
    AcksWithReceive,
    Broker,
    Consumer,
    Delivery,
    Envelope,
    FramePublisher,
    OutgoingMessage,
    ReleasesUnstarted,
    ReportsBuried,
)
from taskframe.exceptions import BrokerError, ConfigurationError
from taskframe.registry import create_broker
from taskframe.settings import Settings

from .brokers import BROKERS, BrokerSpec

CHILD = Path(__file__).with_name("_broker_child.py")

MakeBroker = Callable[..., Broker]


# -- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture(params=[pytest.param(s, id=s.name, marks=s.marks) for s in BROKERS])
def broker_spec(request: pytest.FixtureRequest) -> BrokerSpec:
    spec: BrokerSpec = request.param
    reason = spec.unavailable()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return spec


@pytest.fixture
def broker_url(broker_spec: BrokerSpec, tmp_path: Path) -> str:
    return broker_spec.make_url(tmp_path)


@pytest.fixture
def make_broker(broker_spec: BrokerSpec, broker_url: str) -> Iterator[MakeBroker]:
    """Build a broker on the test's URL; keyword arguments override the test settings."""
    made: list[Broker] = []

    def make(**overrides: Any) -> Broker:
        values: dict[str, Any] = {"visibility_timeout": broker_spec.lease_s, "max_deliveries": 3}
        settings = Settings(broker_url=broker_url, **{**values, **overrides})
        broker = create_broker(broker_url, settings)
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.close()


@pytest.fixture
def broker(make_broker: MakeBroker) -> Broker:
    return make_broker()


@pytest.fixture
def queue() -> str:
    return f"tf-test-{uuid.uuid4().hex[:12]}"


def requires_processes(spec: BrokerSpec) -> None:
    if not spec.crosses_processes:
        pytest.skip(f"{spec.name}: crosses_processes=False (its queues live in one process)")


def message(label: str, task: str = "tests.conformance.task") -> Envelope:
    """A small protocol-v2-like envelope; ``label`` comes back as ``envelope.task_id``."""
    return Envelope(body=b"[[1, 2], {}, {}]", headers={"task": task, "id": label, "lang": "py"})


def labels(deliveries: list[Delivery]) -> list[str | None]:
    return [d.envelope.task_id for d in deliveries]


def receive_one(consumer: Consumer, timeout_s: float = 3.0) -> Delivery:
    deliveries = consumer.receive(timeout_s)
    assert len(deliveries) == 1, f"expected one delivery within {timeout_s}s, got {deliveries}"
    return deliveries[0]


def counts(broker: Broker, queue: str) -> tuple[int, int, int, int]:
    stats = broker.stats(queue)
    return stats.ready, stats.delayed, stats.reserved, stats.dead


# -- publish, receive, ack --------------------------------------------------------------


def test_round_trip_preserves_the_envelope(broker: Broker, queue: str) -> None:
    # Given envelopes with a non-ASCII text body, a binary body, headers and properties
    text = Envelope(
        body='[[1, "é"], {"k": null}, {"chain": null}]'.encode(),
        headers={"task": "tasks.add", "id": "t-1", "retries": 2, "timelimit": [None, 5.5]},
        properties={"correlation_id": "t-1", "reply_to": "r", "priority": 7, "delivery_mode": 2},
    )
    binary = Envelope(
        body=bytes(range(256)),
        headers={"task": "tasks.raw", "id": "t-2"},
        content_type="application/x-msgpack",
        content_encoding="binary",
    )
    # When they are published and received
    broker.publish(queue, text)
    broker.publish(queue, binary)
    deliveries = broker.consumer([queue], prefetch=2).receive(3.0, max_messages=2)
    # Then they come back equal, from the right queue, on their first delivery
    assert [d.envelope for d in deliveries] == [text, binary]
    assert [(d.queue, d.deliveries) for d in deliveries] == [(queue, 1), (queue, 1)]
    assert deliveries[0].envelope.task_id == "t-1"


def test_ack_removes_the_message(broker: Broker, queue: str) -> None:
    broker.publish(queue, message("a"))
    consumer = broker.consumer([queue], prefetch=1)
    delivery = receive_one(consumer)
    assert counts(broker, queue) == (0, 0, 1, 0)

    consumer.ack(delivery)
    consumer.ack(delivery)  # idempotent

    assert counts(broker, queue) == (0, 0, 0, 0)
    assert consumer.receive(0.1) == []


def test_ack_and_receive_acks_the_batch_then_leases_the_next(broker: Broker, queue: str) -> None:
    # The optional AcksWithReceive (taskframe.broker): what a worker does between batches.
    consumer = broker.consumer([queue], prefetch=2)
    if not isinstance(consumer, AcksWithReceive):
        pytest.skip(f"{type(consumer).__name__} has no ack_and_receive (optional)")
    for label in "abc":
        broker.publish(queue, message(label))
    first = consumer.receive(3.0, max_messages=2)
    assert len(first) == 2

    second = consumer.ack_and_receive(first, 3.0, max_messages=2)

    assert sorted(labels(first + second)) == ["a", "b", "c"]
    assert counts(broker, queue) == (0, 0, 1, 0)  # the first batch is gone, "c" is leased
    started = time.monotonic()
    assert consumer.ack_and_receive(second, 0.2, max_messages=2) == []  # waits like receive
    assert time.monotonic() - started >= 0.15
    assert counts(broker, queue) == (0, 0, 0, 0)
    assert consumer.ack_and_receive([], 0.0) == []


def test_publish_many(broker: Broker, queue: str) -> None:
    other = queue + "-other"
    broker.publish_many(
        [
            OutgoingMessage(queue, message("a")),
            OutgoingMessage(queue, message("b"), priority=9),
            OutgoingMessage(queue, message("later"), delay_s=60),
            OutgoingMessage(other, message("c")),
        ]
    )
    broker.publish_many([])  # a no-op, not an error

    assert counts(broker, queue) == (2, 1, 0, 0)
    assert counts(broker, other) == (1, 0, 0, 0)
    deliveries = broker.consumer([queue], prefetch=5).receive(1.0, max_messages=5)
    if type(broker).supports_priority:
        assert labels(deliveries) == ["b", "a"]
    else:  # no priority, and SQS standard queues promise no order either
        assert sorted(labels(deliveries)) == ["a", "b"]
    broker.purge(queue)
    broker.purge(other)


def test_publish_frames_delivers_the_envelopes_framed(broker: Broker, queue: str) -> None:
    # The optional FramePublisher (taskframe.broker): envelopes given as their frames.
    if not isinstance(broker, FramePublisher):
        pytest.skip(f"{type(broker).__name__} has no publish_frames (optional)")
    other = queue + "-other"
    envelopes = {label: message(label) for label in ("a", "b", "c", "d")}

    def frames(*labels: str) -> list[tuple[str, bytes]]:
        return [(label, envelopes[label].to_bytes()) for label in labels]

    broker.publish_frames({(queue, 4): frames("a", "b"), (queue, 9): frames("c"), (other, 4): frames("d")})

    assert counts(broker, queue) == (3, 0, 0, 0)
    deliveries = broker.consumer([queue], prefetch=5).receive(1.0, max_messages=5)
    if type(broker).supports_priority:
        assert labels(deliveries) == ["c", "a", "b"]
    assert {d.envelope.task_id: d.envelope for d in deliveries} == {k: envelopes[k] for k in "abc"}
    [d_other] = broker.consumer([other], prefetch=1).receive(1.0)
    assert d_other.envelope == envelopes["d"]
    with pytest.raises(ValueError, match="priority"):
        broker.publish_frames({(queue, 10): frames("a")})
    broker.purge(other)


def test_priority_out_of_range_is_refused_before_anything_is_sent(broker: Broker, queue: str) -> None:
    for bad in (10, -1, "9", 4.5, True):
        with pytest.raises(ValueError, match="priority"):
            broker.publish(queue, message("x"), priority=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="0 to 9"):
        broker.publish_many([OutgoingMessage(queue, message("ok")), OutgoingMessage(queue, message("x"), priority=12)])
    assert counts(broker, queue) == (0, 0, 0, 0)


# -- receive: waiting, batching, order ----------------------------------------------------


def test_receive_waits_for_its_timeout_when_empty(broker: Broker, queue: str) -> None:
    consumer = broker.consumer([queue], prefetch=1)
    started = time.monotonic()
    assert consumer.receive(0.3) == []
    elapsed_s = time.monotonic() - started
    assert 0.28 <= elapsed_s < 1.5, f"receive(0.3) returned after {elapsed_s:.3f}s"


def test_receive_wakes_up_when_a_message_arrives(broker: Broker, queue: str) -> None:
    # Given a consumer blocked on an empty queue
    consumer = broker.consumer([queue], prefetch=1)
    publisher = threading.Timer(0.2, broker.publish, args=(queue, message("late")))
    started = time.monotonic()
    publisher.start()
    try:
        # When another thread publishes, Then it gets the message promptly, not at the timeout
        delivery = receive_one(consumer, timeout_s=10.0)
    finally:
        publisher.join()
    elapsed_s = time.monotonic() - started
    assert delivery.envelope.task_id == "late"
    assert elapsed_s < 1.0, f"took {elapsed_s:.3f}s to notice a message published after 0.2s"


def test_receive_respects_max_messages(broker: Broker, queue: str) -> None:
    broker.publish_many([OutgoingMessage(queue, message(str(i))) for i in range(5)])
    consumer = broker.consumer([queue], prefetch=10)

    first = consumer.receive(1.0, max_messages=3)
    rest = consumer.receive(1.0, max_messages=10)

    assert labels(first) == ["0", "1", "2"]
    assert labels(rest) == ["3", "4"]
    with pytest.raises(ValueError, match="max_messages"):
        consumer.receive(0.1, max_messages=0)


def test_most_urgent_first_and_fifo_within_a_priority(broker: Broker, queue: str) -> None:
    if not type(broker).supports_priority:
        pytest.skip(f"{type(broker).__name__}.supports_priority is False")
    # Given priorities 0-9 in shuffled order, and three messages of one priority after them
    priorities = list(range(10))
    random.Random(7).shuffle(priorities)
    for p in priorities:
        broker.publish(queue, message(f"p{p}"), priority=p)
    for name in ("fifo-1", "fifo-2", "fifo-3"):
        broker.publish(queue, message(name), priority=9)
    consumer = broker.consumer([queue], prefetch=1)
    # When they are received one at a time
    received = [receive_one(consumer).envelope.task_id for _ in range(13)]
    # Then 9 comes first, in publish order among equals, and 0 last
    assert received == ["p9", "fifo-1", "fifo-2", "fifo-3"] + [f"p{p}" for p in range(8, -1, -1)]


def test_earlier_queues_first_on_ties(broker: Broker, queue: str) -> None:
    if not type(broker).supports_priority:
        pytest.skip(f"{type(broker).__name__}.supports_priority is False")
    high, low = queue + "-a", queue + "-b"
    consumer = broker.consumer([high, low], prefetch=1)
    # Given the second queue was published to first, with the same priority
    broker.publish(low, message("low-4"), priority=4)
    broker.publish(high, message("high-4"), priority=4)
    broker.publish(low, message("low-9"), priority=9)
    # Then priority wins across queues, and on a tie the earlier queue wins
    assert [receive_one(consumer).queue for _ in range(3)] == [low, high, low]


# -- nack, leases, renew ----------------------------------------------------------------


def test_nack_requeue_makes_it_ready_again(broker: Broker, queue: str) -> None:
    broker.publish(queue, message("a"))
    consumer = broker.consumer([queue], prefetch=1)

    consumer.nack(receive_one(consumer), requeue=True)

    assert counts(broker, queue) == (1, 0, 0, 0)
    again = receive_one(consumer, timeout_s=1.0)
    assert (again.envelope.task_id, again.deliveries) == ("a", 2)
    consumer.ack(again)


def test_release_hands_back_without_counting_the_delivery(broker_spec: BrokerSpec, broker: Broker, queue: str) -> None:
    # Given a consumer holding a delivery whose task never started
    broker.publish(queue, message("a"))
    consumer = broker.consumer([queue], prefetch=1)
    assert isinstance(consumer, ReleasesUnstarted) == broker_spec.releases_unstarted
    if not isinstance(consumer, ReleasesUnstarted):
        pytest.skip(f"{broker_spec.name} counts every receive itself: no release")
    first = receive_one(consumer)
    assert first.deliveries == 1
    # When it is released, three times over
    for _ in range(3):
        consumer.release([first])
        assert counts(broker, queue)[0] == 1
        first = receive_one(consumer, timeout_s=2.0)
        # Then it is ready again each time, and still on its first delivery
        assert (first.envelope.task_id, first.deliveries) == ("a", 1)
    # And a release of a delivery the consumer no longer holds changes nothing
    consumer.ack(first)
    consumer.release([first])
    assert counts(broker, queue) == (0, 0, 0, 0)


def test_nack_requeue_with_delay(broker: Broker, queue: str) -> None:
    broker.publish(queue, message("a"))
    consumer = broker.consumer([queue], prefetch=1)

    consumer.nack(receive_one(consumer), requeue=True, delay_s=0.5)
    nacked_at = time.monotonic()

    assert counts(broker, queue) == (0, 1, 0, 0)
    assert consumer.receive(0.2) == []
    again = receive_one(consumer, timeout_s=3.0)
    waited_s = time.monotonic() - nacked_at
    assert 0.45 <= waited_s < 1.5, f"came back after {waited_s:.3f}s; the delay was 0.5s"
    assert again.deliveries == 2


def test_nack_without_requeue_dead_letters_with_the_reason(broker: Broker, queue: str) -> None:
    sent = message("a", task="tasks.broken")
    broker.publish(queue, sent)
    consumer = broker.consumer([queue], prefetch=1)

    consumer.nack(receive_one(consumer), requeue=False, reason="unknown task 'tasks.broken'")

    assert counts(broker, queue) == (0, 0, 0, 1)
    [dead] = broker.dead_letters(queue)
    assert (dead.task, dead.queue, dead.deliveries) == ("tasks.broken", queue, 1)
    assert dead.reason == "unknown task 'tasks.broken'"
    assert dead.envelope == sent
    assert abs(dead.dead_at - time.time()) < 60
    assert consumer.receive(0.1) == []


def test_unacked_delivery_comes_back_after_the_visibility_timeout(
    broker_spec: BrokerSpec, broker: Broker, queue: str
) -> None:
    lease_s = broker_spec.lease_s
    broker.publish(queue, message("a"))
    consumer = broker.consumer([queue], prefetch=1)
    # Given a delivery that is neither acked nor renewed
    first = receive_one(consumer)
    received_at = time.monotonic()
    # Then nobody gets it while the lease lasts
    assert consumer.receive(lease_s / 3) == []
    # And it comes back once the lease ends, counted as a second delivery
    again = receive_one(consumer, timeout_s=lease_s * 4 + 1)
    waited_s = time.monotonic() - received_at
    assert lease_s * 0.9 <= waited_s < lease_s + 1.0, f"came back after {waited_s:.3f}s"
    assert (again.envelope.task_id, first.deliveries, again.deliveries) == ("a", 1, 2)
    consumer.ack(again)
    assert counts(broker, queue) == (0, 0, 0, 0)


def test_renew_keeps_a_delivery_from_coming_back(broker_spec: BrokerSpec, broker: Broker, queue: str) -> None:
    lease_s = broker_spec.lease_s
    broker.publish(queue, message("long-task"))
    holder = broker.consumer([queue], prefetch=1)
    delivery = receive_one(holder)
    # Given a thread that renews the lease every quarter lease, as a worker does
    stop = threading.Event()
    errors: list[BaseException] = []

    def renew_until_stopped() -> None:
        try:
            while not stop.wait(lease_s / 4):
                holder.renew([delivery])
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    renewer = threading.Thread(target=renew_until_stopped)
    renewer.start()
    try:
        # When another consumer polls for 2.5 leases, Then it never gets the message
        other = broker.consumer([queue], prefetch=1)
        deadline = time.monotonic() + lease_s * 2.5
        while time.monotonic() < deadline:
            assert other.receive(lease_s / 5) == [], "a renewed delivery came back"
    finally:
        stop.set()
        renewer.join()
    assert errors == []
    holder.ack(delivery)
    assert counts(broker, queue) == (0, 0, 0, 0)


def test_late_ack_does_not_delete_another_consumers_copy(broker_spec: BrokerSpec, broker: Broker, queue: str) -> None:
    lease_s = broker_spec.lease_s
    broker.publish(queue, message("a"))
    slow, fast = broker.consumer([queue], prefetch=1), broker.consumer([queue], prefetch=1)
    # Given a delivery to `slow` whose lease ran out, and that `fast` received again
    stale = receive_one(slow)
    current = receive_one(fast, timeout_s=lease_s * 4 + 1)
    assert current.deliveries == 2
    # When `slow` finishes late and acks, renews or nacks its stale delivery
    slow.ack(stale)
    slow.renew([stale])
    slow.nack(stale, requeue=True)
    slow.nack(stale, requeue=False, reason="late")
    # Then `fast` still holds the message: it may run twice, but it is never lost
    assert counts(broker, queue) == (0, 0, 1, 0)
    fast.ack(current)
    assert counts(broker, queue) == (0, 0, 0, 0)


def test_stale_delivery_of_the_same_consumer_does_not_ack_the_current_one(
    broker_spec: BrokerSpec, broker: Broker, queue: str
) -> None:
    broker.publish(queue, message("a"))
    consumer = broker.consumer([queue], prefetch=1)
    # Given one consumer that received the message twice (the first lease ran out)
    stale = receive_one(consumer)
    current = receive_one(consumer, timeout_s=broker_spec.lease_s * 4 + 1)
    # When it acks the stale delivery, Then the current lease is untouched
    consumer.ack(stale)
    assert counts(broker, queue) == (0, 0, 1, 0)
    consumer.ack(current)
    assert counts(broker, queue) == (0, 0, 0, 0)


def test_late_ack_after_the_lease_ran_out_still_deletes_if_nobody_took_it(
    broker_spec: BrokerSpec, broker: Broker, queue: str
) -> None:
    # The work is done and no other consumer holds the message, so deleting it is safe and
    # saves a second run.
    if not broker_spec.late_ack_deletes:
        pytest.skip(f"{broker_spec.name}: late_ack_deletes=False (the lease's end already handed a copy back)")
    broker.publish(queue, message("a"))
    consumer = broker.consumer([queue], prefetch=1)
    delivery = receive_one(consumer)
    time.sleep(broker_spec.lease_s * 1.2)
    assert counts(broker, queue) == (1, 0, 0, 0)

    consumer.ack(delivery)

    assert counts(broker, queue) == (0, 0, 0, 0)


# -- delays, dead letters, purge, stats ---------------------------------------------------


def test_delayed_message_is_ready_only_after_its_delay(broker: Broker, queue: str) -> None:
    broker.publish(queue, message("later"), delay_s=0.6)
    published_at = time.monotonic()
    consumer = broker.consumer([queue], prefetch=1)

    assert counts(broker, queue) == (0, 1, 0, 0)
    assert consumer.receive(0.2) == []
    # Nothing is committed while this receive waits: the broker must notice the due time.
    delivery = receive_one(consumer, timeout_s=3.0)
    waited_s = time.monotonic() - published_at
    assert 0.55 <= waited_s < 1.6, f"received after {waited_s:.3f}s; the delay was 0.6s"
    assert delivery.envelope.task_id == "later"


def test_dead_letter_after_max_deliveries_then_requeue_and_purge(
    broker_spec: BrokerSpec, make_broker: MakeBroker, queue: str
) -> None:
    lease_s = broker_spec.lease_s
    broker = make_broker(max_deliveries=2)
    sent = message("crasher", task="tasks.crash")
    broker.publish(queue, sent)
    consumer = broker.consumer([queue], prefetch=1)
    # Given a message whose worker dies twice (its leases run out)
    assert receive_one(consumer).deliveries == 1
    assert receive_one(consumer, timeout_s=lease_s * 4 + 1).deliveries == 2
    # When its lease runs out again, Then it goes to the dead letters instead of a third run
    assert consumer.receive(lease_s * 2.5) == []
    assert counts(broker, queue) == (0, 0, 0, 1)
    [dead] = broker.dead_letters(queue)
    assert (dead.task, dead.queue, dead.deliveries, dead.envelope) == ("tasks.crash", queue, 2, sent)
    assert "max_deliveries=2" in dead.reason
    # And the consumer says so, once, so the worker can store the task's FAILURE
    assert isinstance(consumer, ReportsBuried) == broker_spec.reports_buried
    if broker_spec.reports_buried:
        [buried] = cast(ReportsBuried, consumer).take_buried()
        assert (buried.envelope, buried.queue) == (sent, queue)
        assert "max_deliveries=2" in buried.reason
        assert cast(ReportsBuried, consumer).take_buried() == []

    # When it is requeued, Then it runs again with a fresh count, and can be acked
    assert broker.requeue_dead(queue) == 1
    assert counts(broker, queue) == (1, 0, 0, 0)
    again = receive_one(consumer)
    assert (again.envelope, again.deliveries) == (sent, 1)
    consumer.ack(again)
    assert counts(broker, queue) == (0, 0, 0, 0)

    # And purge_dead empties the dead letters
    broker.publish(queue, message("bad"))
    consumer.nack(receive_one(consumer), requeue=False, reason="bad")
    assert broker.purge_dead(queue) == 1
    assert broker.dead_letters(queue) == []
    assert counts(broker, queue) == (0, 0, 0, 0)


def test_dead_letters_respects_limit(broker: Broker, queue: str) -> None:
    consumer = broker.consumer([queue], prefetch=3)
    broker.publish_many([OutgoingMessage(queue, message(str(i))) for i in range(3)])
    for delivery in consumer.receive(1.0, max_messages=3):
        consumer.nack(delivery, requeue=False, reason="test")

    assert [d.envelope.task_id for d in broker.dead_letters(queue, limit=2)] == ["0", "1"]
    assert broker.purge_dead(queue) == 3


def test_purge_removes_ready_and_delayed_but_not_reserved(broker_spec: BrokerSpec, broker: Broker, queue: str) -> None:
    broker.publish_many([OutgoingMessage(queue, message(str(i))) for i in range(3)])
    broker.publish(queue, message("delayed"), delay_s=60)
    consumer = broker.consumer([queue], prefetch=1)
    reserved = receive_one(consumer)

    assert broker.purge(queue) == 3

    if broker_spec.purge_keeps_reserved:  # SQS's PurgeQueue deletes in-flight messages too
        assert counts(broker, queue) == (0, 0, 1, 0)
    consumer.ack(reserved)  # a no-op where the purge took it
    assert counts(broker, queue) == (0, 0, 0, 0)
    assert broker.purge(queue) == 0


def test_stats_count_ready_delayed_reserved_and_dead(broker: Broker, queue: str) -> None:
    broker.publish_many([OutgoingMessage(queue, message(str(i))) for i in range(4)])
    broker.publish(queue, message("delayed"), delay_s=60)
    consumer = broker.consumer([queue], prefetch=2)
    first, second = consumer.receive(1.0, max_messages=2)
    consumer.nack(second, requeue=False, reason="test")

    stats = broker.stats(queue)

    assert (stats.queue, stats.ready, stats.delayed, stats.reserved, stats.dead) == (queue, 2, 1, 1, 1)
    assert counts(broker, queue + "-unknown") == (0, 0, 0, 0)
    consumer.ack(first)
    broker.purge(queue)
    broker.purge_dead(queue)


def test_threads_share_a_broker_without_duplicates(broker: Broker, queue: str) -> None:
    # Given 400 messages and four consumer threads on one broker object
    broker.publish_many([OutgoingMessage(queue, message(str(i))) for i in range(400)])
    seen: list[str | None] = []
    lock = threading.Lock()

    def drain() -> None:
        consumer = broker.consumer([queue], prefetch=5)
        while deliveries := consumer.receive(0.3, max_messages=5):
            for delivery in deliveries:
                consumer.ack(delivery)
            with lock:
                seen.extend(labels(deliveries))

    threads = [threading.Thread(target=drain) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then every message was received exactly once
    assert sorted(seen, key=int) == [str(i) for i in range(400)]  # type: ignore[arg-type]
    assert counts(broker, queue) == (0, 0, 0, 0)


# -- across broker objects and processes -------------------------------------------------


def test_messages_outlive_the_broker_object_that_published_them(
    broker_spec: BrokerSpec, make_broker: MakeBroker, queue: str
) -> None:
    requires_processes(broker_spec)
    # Given messages, one delayed, published through a broker object that is then closed
    producer = make_broker()
    producer.publish(queue, message("now"))
    producer.publish(queue, message("soon"), delay_s=0.3)
    producer.close()
    # When a fresh broker object (a new connection) consumes the same URL
    consumer = make_broker().consumer([queue], prefetch=1)
    # Then both messages are there, the delayed one when due
    assert receive_one(consumer).envelope.task_id == "now"
    assert receive_one(consumer, timeout_s=3.0).envelope.task_id == "soon"


def test_forked_child_reconnects_and_leaves_the_parent_connection_alone(
    broker_spec: BrokerSpec, broker: Broker, queue: str
) -> None:
    requires_processes(broker_spec)
    broker.publish(queue, message("parent"))  # the parent now has an open connection
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() when threads exist; this child runs no threads.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: publish through the inherited object, never run pytest code
        code = 1
        try:
            broker.publish(queue, message("child"))
            broker.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's connection still works after the child used and closed its own
    consumer = broker.consumer([queue], prefetch=2)
    assert labels(consumer.receive(3.0, max_messages=2)) == ["parent", "child"]


def run_child(url: str, settings: dict[str, Any], *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, str(CHILD), url, json.dumps(settings), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_messages_of_a_killed_consumer_come_back(
    broker_spec: BrokerSpec, broker_url: str, broker: Broker, queue: str
) -> None:
    requires_processes(broker_spec)
    lease_s = broker_spec.lease_s
    broker.publish(queue, message("survivor"))
    # Given a consumer process that received the message and then hangs
    child = run_child(broker_url, {"visibility_timeout": lease_s}, "hold", queue)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.split() == ["received", "survivor", "1"], child.stderr and child.stderr.read()
        if broker_spec.counts_others_reserved:  # AMQP reports no unacked counts without its management API
            assert counts(broker, queue) == (0, 0, 1, 0)
        # When it is killed with SIGKILL (no cleanup, no nack)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
    # Then its message is delivered here once the lease runs out, as a second delivery
    delivery = receive_one(broker.consumer([queue], prefetch=1), timeout_s=lease_s * 4 + 2)
    assert (delivery.envelope.task_id, delivery.deliveries) == ("survivor", 2)


def test_concurrent_producer_and_consumer_processes_lose_and_duplicate_nothing(
    broker_spec: BrokerSpec, broker_url: str, broker: Broker, queue: str, tmp_path: Path
) -> None:
    requires_processes(broker_spec)
    stop_file = tmp_path / "producers-done"
    settings = {"visibility_timeout": 60.0}  # no redelivery: any duplicate is a bug
    # Given two consumer processes and two producer processes of 500 messages each
    consumers = [run_child(broker_url, settings, "consume", queue, str(stop_file)) for _ in range(2)]
    producers = [run_child(broker_url, settings, "produce", queue, "500", f"p{i}") for i in range(2)]
    try:
        for producer in producers:
            _, err = producer.communicate(timeout=60)
            assert producer.returncode == 0, err
        stop_file.touch()
        outputs = []
        for consumer in consumers:
            out, err = consumer.communicate(timeout=60)
            assert consumer.returncode == 0, err
            outputs.append(out.split())
    finally:
        for process in consumers + producers:
            if process.poll() is None:
                process.kill()
                process.communicate()
    # Then every message was acked exactly once, and the queue is empty
    acked = Counter(task_id for output in outputs for task_id in output)
    expected = {f"p{p}-{i}" for p in range(2) for i in range(500)}
    assert set(acked) == expected
    assert [task_id for task_id, n in acked.items() if n > 1] == []
    assert counts(broker, queue) == (0, 0, 0, 0)


# -- SQLite specifics --------------------------------------------------------------------


def sqlite_broker(url: str) -> Broker:
    return create_broker(url, Settings(broker_url=url))


def test_sqlite_in_a_missing_directory_says_so(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'no-such-dir' / 'broker.sqlite3'}"
    broker = sqlite_broker(url)
    try:
        with pytest.raises(ConfigurationError, match="no-such-dir.* does not exist"):
            broker.publish("q", message("a"))
    finally:
        broker.close()


def test_sqlite_path_that_is_a_directory_says_so(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}"
    broker = sqlite_broker(url)
    try:
        with pytest.raises(BrokerError, match=r"open failed: .*not a directory"):
            broker.publish("q", message("a"))
    finally:
        broker.close()


def test_sqlite_file_that_is_not_a_database_says_so(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("these are not the tables you are looking for\n" * 100)
    broker = sqlite_broker(f"sqlite:///{path}")
    try:
        with pytest.raises(BrokerError, match="notes.txt.*not an SQLite database"):
            broker.stats("q")
    finally:
        broker.close()


def test_sqlite_file_from_a_newer_taskframe_is_refused(tmp_path: Path) -> None:
    # Given a file whose broker schema is newer than this code knows
    path = tmp_path / "future.sqlite3"
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE tf_broker_meta (key TEXT PRIMARY KEY, value)")
        conn.execute("INSERT INTO tf_broker_meta VALUES ('schema_version', 999)")
    conn.close()
    broker = sqlite_broker(f"sqlite:///{path}")
    try:
        # Then the broker refuses to touch it, and says what to do
        with pytest.raises(BrokerError, match="schema version 999.*upgrade taskframe"):
            broker.publish("q", message("a"))
    finally:
        broker.close()
