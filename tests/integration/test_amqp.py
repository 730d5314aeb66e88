"""RabbitMQ specifics, on this session's vhost (tests/rabbitmq_service.py): Celery's wire layout,
delay levels, delivery counting over lost connections, reconnection, heartbeats during a long
task, and real worker processes (killed, across a broker restart, 5,000 tasks on two workers).

The broker restart (``rabbitmqctl stop_app`` / ``start_app``) stops the whole node for a few
seconds, so it runs only in CI (``CI=true``) or with ``TASKFRAME_TEST_RABBITMQ_RESTART=1``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pika
import pytest

from taskframe.broker import Broker, Envelope, OutgoingMessage, ack_all
from taskframe.exceptions import BrokerConnectionError, ConfigurationError
from taskframe.registry import create_broker
from taskframe.settings import Settings
from tests import rabbitmq_service
from tests.conftest import CI, stop_worker

RESTART_ALLOWED = CI or os.environ.get("TASKFRAME_TEST_RABBITMQ_RESTART") == "1"


@pytest.fixture(scope="module", autouse=True)
def _rabbitmq() -> None:
    reason = rabbitmq_service.unavailable()
    if reason:
        if CI:
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def queue() -> str:
    return f"tf-amqp-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_broker() -> Iterator[Any]:
    made: list[Broker] = []

    def make(url: str | None = None, **settings: Any) -> Broker:
        url = url or rabbitmq_service.url()
        broker = create_broker(url, Settings(broker_url=url, **settings))
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.close()


@pytest.fixture
def raw_channel() -> Iterator[Any]:
    """A plain pika channel on this session's vhost, to look at what the adapter did."""
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_service.url()))
    yield connection.channel()
    connection.close()


def task_message(task_id: str, task: str = "tests.amqp.task", priority: int = 4) -> Envelope:
    return Envelope(
        body=b'[[1, 2], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]',
        headers={"lang": "py", "task": task, "id": task_id, "root_id": task_id, "retries": 0, "timelimit": [None, 2.5]},
        properties={"correlation_id": task_id, "reply_to": None, "priority": priority, "delivery_mode": 2},
    )


# -- URLs, options and errors ------------------------------------------------------------


@pytest.mark.parametrize("path", ["//", "/%2F", ""])
def test_both_spellings_of_the_default_vhost_mean_slash(path: str) -> None:
    url = f"amqp://guest:guest@127.0.0.1:5672{path}"
    broker = create_broker(url, Settings(broker_url=url))
    try:
        assert broker._params.virtual_host == "/"  # type: ignore[attr-defined]
    finally:
        broker.close()


def test_priority_support_follows_the_max_priority_option() -> None:
    plain_url = rabbitmq_service.url()
    plain = create_broker(plain_url, Settings(broker_url=plain_url))
    by_option = create_broker(plain_url, Settings(broker_url=plain_url, broker_options={"max_priority": 9}))
    by_query = create_broker(rabbitmq_service.url(max_priority=9), Settings())
    try:
        assert [type(b).supports_priority for b in (plain, by_option, by_query)] == [False, True, True]
    finally:
        for broker in (plain, by_option, by_query):
            broker.close()


def test_bad_options_and_urls_say_what_to_do() -> None:
    url = rabbitmq_service.url()
    with pytest.raises(ConfigurationError, match="unknown amqp broker option.*known: max_priority, queue_type"):
        create_broker(url, Settings(broker_url=url, broker_options={"prefetch": 3}))
    with pytest.raises(ConfigurationError, match="max_priority must be an integer from 1 to 255"):
        create_broker(url, Settings(broker_url=url, broker_options={"max_priority": 300}))
    with pytest.raises(ConfigurationError, match="quorum queues have no x-max-priority"):
        create_broker(url, Settings(broker_url=url, broker_options={"max_priority": 9, "queue_type": "quorum"}))


def test_wrong_password_and_missing_vhost_name_the_masked_url(make_broker: Any, queue: str) -> None:
    bad_password = "amqp://guest:not-the-password@127.0.0.1:5672/%2F"
    with pytest.raises(BrokerConnectionError, match=r"guest:\*\*\*@.*refused the login.*user name and password"):
        make_broker(bad_password).publish(queue, task_message("a"))
    missing = "amqp://guest:guest@127.0.0.1:5672/no-such-vhost-for-taskframe"
    with pytest.raises(BrokerConnectionError, match="no-such-vhost-for-taskframe.*add_vhost"):
        make_broker(missing).consumer([queue], prefetch=1)


def test_an_unreachable_broker_fails_within_the_publish_bound(make_broker: Any, queue: str) -> None:
    broker = make_broker("amqp://guest:secret@127.0.0.1:1/%2F")  # nothing listens on port 1
    started = time.monotonic()
    with pytest.raises(BrokerConnectionError, match=r"after 3 attempts.*guest:\*\*\*@127.0.0.1:1.*is it running"):
        broker.publish(queue, task_message("a"))
    assert time.monotonic() - started < 10


# -- Celery's wire layout ------------------------------------------------------------------


def test_queue_exchange_and_message_are_laid_out_as_celery_does(make_broker: Any, raw_channel: Any, queue: str) -> None:
    # Given a broker without options (no queue arguments, as Celery declares them)
    broker = make_broker()
    broker.publish(queue, task_message("t-1", priority=7), priority=7)
    # Then a durable direct exchange and a durable queue named Q exist: redeclaring them
    # exactly as kombu does succeeds (RabbitMQ refuses a declaration that differs)
    raw_channel.exchange_declare(queue, exchange_type="direct", durable=True)
    raw_channel.queue_declare(queue, durable=True)
    # And the message carries protocol v2 headers and Celery's properties
    method, props, body = raw_channel.basic_get(queue, auto_ack=True)
    assert (method.exchange, method.routing_key) == (queue, queue)
    assert props.headers["task"] == "tests.amqp.task" and props.headers["id"] == "t-1"
    assert not any(key.startswith("x-taskframe") for key in props.headers)  # a taskframe message needs none
    assert (props.correlation_id, props.priority, props.delivery_mode) == ("t-1", 7, 2)
    assert (props.content_type, props.content_encoding) == ("application/json", "utf-8")
    assert body == task_message("t-1").body


def test_a_message_published_as_celery_does_is_received(make_broker: Any, raw_channel: Any, queue: str) -> None:
    # Given a queue declared and published to by a Celery-like producer (no taskframe headers)
    raw_channel.exchange_declare(queue, exchange_type="direct", durable=True)
    raw_channel.queue_declare(queue, durable=True)
    raw_channel.queue_bind(queue, queue, routing_key=queue)
    headers = {"lang": "py", "task": "proj.add", "id": "c-1", "retries": 0, "timelimit": [None, None]}
    props = pika.BasicProperties(
        content_type="application/json",
        content_encoding="utf-8",
        headers=headers,
        correlation_id="c-1",
        delivery_mode=2,
    )
    raw_channel.basic_publish(queue, queue, b"[[2, 2], {}, {}]", props)
    # When taskframe receives it, Then the envelope is the one Celery sent
    consumer = make_broker().consumer([queue], prefetch=1)
    [delivery] = consumer.receive(3.0)
    assert delivery.envelope.headers == headers
    assert delivery.envelope.task_id == "c-1"
    assert delivery.envelope.properties["correlation_id"] == "c-1"
    consumer.ack(delivery)


# -- delays ---------------------------------------------------------------------------------


def test_a_short_delay_is_not_stuck_behind_a_long_one(make_broker: Any, queue: str) -> None:
    broker = make_broker()
    broker.publish(queue, task_message("long"), delay_s=30.0)
    broker.publish(queue, task_message("short"), delay_s=0.3)
    published_at = time.monotonic()
    assert broker.stats(queue).delayed == 2
    [delivery] = broker.consumer([queue], prefetch=1).receive(5.0)
    waited_s = time.monotonic() - published_at
    assert delivery.envelope.task_id == "short"
    assert 0.25 <= waited_s < 2.0, f"a 0.3 s delay took {waited_s:.2f}s"
    assert broker.stats(queue).delayed == 1
    assert broker.purge(queue) == 1
    assert broker.stats(queue).delayed == 0


# -- delivery counting and dead letters over lost connections ---------------------------------


def test_a_message_whose_consumer_keeps_dying_is_dead_lettered(make_broker: Any, queue: str) -> None:
    # Given max_deliveries=2, and consumers that close (as a crashed worker's connection does)
    broker = make_broker(max_deliveries=2)
    broker.publish(queue, task_message("crasher"))
    counts = []
    for _ in range(2):
        consumer = broker.consumer([queue], prefetch=1)
        [delivery] = consumer.receive(3.0)
        counts.append(delivery.deliveries)
        consumer.close()  # unacked: RabbitMQ requeues it with `redelivered` set
    # Then each return was counted, and the third delivery goes to the dead letters instead
    assert counts == [1, 2]
    assert broker.consumer([queue], prefetch=1).receive(0.5) == []
    [dead] = broker.dead_letters(queue)
    assert (dead.envelope.task_id, dead.deliveries) == ("crasher", 2)
    assert "max_deliveries=2" in dead.reason
    assert broker.stats(queue).dead == 1  # listing put it back


def test_quorum_queues_count_with_x_delivery_count(make_broker: Any, queue: str) -> None:
    broker = make_broker(rabbitmq_service.url(queue_type="quorum"), max_deliveries=2)
    broker.publish(queue, task_message("q"))
    counts = []
    for _ in range(2):
        consumer = broker.consumer([queue], prefetch=1)
        [delivery] = consumer.receive(3.0)
        counts.append(delivery.deliveries)
        consumer.close()
    assert counts == [1, 2]
    assert broker.consumer([queue], prefetch=1).receive(0.5) == []
    assert broker.stats(queue).dead == 1


def declares_as(raw_channel: Any, queue: str, arguments: dict[str, Any]) -> bool:
    """Whether ``queue`` exists with exactly these arguments (RabbitMQ refuses a declare that
    differs with 406 PRECONDITION_FAILED, closing the channel: each try gets its own)."""
    channel = raw_channel.connection.channel()
    try:
        channel.queue_declare(queue, durable=True, arguments=arguments)
    except pika.exceptions.ChannelClosedByBroker as exc:
        assert exc.reply_code == 406, exc
        return False
    channel.close()
    return True


def test_quorum_mode_delays_through_quorum_level_queues(make_broker: Any, raw_channel: Any, queue: str) -> None:
    # Given queue_type=quorum, a delayed message, and one the worker rejects
    broker = make_broker(rabbitmq_service.url(queue_type="quorum"))
    broker.publish(queue, task_message("later"), delay_s=0.3)  # 256 + 32 + 8 + 4 ms
    published_at = time.monotonic()
    consumer = broker.consumer([queue], prefetch=1)
    [delivery] = consumer.receive(5.0)
    waited_s = time.monotonic() - published_at
    consumer.nack(delivery, requeue=False, reason="rejected")
    # Then the delay held it, through quorum level queues that move a message on at least once
    assert delivery.envelope.task_id == "later"
    assert 0.25 <= waited_s < 2.0, f"a 0.3 s delay took {waited_s:.2f}s"
    for level in (8, 5, 3, 2):
        name = f"{queue}.delay.{2**level}ms"
        level_arguments = {
            "x-queue-type": "quorum",
            "x-message-ttl": 2**level,
            "x-dead-letter-exchange": f"taskframe.delay.{2 ** (level - 1)}ms",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
        assert declares_as(raw_channel, name, level_arguments), name
        assert not declares_as(raw_channel, name, {**level_arguments, "x-dead-letter-strategy": "at-most-once"})
    # And the dead letter waits in a classic queue (listing puts it back, which a quorum queue
    # would count as a delivery), which lists it as often as asked
    for _ in range(3):
        assert [(d.envelope.task_id, d.reason) for d in broker.dead_letters(queue)] == [("later", "rejected")]
    assert declares_as(raw_channel, f"{queue}.dead", {})


def test_a_delay_queue_declared_with_other_arguments_is_used_as_it_is(
    make_broker: Any, raw_channel: Any, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a level queue declared classic, as earlier versions did in quorum mode
    level_queue = f"{queue}.delay.256ms"
    raw_channel.queue_declare(
        level_queue, durable=True, arguments={"x-message-ttl": 256, "x-dead-letter-exchange": "taskframe.delay.128ms"}
    )
    broker = make_broker(rabbitmq_service.url(queue_type="quorum"))
    # When a message is delayed through it
    with caplog.at_level("WARNING", logger="taskframe.brokers.amqp"):
        broker.publish(queue, task_message("through-classic"), delay_s=0.256)
    # Then it still arrives, and the warning says what to do
    [delivery] = broker.consumer([queue], prefetch=1).receive(5.0)
    assert delivery.envelope.task_id == "through-classic"
    [warning] = [r.getMessage() for r in caplog.records if r.name == "taskframe.brokers.amqp"]
    assert "exists with other arguments" in warning
    assert f"rabbitmqctl delete_queue {level_queue}" in warning


# -- batches: pipelined gets, ack_many -------------------------------------------------------


def test_ack_many_removes_only_the_deliveries_it_is_given(make_broker: Any, queue: str) -> None:
    # Given four deliveries held by one consumer
    broker = make_broker()
    broker.publish_many([OutgoingMessage(queue, task_message(str(i))) for i in range(4)])
    consumer = broker.consumer([queue], prefetch=4)
    held = consumer.receive(3.0, max_messages=4)
    assert [d.envelope.task_id for d in held] == ["0", "1", "2", "3"]
    # When the first and third are acked together (a gap below the highest: no multiple ack)
    ack_all(consumer, [held[0], held[2]])
    assert broker.stats(queue).reserved == 2
    # Then closing the consumer gives back exactly the other two, counted as redelivered
    consumer.close()
    again = broker.consumer([queue], prefetch=4)
    back = again.receive(3.0, max_messages=4)
    assert [(d.envelope.task_id, d.deliveries) for d in back] == [("1", 2), ("3", 2)]
    # And a batch without gaps (plus a stale delivery, a no-op) empties the queue
    ack_all(again, [*back, held[0]])
    assert again.receive(0.2, max_messages=4) == []
    assert (broker.stats(queue).ready, broker.stats(queue).reserved) == (0, 0)


def test_a_batch_is_the_first_ready_messages_in_order(make_broker: Any, queue: str) -> None:
    # Gets are pipelined (one round trip a batch); the batch is still exactly the queue's head
    broker = make_broker()
    broker.publish_many([OutgoingMessage(queue, task_message(str(i))) for i in range(25)])
    consumer = broker.consumer([queue], prefetch=10)
    batches = [[d.envelope.task_id for d in consumer.receive(1.0, max_messages=n)] for n in (10, 1, 10, 10)]
    assert batches == [[str(i) for i in range(10)], ["10"], [str(i) for i in range(11, 21)], ["21", "22", "23", "24"]]
    assert broker.stats(queue).ready == 0
    assert broker.stats(queue).reserved == 25


def test_headers_decode_as_pika_encodes_them() -> None:
    # The adapter reads header tables with its own decoder (speed): same values as written
    from taskframe.brokers.amqp import _decode_table_fast

    table = {
        "lang": "py",
        "task": "tasks.add",
        "id": "é-1",
        "parent_id": None,
        "retries": 0,
        "big": 2**40,
        "negative": -5,
        "timelimit": [None, 2.5],
        "ignore_result": False,
        "stamps": {"a": [1, "x", {"b": True}]},
        "empty": [],
        "raw": b"\xff\xfe",
    }
    pieces: list[bytes] = []
    pika.data.encode_table(pieces, table)
    encoded = b"".join(pieces)
    assert _decode_table_fast(encoded, 0) == (table, len(encoded))


# -- one connection, several threads ----------------------------------------------------------


def test_an_idle_consumer_does_not_hold_up_other_threads(make_broker: Any, queue: str) -> None:
    # Given a consumer of one broker object listening on an empty queue in another thread
    broker = make_broker()
    broker.publish(queue, task_message("held"))
    consumer = broker.consumer([queue], prefetch=2)
    [held] = consumer.receive(3.0)
    got: list[Any] = []
    listener = threading.Thread(target=lambda: got.extend(consumer.receive(10.0)))
    listener.start()
    time.sleep(0.3)  # it is listening now
    try:
        # When this thread publishes to another queue, acks, and reads stats through the same
        # connection
        started = time.monotonic()
        broker.publish(queue + "-other", task_message("other"))
        consumer.ack(held)
        ready = broker.stats(queue).ready
        took_s = time.monotonic() - started
        # Then none of it waits for the listener's 10 s
        assert took_s < 0.5, f"took {took_s:.2f}s behind an idle receive"
        assert ready == 0
        # And a message for the listener still wakes it at once
        woken_at = time.monotonic()
        broker.publish(queue, task_message("late"))
        listener.join(5.0)
        assert [d.envelope.task_id for d in got] == ["late"]
        assert time.monotonic() - woken_at < 1.0
    finally:
        listener.join(15.0)
    consumer.ack(got[0])
    consumer.close()
    # The ack sent while the listener held the connection took effect: nothing came back
    assert broker.stats(queue).ready == 0
    assert broker.purge(queue + "-other") == 1


def test_an_idle_wait_leaves_nothing_held_when_it_times_out(make_broker: Any, queue: str) -> None:
    # Given a consumer that waited idle three times in a row (its listener registered and
    # cancelled each time)
    broker = make_broker()
    consumer = broker.consumer([queue], prefetch=4)
    for _ in range(3):
        assert consumer.receive(0.2, max_messages=5) == []
    # When a message is published after the last wait returned
    broker.publish(queue, task_message("after"))
    time.sleep(0.2)
    # Then it is ready in its queue, not held by a listener left behind
    assert broker.stats(queue).ready == 1
    assert consumer.held(queue) == 0
    # And the next wait is pushed it as its first delivery
    [delivery] = consumer.receive(5.0, max_messages=5)
    assert (delivery.envelope.task_id, delivery.deliveries) == ("after", 1)
    consumer.ack(delivery)
    consumer.close()
    assert broker.stats(queue).ready == 0


def test_a_consumer_of_two_queues_is_woken_by_either_and_keeps_nothing_extra(make_broker: Any, queue: str) -> None:
    # Given a consumer of two queues waiting idle in another thread
    broker = make_broker()
    second = queue + "-second"
    consumer = broker.consumer([queue, second], prefetch=4)
    got: list[Any] = []
    listener = threading.Thread(target=lambda: got.extend(consumer.receive(10.0, max_messages=5)))
    listener.start()
    time.sleep(0.3)
    # When a message arrives on the second queue
    started = time.monotonic()
    broker.publish(second, task_message("second"))
    listener.join(5.0)
    # Then the wait returns it at once, first delivered
    assert time.monotonic() - started < 1.0
    assert [(d.envelope.task_id, d.queue, d.deliveries) for d in got] == [("second", second, 1)]
    # And no listener stays behind on the first queue once the receive has returned
    broker.publish(queue, task_message("first"))
    time.sleep(0.2)
    assert broker.stats(queue).ready == 1
    [first] = consumer.receive(5.0)
    assert first.envelope.task_id == "first"
    consumer.ack_many([*got, first])
    consumer.close()
    assert (broker.stats(queue).ready, broker.stats(second).ready) == (0, 0)
    broker.purge(second)


def test_threads_publish_while_a_consumer_listens(make_broker: Any, queue: str) -> None:
    # Given a consumer listening in one thread
    broker = make_broker()
    consumer = broker.consumer([queue], prefetch=50)
    received: list[str] = []
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set() or len(received) < 40:
            deliveries = consumer.receive(0.5, max_messages=50)
            ack_all(consumer, deliveries)
            received.extend(d.envelope.task_id or "" for d in deliveries)
            if stop.is_set() and not deliveries:
                return

    listener = threading.Thread(target=consume)
    listener.start()
    # When four threads publish ten messages each on the same broker object
    publishers = [
        threading.Thread(target=lambda n=n: [broker.publish(queue, task_message(f"{n}-{i}")) for i in range(10)])
        for n in range(4)
    ]
    for thread in publishers:
        thread.start()
    for thread in publishers:
        thread.join(30.0)
    stop.set()
    listener.join(30.0)
    # Then every message arrives once, and the connection is still usable
    assert sorted(received) == sorted(f"{n}-{i}" for n in range(4) for i in range(10))
    assert broker.stats(queue).ready == 0


# -- connection loss ------------------------------------------------------------------------


def close_connections_of_this_vhost() -> None:
    done = rabbitmq_service.rabbitmqctl(
        "close_all_connections", "-p", rabbitmq_service.VHOST, "taskframe test: connection loss"
    )
    assert done.returncode == 0, done.stderr
    time.sleep(0.3)  # the close reaches the clients


def test_a_lost_connection_is_reported_once_then_reopened(make_broker: Any, queue: str) -> None:
    broker = make_broker()
    broker.publish_many([OutgoingMessage(queue, task_message(str(i))) for i in range(2)])
    consumer = broker.consumer([queue], prefetch=2)
    [held] = consumer.receive(3.0)
    # When RabbitMQ closes every connection of the vhost
    close_connections_of_this_vhost()
    # Then the consumer says so once (the worker opens a new one), its ack is a no-op, and
    # nothing is lost: the held message is back in the queue
    with pytest.raises(BrokerConnectionError, match="went back to their queues"):
        consumer.receive(1.0)
    consumer.ack(held)
    broker.publish(queue, task_message("after"))  # publishing reconnects by itself
    fresh = broker.consumer([queue], prefetch=5)
    received = fresh.receive(3.0, max_messages=5)
    assert sorted(d.envelope.task_id or "" for d in received) == ["0", "1", "after"]
    assert {d.envelope.task_id: d.deliveries for d in received}["0"] == 2  # redelivered: counted


# -- real worker processes ------------------------------------------------------------------


@pytest.fixture
def amqp_url() -> str:
    return rabbitmq_service.url(max_priority=9)


@pytest.mark.slow
def test_a_killed_worker_s_task_comes_back_at_once_and_completes(make_tasks: Any, amqp_url: str) -> None:
    # Given a long visibility_timeout: only AMQP's connection loss can bring the task back soon
    tasks = make_tasks(amqp_url, visibility_timeout=120.0)
    result = tasks.sleep_then.delay(1.0, "survivor")
    first = tasks.start_worker("-P", "solo")
    tasks.wait_for_line("started.txt", 1)
    # When the worker is SIGKILLed mid-task
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    killed_at = time.monotonic()
    # Then the next worker runs it again right away (not after 120 s), and it succeeds
    tasks.start_worker("-P", "solo")
    assert result.get(timeout=20) == "survivor"
    assert time.monotonic() - killed_at < 15
    assert tasks.lines("started.txt") == ["survivor", "survivor"]
    assert tasks.lines("finished.txt") == ["survivor"]


@pytest.mark.slow
def test_a_long_task_keeps_its_connection_with_a_short_heartbeat(make_tasks: Any) -> None:
    # A solo worker runs the task in its main thread and calls the broker not once meanwhile;
    # RabbitMQ drops a connection after two missed heartbeats (10 s with heartbeat=5), so a
    # 15 s task proves the keeper thread keeps them flowing (30 s proves no more).
    tasks = make_tasks(rabbitmq_service.url(heartbeat=5), visibility_timeout=5.0)
    result = tasks.sleep_then.delay(15.0, "long")
    worker = tasks.start_worker("-P", "solo", "-l", "info")
    assert result.get(timeout=40) == "long"
    code, output = stop_worker(worker)
    assert code == 0, output
    assert "lost the" not in output, output
    assert tasks.lines("started.txt") == ["long"]  # it ran once: never redelivered


@pytest.mark.slow
def test_five_thousand_tasks_on_two_workers_none_lost_or_twice(make_tasks: Any, amqp_url: str) -> None:
    tasks = make_tasks(amqp_url)
    calls: list[tuple[str, tuple[int, ...], dict[str, Any], dict[str, Any]]] = [
        (f"{tasks.name}.add_noted", (i, i, i), {}, {}) for i in range(5000)
    ]
    results = tasks.app.send_many(calls)
    assert tasks.app.broker.stats(tasks.queue).ready == 5000
    workers = [tasks.start_worker("-P", "threads", "-c", "4", "--burst", "-l", "warning") for _ in range(2)]
    for worker in workers:
        code = worker.wait(timeout=100)
        assert code == 0, worker.stdout.read() if worker.stdout else code
    runs = Counter(tasks.lines("runs.txt"))
    assert len(runs) == 5000, f"{5000 - len(runs)} task(s) never ran"
    assert max(runs.values()) == 1, [tag for tag, n in runs.items() if n > 1][:10]
    assert [r.get(timeout=5) for r in results[::500]] == [2 * i for i in range(0, 5000, 500)]
    assert tasks.app.broker.stats(tasks.queue).ready == 0


@pytest.mark.slow
@pytest.mark.skipif(not RESTART_ALLOWED, reason="restarts the RabbitMQ node: CI, or TASKFRAME_TEST_RABBITMQ_RESTART=1")
def test_a_broker_restart_mid_run_loses_no_task(make_tasks: Any, amqp_url: str) -> None:
    # Given a worker busy with 30 short tasks
    tasks = make_tasks(amqp_url)
    results = [tasks.sleep_then.delay(0.1, f"t{i}") for i in range(30)]
    worker = tasks.start_worker("-P", "threads", "-c", "2", "-l", "info")
    tasks.wait_for_line("started.txt", 3)
    # When the RabbitMQ node stops and starts again under it
    stopped = threading.Event()
    try:
        assert rabbitmq_service.rabbitmqctl("stop_app").returncode == 0
        stopped.set()
        time.sleep(1.0)
    finally:
        started = rabbitmq_service.rabbitmqctl("start_app", timeout_s=120)
        assert started.returncode == 0, started.stderr
    # Then the worker reconnects and every task completes (some may run twice: at least once)
    assert sorted(r.get(timeout=60) for r in results) == sorted(f"t{i}" for i in range(30))
    code, output = stop_worker(worker)
    assert code == 0, output
    assert "reconnected to the broker" in output, output
    assert stopped.is_set()
