"""What is specific to the kombu adapter (brokers/kombu.py), beyond the conformance suite:
priority mapping, Celery's topology on Redis and RabbitMQ, a killed worker on kombu+redis,
and the errors a user sees. Redis tests use the kombu+redis conformance database with a queue
of their own, whose keys are deleted after the test; RabbitMQ tests use the session's vhost."""

from __future__ import annotations

import datetime
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from typing import Any

import kombu
import pika
import pytest
import redis

from taskframe.broker import Broker, Envelope
from taskframe.exceptions import BrokerConnectionError, ConfigurationError
from taskframe.registry import create_broker
from taskframe.settings import Settings
from tests import rabbitmq_service, redis_service
from tests.conformance.brokers import KOMBU_REDIS_DB

REDIS_URL = redis_service.url(KOMBU_REDIS_DB)
#: kombu's classes carry no annotations; tests use them as a user would.
kombu_api: Any = kombu


def _require(reason: str | None) -> None:
    if reason:
        pytest.skip(reason)


@pytest.fixture
def queue() -> str:
    return f"tf-kombu-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def raw_redis(queue: str) -> Iterator[redis.Redis]:
    _require(redis_service.unavailable())
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    keys = list(client.scan_iter(match=f"*{queue}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def redis_broker(raw_redis: redis.Redis) -> Iterator[Broker]:
    url = "kombu+" + REDIS_URL
    broker = create_broker(url, Settings(broker_url=url))
    yield broker
    broker.close()


def message(label: str, priority: int = 4) -> Envelope:
    """An envelope as the App makes it (protocol v2 headers; properties as TaskProperties dumps them)."""
    properties = {"correlation_id": label, "reply_to": None, "priority": priority, "delivery_mode": 2}
    return Envelope(
        body=b"[[], {}, {}]", headers={"task": "tests.kombu", "id": label, "lang": "py"}, properties=properties
    )


def test_priority_9_is_delivered_first_on_redis_and_lands_where_celery_looks(
    redis_broker: Broker, raw_redis: redis.Redis, queue: str
) -> None:
    # Given messages of taskframe priority 0, 4 and 9, published in that order
    for priority in (0, 4, 9):
        redis_broker.publish(queue, message(f"p{priority}", priority), priority=priority)
    # Then they sit in the lists of Celery's default priority steps, 9 in kombu's most urgent (0)
    assert raw_redis.llen(queue) == 1
    assert raw_redis.llen(f"{queue}\x06\x163") == 1  # taskframe 4 -> kombu 5 -> step 3
    assert raw_redis.llen(f"{queue}\x06\x169") == 1  # taskframe 0 -> kombu 9
    # And a consumer gets 9 first, 0 last
    consumer = redis_broker.consumer([queue], prefetch=3)
    received = [consumer.receive(2.0)[0] for _ in range(3)]
    assert [d.envelope.task_id for d in received] == ["p9", "p4", "p0"]
    assert [d.envelope.properties["priority"] for d in received] == [9, 4, 0]
    for delivery in received:
        consumer.ack(delivery)


def test_a_celery_priority_0_message_outranks_a_taskframe_priority_0_one(redis_broker: Broker, queue: str) -> None:
    # Given a taskframe message of priority 0 (least urgent), then one sent as Celery sends it on
    # Redis with priority 0 (Celery's most urgent there)
    redis_broker.publish(queue, message("taskframe-0", 0), priority=0)
    with kombu_api.Connection(REDIS_URL) as connection:
        producer = connection.Producer()
        celery_queue = kombu_api.Queue(queue, kombu_api.Exchange(queue), routing_key=queue)
        producer.publish(
            b"[[], {}, {}]",
            exchange=queue,
            routing_key=queue,
            declare=[celery_queue],
            headers={"task": "tests.kombu", "id": "celery-0", "lang": "py"},
            content_type="application/json",
            content_encoding="utf-8",
            correlation_id="celery-0",
            priority=0,
        )
    # Then the Celery one comes first, and reads as taskframe priority 9
    consumer = redis_broker.consumer([queue], prefetch=2)
    first, second = consumer.receive(2.0)[0], consumer.receive(2.0)[0]
    assert (first.envelope.task_id, first.envelope.properties["priority"]) == ("celery-0", 9)
    assert second.envelope.task_id == "taskframe-0"
    consumer.ack(first)
    consumer.ack(second)


def test_redis_keys_are_celerys(redis_broker: Broker, raw_redis: redis.Redis, queue: str) -> None:
    redis_broker.publish(queue, message("a", 9), priority=9)
    # The queue is the list Q, bound in _kombu.binding.Q as Celery's "Q" exchange and routing key
    assert raw_redis.type(queue) == b"list"
    assert raw_redis.smembers(f"_kombu.binding.{queue}") == {f"{queue}\x06\x16\x06\x16{queue}".encode()}
    [payload] = raw_redis.lrange(queue, 0, -1)
    delivered = kombu_api.utils.json.loads(payload)
    assert delivered["headers"] == {"task": "tests.kombu", "id": "a", "lang": "py"}  # nothing of ours
    assert delivered["properties"]["correlation_id"] == "a"
    assert delivered["properties"]["delivery_mode"] == 2
    assert delivered["properties"]["priority"] == 0  # kombu-redis: 0 is the most urgent
    assert delivered["properties"]["delivery_info"] == {"exchange": queue, "routing_key": queue}
    # A delivery is leased in kombu's unacked hash, and the ack removes it
    consumer = redis_broker.consumer([queue], prefetch=1)
    [delivery] = consumer.receive(2.0)
    assert raw_redis.hexists("unacked", delivery.tag.message.delivery_tag)
    consumer.ack(delivery)
    assert not raw_redis.hexists("unacked", delivery.tag.message.delivery_tag)


def test_rabbitmq_topology_is_celerys(queue: str) -> None:
    _require(rabbitmq_service.unavailable())
    url = "kombu+" + rabbitmq_service.url()
    broker = create_broker(url, Settings(broker_url=url))
    broker.publish(queue, message("a"))
    broker.close()
    parameters = pika.URLParameters(rabbitmq_service.url())
    connection = pika.BlockingConnection(parameters)
    try:
        channel = connection.channel()
        # Declaring them as Celery does succeeds only if they exist with exactly these arguments
        channel.exchange_declare(queue, exchange_type="direct", durable=True)
        declared = channel.queue_declare(queue, durable=True)
        assert declared.method.message_count == 1
        # And the queue is bound to its exchange with its own name as routing key
        channel.confirm_delivery()  # the count below includes the message once it is confirmed
        channel.basic_publish(queue, queue, b"[[], {}, {}]", pika.BasicProperties(headers={"id": "b"}))
        assert channel.queue_declare(queue, passive=True).method.message_count == 2
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        assert properties.correlation_id == "a"
        assert properties.delivery_mode == 2
        assert properties.headers["id"] == "a"
        assert body == b"[[], {}, {}]"
        channel.queue_delete(queue)
        channel.exchange_delete(queue)
    finally:
        connection.close()


def test_sigkilled_worker_task_comes_back_after_the_visibility_timeout(make_tasks: Any, raw_redis: redis.Redis) -> None:
    # Given a worker on kombu+redis with a short lease, running a task
    tasks = make_tasks("kombu+" + REDIS_URL, visibility_timeout=1.0)
    result = tasks.sleep_then.delay(2.0, "survivor")
    first = tasks.start_worker("-P", "solo")
    tasks.wait_for_line("started.txt", 1)
    # When it is killed with SIGKILL mid-task
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    assert tasks.lines("finished.txt") == []
    assert raw_redis.hlen("unacked") >= 1  # the lease outlives the worker
    # Then kombu puts it back once the lease ends, and the next worker completes it
    tasks.start_worker("-P", "solo")
    assert result.get(timeout=30) == "survivor"
    assert tasks.lines("started.txt") == ["survivor", "survivor"]
    assert tasks.lines("finished.txt") == ["survivor"]


def test_an_early_celery_countdown_waits_in_the_delay_queue_not_in_the_worker(
    redis_broker: Broker, raw_redis: redis.Redis, queue: str
) -> None:
    # Given a message sent as Celery sends a countdown: to Q at once, with its eta
    eta = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1.5)
    sent_at = time.monotonic()
    with kombu_api.Connection(REDIS_URL) as connection:
        connection.Producer().publish(
            b"[[], {}, {}]",
            exchange=queue,
            routing_key=queue,
            declare=[kombu_api.Queue(queue, kombu_api.Exchange(queue), routing_key=queue)],
            headers={"task": "tests.kombu", "id": "eta", "lang": "py", "eta": eta.isoformat()},
            content_type="application/json",
            content_encoding="utf-8",
        )
    consumer = redis_broker.consumer([queue], prefetch=1)
    # When a consumer polls before the eta, Then it gets nothing: the message is parked, counted delayed
    assert consumer.receive(0.3) == []
    assert raw_redis.llen(queue) == 0
    assert (redis_broker.stats(queue).ready, redis_broker.stats(queue).delayed) == (0, 1)
    # And it is delivered at its eta, as a first delivery
    [delivery] = consumer.receive(5.0)
    waited_s = time.monotonic() - sent_at
    assert (delivery.envelope.task_id, delivery.deliveries) == ("eta", 1)
    assert 1.4 <= waited_s < 3.0, f"delivered after {waited_s:.2f}s; the eta was 1.5s away"
    consumer.ack(delivery)


HOLDER = textwrap.dedent(
    """
    import sys, time
    from taskframe.registry import create_broker
    from taskframe.settings import Settings
    url, queue = sys.argv[1:]
    broker = create_broker(url, Settings(broker_url=url, visibility_timeout=0.5))
    assert broker.consumer([queue], prefetch=1).receive(0.3) == []  # fetches the early message
    print("holding", broker.stats(queue).delayed, flush=True)
    time.sleep(3600)
    """
)


def test_a_delay_held_by_a_killed_consumer_is_not_lost(raw_redis: redis.Redis, queue: str) -> None:
    url = "kombu+" + REDIS_URL
    broker = create_broker(url, Settings(broker_url=url, visibility_timeout=0.5))
    broker.publish(queue, message("later"), delay_s=2.0)
    published_at = time.monotonic()
    assert raw_redis.llen(f"{queue}.delay\x06\x163") == 1  # waiting in Q.delay (priority step 3)
    # Given a consumer process that took the delayed message to hold it until due
    child = subprocess.Popen([sys.executable, "-c", HOLDER, url, queue], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().split() == ["holding", "1"]
        assert raw_redis.llen(f"{queue}.delay\x06\x163") == 0  # it is in kombu's unacked hash now
        # When that process is killed
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
    # Then its lease ends, and another consumer delivers it at its due time, as a first delivery
    [delivery] = broker.consumer([queue], prefetch=1).receive(6.0)
    waited_s = time.monotonic() - published_at
    assert (delivery.envelope.task_id, delivery.deliveries) == ("later", 1)
    assert 1.9 <= waited_s < 4.0, f"delivered after {waited_s:.2f}s; the delay was 2s"
    broker.close()


def test_unreachable_broker_raises_broker_connection_error_with_the_password_masked() -> None:
    url = "kombu+redis://:s3cret@127.0.0.1:1/0"
    broker = create_broker(url, Settings(broker_url=url, broker_connect_timeout=2))
    with pytest.raises(BrokerConnectionError) as raised:
        broker.consumer(["q"], prefetch=1)
    text = str(raised.value)
    assert "s3cret" not in text
    assert "kombu+redis://:***@127.0.0.1:1/0" in text
    with pytest.raises(BrokerConnectionError, match="publish failed") as raised:
        broker.publish("q", message("a"))
    assert "s3cret" not in str(raised.value)
    broker.close()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("kombu+nosuch://:pw@host/0", "kombu has no transport 'nosuch'"),
        ("kombu+://:pw@host/0", "must look like 'kombu\\+redis://host:6379/0'"),
    ],
)
def test_bad_url_is_one_clear_configuration_error(url: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says) as raised:
        create_broker(url, Settings(broker_url=url))
    assert "\n" not in str(raised.value)
    assert ":pw@" not in str(raised.value)
