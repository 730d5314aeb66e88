"""ack_many on the embedded brokers (memory, SQLite): a batch ack has ack's obligations."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskframe.broker import BatchAcker, Broker, Consumer, Envelope, ack_all
from taskframe.registry import create_broker
from taskframe.settings import load_settings

LEASE_S = 0.3


@pytest.fixture(params=["memory", "sqlite"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'broker.sqlite3'}"
    broker = create_broker(url, load_settings({"broker": url, "visibility_timeout": LEASE_S}))
    yield broker
    broker.close()


def publish(broker: Broker, *labels: str) -> None:
    for label in labels:
        broker.publish("q", Envelope(body=b"[[], {}, {}]", headers={"task": "t", "id": label}))


def counts(broker: Broker) -> tuple[int, int]:
    stats = broker.stats("q")
    return stats.ready, stats.reserved


def test_ack_many_removes_the_batch_and_is_idempotent(broker: Broker) -> None:
    publish(broker, "a", "b", "c")
    consumer: Consumer = broker.consumer(["q"], prefetch=3)
    deliveries = consumer.receive(3.0, max_messages=3)
    assert isinstance(consumer, BatchAcker) and len(deliveries) == 3

    ack_all(consumer, deliveries[:2])
    assert counts(broker) == (0, 1)
    ack_all(consumer, deliveries)  # the first two again: no error, no harm

    assert counts(broker) == (0, 0)
    assert consumer.receive(0.1) == []


def test_ack_many_with_a_lost_lease_spares_the_new_copy(broker: Broker) -> None:
    publish(broker, "a", "b")
    first = broker.consumer(["q"], prefetch=2)
    stale = first.receive(3.0, max_messages=2)
    time.sleep(LEASE_S * 1.5)  # both leases end; another consumer takes one message again
    second = broker.consumer(["q"], prefetch=1)
    (again,) = second.receive(3.0, max_messages=1)

    ack_all(first, stale)

    # The message the second consumer holds is still there, leased; the other one is gone.
    assert counts(broker) == (0, 1)
    ack_all(second, [again])
    assert counts(broker) == (0, 0)


def test_renewing_a_lease_another_consumer_took_warns_once(broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    publish(broker, "a", "b")
    first = broker.consumer(["q"], prefetch=2)
    stale = first.receive(3.0, max_messages=2)
    time.sleep(LEASE_S + 0.2)  # both leases end
    second = broker.consumer(["q"], prefetch=1)
    assert len(second.receive(3.0, max_messages=1)) == 1  # one of them is someone else's now
    with caplog.at_level("WARNING"):
        first.renew(stale)
    lost = [r.getMessage() for r in caplog.records if "leases had been lost" in r.getMessage()]
    assert len(lost) == 1 and lost[0].startswith(("1 of 2", "2 of 2"))
    assert "may run twice" in lost[0]
