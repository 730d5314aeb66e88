"""What only the SQS broker does: delay hops, FIFO queues, size limits, its queue layout, URL
handling, and its request count; plus a SIGKILLed worker whose message comes back after the
visibility timeout. Runs against the moto server of tests/conformance/sqs_server.py.
"""

from __future__ import annotations

import collections
import logging
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from taskframe import App
from taskframe.broker import Envelope, OutgoingMessage
from taskframe.exceptions import BrokerConnectionError, BrokerError, ConfigurationError, MessageTooLarge
from taskframe.registry import create_broker
from taskframe.settings import Settings
from taskframe.testing import start_worker
from tests.conformance import sqs_server
from tests.conftest import CI

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def endpoint() -> str:
    reason = sqs_server.unavailable()
    if reason:
        if CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return sqs_server.endpoint()


@pytest.fixture
def make_broker(endpoint: str) -> Iterator[Any]:
    """``make_broker(max_delay_s="2", **settings)``: a broker on fresh queues of the moto server."""
    made: list[Any] = []

    def make(settings: dict[str, Any] | None = None, **options: str) -> Any:
        url = sqs_server.make_url(**options)
        broker = create_broker(url, Settings(broker_url=url, **(settings or {})))
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.close()


def message(task_id: str, size: int = 20, retries: int = 0) -> Envelope:
    headers: dict[str, Any] = {"task": "tests.sqs", "id": task_id, "retries": retries}
    return Envelope(body=b"x" * size, headers=headers)


def count_calls(broker: Any) -> collections.Counter[str]:
    """Counts of SQS API calls made by ``broker``'s client from now on, by operation name."""
    calls: collections.Counter[str] = collections.Counter()
    broker.client().meta.events.register("before-call.sqs", lambda model, **_: calls.update([model.name]))
    return calls


# -- worker processes ---------------------------------------------------------------------


def test_sigkill_mid_task_message_comes_back_after_the_visibility_timeout(make_tasks: Any, endpoint: str) -> None:
    # Given a worker running a task, with a visibility timeout of 2 s (renewed while it runs)
    tasks = make_tasks(sqs_server.make_url(), visibility_timeout=2.0)
    result = tasks.sleep_then.delay(2.0, "survivor")
    first = tasks.start_worker("-P", "solo")
    tasks.wait_for_line("started.txt", 1)
    time.sleep(1.0)  # long enough for the keeper to renew the lease at least once
    # When the worker is killed with SIGKILL
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    killed_at = time.monotonic()
    tasks.start_worker("-P", "solo")
    # Then the message is delivered again once the visibility timeout ends, and completes
    tasks.wait_for_line("started.txt", 2, timeout_s=15)
    back_after_s = time.monotonic() - killed_at
    assert result.get(timeout=20) == "survivor"
    assert tasks.lines("finished.txt") == ["survivor"]
    assert 0.3 <= back_after_s <= 2.0 + 3.0, f"came back {back_after_s:.1f}s after the kill"


# -- delays ----------------------------------------------------------------------------------


def test_a_delay_longer_than_the_hop_limit_arrives_on_time(make_broker: Any) -> None:
    # Given a broker whose longest single delay is 2 s
    broker = make_broker(max_delay_s="2")
    consumer = broker.consumer(["later"], prefetch=1)
    calls = count_calls(broker)
    # When a message is published with a 5-s delay
    broker.publish("later", message("five"), delay_s=5.0)
    published_at = time.monotonic()
    assert (broker.stats("later").delayed, broker.stats("later").ready) == (1, 0)
    # Then it hops (re-sent by the consumer, early copies deleted) and arrives on time
    deliveries: list[Any] = []
    while not deliveries and time.monotonic() - published_at < 10:
        deliveries = consumer.receive(1.0)
    arrived_s = time.monotonic() - published_at
    assert [(d.envelope, d.deliveries) for d in deliveries] == [(message("five"), 1)]
    assert 4.0 <= arrived_s <= 6.0, f"arrived after {arrived_s:.2f}s; the delay was 5s"
    assert calls["SendMessageBatch"] >= 1  # the hops
    consumer.ack(deliveries[0])
    assert broker.stats("later").delayed == 0


def test_a_fifo_queue_cannot_delay_one_message(make_broker: Any) -> None:
    broker = make_broker()
    with pytest.raises(BrokerError, match=r"FIFO queue .*cannot delay a single message"):
        broker.publish("jobs.fifo", message("a"), delay_s=3)


# -- FIFO queues -----------------------------------------------------------------------------


def test_a_fifo_queue_keeps_order_within_its_group(make_broker: Any) -> None:
    broker = make_broker()
    # Given 25 messages to one FIFO queue, sent one by one and in batches
    names = [f"m{i:02d}" for i in range(25)]
    broker.publish("orders.fifo", message(names[0]))
    broker.publish_many([OutgoingMessage("orders.fifo", message(name)) for name in names[1:20]])
    for name in names[20:]:
        broker.publish("orders.fifo", message(name))
    # And a re-send of a task id (deduplicated), and a retry of the same task (not)
    broker.publish("orders.fifo", message("m00"))
    broker.publish("orders.fifo", message("m00", retries=1))
    # When a consumer receives in batches and acks each batch
    consumer = broker.consumer(["orders.fifo"], prefetch=10)
    received: list[str | None] = []
    while batch := consumer.receive(1.0, max_messages=7):
        received.extend(d.envelope.task_id for d in batch)
        for delivery in batch:
            consumer.ack(delivery)
    # Then they came in publish order, the duplicate dropped and the retry kept
    assert received == [*names, "m00"]
    assert broker.stats("orders.fifo").ready == 0


# -- sizes and priority ------------------------------------------------------------------------


def test_a_message_over_the_size_limit_fails_at_enqueue(make_broker: Any) -> None:
    broker = make_broker()
    frame = len(message("big", size=0).to_bytes())
    limit = 256 * 1024
    # A message of exactly the limit (body and attributes) goes through
    broker.publish("sized", message("fit", size=limit - frame))
    # One byte more fails before anything is sent, naming the size and the limit
    with pytest.raises(MessageTooLarge, match=rf"{limit + 1} bytes is over the SQS limit of {limit}") as caught:
        broker.publish("sized", message("big", size=limit - frame + 1))
    assert (caught.value.size, caught.value.limit) == (limit + 1, limit)
    # Attributes count: a delay past the hop limit adds one (the due time)
    with pytest.raises(MessageTooLarge):
        broker.publish("sized", message("fit", size=limit - frame), delay_s=2000)
    # A batch with one message too large sends none of them
    with pytest.raises(MessageTooLarge):
        broker.publish_many([OutgoingMessage("sized", message("ok")), OutgoingMessage("sized", message("x", 300_000))])
    assert broker.stats("sized").ready == 1


def test_max_message_bytes_raises_the_limit_up_to_sqs_maximum(make_broker: Any) -> None:
    broker = make_broker(max_message_bytes=str(512 * 1024))
    broker.publish("roomy", message("big", size=400_000))
    [delivery] = broker.consumer(["roomy"], prefetch=1).receive(1.0)
    assert len(delivery.envelope.body) == 400_000
    url = broker._queue_url("roomy", create=False)
    attributes = broker.client().get_queue_attributes(QueueUrl=url, AttributeNames=["MaximumMessageSize"])
    assert attributes["Attributes"]["MaximumMessageSize"] == str(512 * 1024)


def test_an_app_task_too_large_fails_at_delay(endpoint: str) -> None:
    url = sqs_server.make_url()
    app = App("sqsbig", broker=url, backend="memory://")

    @app.task
    def store(blob: str) -> int:
        return len(blob)

    try:
        with pytest.raises(MessageTooLarge, match="pass a reference"):
            store.delay("x" * 300_000)
    finally:
        app.close()


def test_priority_is_ignored_with_one_warning_per_process(
    make_broker: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = make_broker()
    adapter = sys.modules[type(broker).__module__]  # taskframe.brokers.sqs
    monkeypatch.setattr(adapter, "_priority_warned_pid", -1)  # as in a fresh process
    with caplog.at_level(logging.WARNING, logger="taskframe.brokers.sqs"):
        broker.publish("prio", message("default"))  # the default priority says nothing
        broker.publish("prio", message("urgent"), priority=9)
        broker.publish_many([OutgoingMessage("prio", message("low"), priority=0)])
        broker.publish("prio", message("urgent-again"), priority=9)
    warnings = [r.getMessage() for r in caplog.records if "priority" in r.getMessage()]
    assert len(warnings) == 1
    assert "SQS has no message priority: priority 9 is ignored" in warnings[0]
    with pytest.raises(ValueError, match="0 to 9"):
        broker.publish("prio", message("bad"), priority=10)


# -- receiving from several queues -------------------------------------------------------------


def test_several_queues_earlier_first_and_each_is_watched(make_broker: Any) -> None:
    broker = make_broker()
    consumer = broker.consumer(["high", "low"], prefetch=10)
    # Given both queues exist and the later one was published to first
    broker.publish("low", message("low-1"))
    broker.publish("high", message("high-1"))
    # Then one receive takes the earlier queue's message first
    deliveries = consumer.receive(1.0, max_messages=10)
    assert [d.envelope.task_id for d in deliveries] == ["high-1", "low-1"]
    for delivery in deliveries:
        consumer.ack(delivery)
    # And a message to the second queue is noticed within a round of long polls (a second each)
    broker.publish("low", message("low-late"))
    started = time.monotonic()
    late: list[Any] = []
    while not late and time.monotonic() - started < 5:
        late = consumer.receive(1.0)
    assert [d.envelope.task_id for d in late] == ["low-late"]
    assert time.monotonic() - started < 2.5


# -- queue layout, URLs and errors ---------------------------------------------------------------


def test_queues_are_created_with_a_prefix_safe_names_and_a_dead_letter_queue(make_broker: Any) -> None:
    broker = make_broker(settings={"max_deliveries": 4})
    broker.publish("tasks.low", message("a"))
    client = broker.client()
    url = client.get_queue_url(QueueName=broker.queue_prefix + "tasks-low")["QueueUrl"]
    dead_url = client.get_queue_url(QueueName=broker.queue_prefix + "tasks-low-dead")["QueueUrl"]
    attributes = client.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])["Attributes"]
    dead_arn = client.get_queue_attributes(QueueUrl=dead_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    assert f'"deadLetterTargetArn": "{dead_arn}"' in attributes["RedrivePolicy"]
    assert '"maxReceiveCount": 4' in attributes["RedrivePolicy"]
    # A queue name too long for SQS says so
    with pytest.raises(ConfigurationError, match="SQS allows 80"):
        broker.publish("q" * 80, message("b"))


def test_boto3_endpoint_resolution_is_used_when_the_url_names_none(
    endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", endpoint)
    url = "sqs://testing:testing@?region_name=us-east-1&queue_prefix=tfenv-"
    broker = create_broker(url, Settings(broker_url=url))
    try:
        broker.publish("env", message("via-env"))
        assert broker.stats("env").ready == 1
        broker.purge("env")
    finally:
        broker.close()


def test_errors_mask_the_secret_and_say_what_to_do(endpoint: str) -> None:
    # A closed port: retried by botocore, then a connection error naming the masked URL
    url = "sqs://AKIDEXAMPLE:s3cr3t%2Fkey@?endpoint_url=http%3A%2F%2F127.0.0.1%3A9&region_name=us-east-1"
    broker = create_broker(url, Settings(broker_url=url))
    try:
        with pytest.raises(BrokerConnectionError) as caught:
            broker.publish("q", message("a"))
        text = str(caught.value)
        assert "sqs://AKIDEXAMPLE:***@" in text and "s3cr3t" not in text and "reachable" in text
    finally:
        broker.close()
    with pytest.raises(ConfigurationError, match="did you mean 'queue_prefix'"):
        create_broker("sqs://?queue_prefx=a", Settings(broker_url="sqs://"))
    with pytest.raises(ConfigurationError, match="a host in the URL is not used"):
        create_broker("sqs://localhost:4566", Settings(broker_url="sqs://"))
    with pytest.raises(ConfigurationError, match="max_delay_s"):
        create_broker("sqs://?max_delay_s=1000", Settings(broker_url="sqs://"))


# -- cost --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ack_batch_s", "most_per_task"), [("0.1", 1.2), ("0", 1.5)])
def test_api_calls_per_task_at_steady_load(endpoint: str, ack_batch_s: str, most_per_task: float) -> None:
    # Given 600 tasks sent in batches, and a worker draining them with eight threads
    url = sqs_server.make_url(ack_batch_s=ack_batch_s)
    app = App("sqscost", broker=url, backend="memory://", default_queue="cost")

    @app.task(ignore_result=True)
    def noop(i: int) -> int:
        return i

    calls = count_calls(app.broker)
    total = 600
    try:
        app.send_many([(noop.name, (i,), {}, {}) for i in range(total)])
        with start_worker(app, queues=["cost"], pool="threads", concurrency=8) as worker:
            deadline = time.monotonic() + 60
            while worker.tasks_done < total and time.monotonic() < deadline:
                time.sleep(0.01)
        assert worker.tasks_done == total
    finally:
        app.close()
    # Then sends, receives and deletes stay within the budget (queue set-up and counts aside)
    billable = sum(n for name, n in calls.items() if name not in ("GetQueueUrl", "CreateQueue", "GetQueueAttributes"))
    assert billable / total <= most_per_task, dict(calls)
