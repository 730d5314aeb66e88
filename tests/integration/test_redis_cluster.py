"""The Redis broker on a real Redis Cluster (``broker_options={"cluster": True}``).

A module-scoped fixture starts three ``redis-server --cluster-enabled yes`` processes on spare
ports (tests/redis_cluster_service.py: in the foreground, killed at the end even when a test
fails) and joins them with ``redis-cli --cluster create``. Results go to SQLite. Every test
uses queues of its own.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.cluster import RedisCluster

from taskframe import App
from taskframe.broker import Envelope, OutgoingMessage
from taskframe.exceptions import BrokerConnectionError, BrokerError, ConfigurationError
from taskframe.registry import create_broker
from taskframe.settings import Settings
from tests import redis_cluster_service, redis_service
from tests.conftest import CI, TaskModule

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis_cluster_service.LocalCluster]:
    """A fresh three-node cluster (no replicas) for this module."""
    reason = redis_cluster_service.unavailable()
    if reason:
        if CI:
            pytest.fail(reason)
        pytest.skip(reason)
    cluster = redis_cluster_service.LocalCluster(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def cluster_url(cluster: redis_cluster_service.LocalCluster) -> str:
    """``redis://127.0.0.1:<port>`` of one node; the client finds the others from it."""
    return cluster.url


@pytest.fixture
def raw(cluster_url: str) -> Iterator[RedisCluster]:
    client = RedisCluster.from_url(cluster_url)
    yield client
    for node in client.get_nodes():  # type: ignore[no-untyped-call]  # close() leaves these connected
        if node.redis_connection is not None:
            node.redis_connection.connection_pool.disconnect()
    client.close()


@pytest.fixture
def make_broker(cluster_url: str) -> Iterator[Callable[..., Any]]:
    """``make(**settings)`` → a cluster broker (``broker_options={"cluster": True}``)."""
    made: list[Any] = []

    def make(**settings: Any) -> Any:
        settings.setdefault("broker_options", {"cluster": True})
        broker = create_broker(cluster_url, Settings(broker_url=cluster_url, **settings))
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.close()


def _queue() -> str:
    return f"cq-{uuid.uuid4().hex[:10]}"


def _envelope(text: str) -> Envelope:
    return Envelope(body=text.encode(), headers={"task": "t"}, content_encoding="utf-8")


def _node_of(raw: RedisCluster, broker: Any, queue: str) -> Any:
    """The cluster node (redis-py's ClusterNode) that holds ``queue``'s slot."""
    return raw.get_node_from_key(broker.keys(queue)[0])  # type: ignore[no-untyped-call]


def _queues_on_two_nodes(raw: RedisCluster, broker: Any) -> tuple[str, str]:
    """Two fresh queues whose hash tags map to slots of different nodes."""
    first = _queue()
    first_node = _node_of(raw, broker, first).name
    while True:
        second = _queue()
        if _node_of(raw, broker, second).name != first_node:
            return first, second


# -- the broker on a cluster ---------------------------------------------------------------


def test_publish_receive_ack_on_the_node_of_the_queue(make_broker: Callable[..., Any], raw: RedisCluster) -> None:
    broker = make_broker()
    queue = _queue()
    broker.publish(queue, _envelope("hello"))
    assert broker.stats(queue).ready == 1
    # The message sits on the node that owns the queue's slot.
    node = _node_of(raw, broker, queue)
    assert raw.get_redis_connection(node).exists(*broker.keys(queue)) >= 1
    consumer = broker.consumer([queue], prefetch=1)
    (delivery,) = consumer.receive(2.0)
    assert delivery.envelope.body == b"hello"
    assert delivery.deliveries == 1
    assert broker.stats(queue).reserved == 1
    consumer.ack(delivery)
    stats = broker.stats(queue)
    assert (stats.ready, stats.delayed, stats.reserved, stats.dead) == (0, 0, 0, 0)
    assert consumer.receive(0.2) == []


def test_cluster_from_the_url_query(cluster_url: str) -> None:
    url = f"{cluster_url}/0?cluster=true&socket_keepalive=true"
    broker: Any = create_broker(url, Settings(broker_url=url))
    try:
        queue = _queue()
        broker.publish_many([OutgoingMessage(queue, _envelope(str(i))) for i in range(3)])
        consumer = broker.consumer([queue], prefetch=3)
        deliveries = consumer.receive(2.0, max_messages=5)
        assert [d.envelope.body for d in deliveries] == [b"0", b"1", b"2"]
        consumer.ack_many(deliveries)
        assert broker.stats(queue).reserved == 0
    finally:
        broker.close()


def test_bad_cluster_settings_say_what_to_fix(cluster_url: str) -> None:
    with pytest.raises(ConfigurationError, match="cluster must be True or False"):
        create_broker(cluster_url, Settings(broker_url=cluster_url, broker_options={"cluster": "yes"}))
    with pytest.raises(ConfigurationError, match="cluster=true or cluster=false"):
        create_broker(f"{cluster_url}?cluster=maybe", Settings(broker_url=cluster_url))
    with pytest.raises(ConfigurationError, match="only database 0"):
        create_broker(f"{cluster_url}/3?cluster=true", Settings(broker_url=cluster_url))


def test_results_of_an_app_on_a_cluster_broker_need_their_own_backend_url(cluster_url: str) -> None:
    url = f"{cluster_url}?cluster=true"
    app = App("on-cluster", broker=url)  # no backend: the broker's URL is offered to the Redis backend
    with pytest.raises(ConfigurationError, match="not a Redis Cluster.*set result_backend"):
        app.backend  # noqa: B018 - the property builds the backend
    app.broker.publish(_queue(), _envelope("x"))  # the broker itself works
    app.broker.close()


def test_cluster_option_on_a_server_that_is_not_a_cluster_says_so() -> None:
    reason = redis_service.unavailable()
    if reason:
        if CI:
            pytest.fail(reason)
        pytest.skip(reason)
    url = redis_service.url(redis_service.INTEGRATION_DB).rsplit("/", 1)[0] + "?cluster=true"
    broker = create_broker(url, Settings(broker_url=url))
    try:
        with pytest.raises(BrokerError, match="not a cluster node .* drop the cluster option") as caught:
            broker.consumer(["q"], prefetch=1)
        assert not isinstance(caught.value, BrokerConnectionError)  # a worker would retry that forever
    finally:
        broker.close()


def test_priority_9_first_then_fifo(make_broker: Callable[..., Any]) -> None:
    broker = make_broker()
    queue = _queue()
    for text, priority in (("low", 0), ("mid-1", 5), ("urgent", 9), ("mid-2", 5)):
        broker.publish(queue, _envelope(text), priority=priority)
    consumer = broker.consumer([queue], prefetch=4)
    deliveries = consumer.receive(2.0, max_messages=4)
    assert [d.envelope.body for d in deliveries] == [b"urgent", b"mid-1", b"mid-2", b"low"]
    consumer.ack_many(deliveries)


def test_a_delayed_message_arrives_on_time(make_broker: Callable[..., Any]) -> None:
    broker = make_broker()
    queue = _queue()
    started = time.monotonic()
    broker.publish(queue, _envelope("later"), delay_s=0.6)
    assert broker.stats(queue).delayed == 1
    consumer = broker.consumer([queue], prefetch=1)
    assert consumer.receive(0.2) == []
    (delivery,) = consumer.receive(3.0)
    elapsed_s = time.monotonic() - started
    assert delivery.envelope.body == b"later"
    assert 0.6 <= elapsed_s < 1.5, elapsed_s
    consumer.ack(delivery)


def test_dead_letter_after_max_deliveries(make_broker: Callable[..., Any]) -> None:
    broker = make_broker(visibility_timeout=0.3, max_deliveries=2)
    queue = _queue()
    broker.publish(queue, _envelope("poison"))
    consumer = broker.consumer([queue], prefetch=1)
    counts = [d.deliveries for _ in range(2) for d in consumer.receive(2.0)]  # never acked
    assert counts == [1, 2]
    assert consumer.receive(1.0) == []  # the third delivery buries it instead
    (dead,) = broker.dead_letters(queue)
    assert dead.deliveries == 2
    assert "max_deliveries=2" in dead.reason
    assert dead.envelope.body == b"poison"
    assert broker.requeue_dead(queue) == 1
    (again,) = consumer.receive(2.0)
    assert (again.envelope.body, again.deliveries) == (b"poison", 1)
    consumer.ack(again)


def test_a_consumer_of_queues_on_two_nodes(make_broker: Callable[..., Any], raw: RedisCluster) -> None:
    broker = make_broker()
    first, second = _queues_on_two_nodes(raw, broker)
    nodes = {_node_of(raw, broker, queue).name for queue in (first, second)}
    assert len(nodes) == 2
    # Most urgent first across both queues, and the earlier queue first on a tie.
    broker.publish(first, _envelope("first-p1"), priority=1)
    broker.publish(second, _envelope("second-p9"), priority=9)
    broker.publish(second, _envelope("second-p5"), priority=5)
    broker.publish(first, _envelope("first-p5"), priority=5)
    consumer = broker.consumer([first, second], prefetch=10)
    (one,) = consumer.receive(2.0)
    rest = consumer.receive(2.0, max_messages=10)
    bodies = [d.envelope.body.decode() for d in (one, *rest)]
    assert bodies == ["second-p9", "first-p5", "second-p5", "first-p1"]
    assert {d.queue for d in (one, *rest)} == {first, second}
    consumer.ack_many([one, *rest])
    assert broker.stats(first).reserved == broker.stats(second).reserved == 0
    # A consumer waiting on both wakes up for a publish to either queue.
    for queue in (second, first):
        timer = threading.Timer(0.3, broker.publish, (queue, _envelope(f"late-{queue}")))
        timer.start()
        started = time.monotonic()
        (late,) = consumer.receive(5.0)
        timer.join()
        assert late.queue == queue
        assert time.monotonic() - started < 1.5
        consumer.ack(late)


# -- connection loss --------------------------------------------------------------------------


def test_connections_the_node_dropped_are_replaced(make_broker: Callable[..., Any], raw: RedisCluster) -> None:
    broker = make_broker()
    queue = _queue()
    consumer = broker.consumer([queue], prefetch=1)
    broker.publish(queue, _envelope("before"))
    node = raw.get_redis_connection(_node_of(raw, broker, queue))
    time.sleep(1.1)  # idle long enough that a kept connection is checked before use
    # When the node closes every client connection (a restart or a proxy looks the same)
    assert node.client_kill_filter(_type="normal", skipme=True) >= 1
    # Then the next calls reconnect: nothing is lost, nothing arrives twice
    broker.publish(queue, _envelope("after"))
    received = consumer.receive(1.0, max_messages=5)
    assert sorted(d.envelope.body for d in received) == [b"after", b"before"]
    consumer.ack_many(received)


def test_a_publish_retries_while_its_node_is_frozen(
    make_broker: Callable[..., Any], raw: RedisCluster, cluster: redis_cluster_service.LocalCluster
) -> None:
    broker = make_broker(broker_options={"cluster": True, "socket_timeout": 0.3, "publish_retry_s": 10})
    queue = _queue()
    consumer = broker.consumer([queue], prefetch=5)
    node = _node_of(raw, broker, queue)
    process = cluster.processes[cluster.ports.index(node.port)]
    # Given the queue's node stops answering for a second (under cluster-node-timeout: no failover)
    process.send_signal(signal.SIGSTOP)
    thaw = threading.Timer(1.0, process.send_signal, (signal.SIGCONT,))
    thaw.start()
    try:
        started = time.monotonic()
        broker.publish(queue, _envelope("patient"))  # times out, backs off, tries again
        waited_s = time.monotonic() - started
    finally:
        thaw.join()
        process.send_signal(signal.SIGCONT)
    assert waited_s >= 0.9
    # Then exactly one copy arrives, even if the first attempt did land after all
    deliveries = consumer.receive(2.0, max_messages=5)
    assert [d.envelope.body for d in deliveries] == [b"patient"]
    consumer.ack_many(deliveries)
    assert consumer.receive(0.3) == []


# -- a real worker process ------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_worker_drains_two_queues_on_two_nodes(
    pool: str, cluster_url: str, raw: RedisCluster, make_broker: Callable[..., Any], tmp_path: Path
) -> None:
    backend = f"sqlite:///{tmp_path / 'results.sqlite3'}"
    tasks = TaskModule(tmp_path, cluster_url, backend, "broker_options={'cluster': True}, result_expires=600")
    try:
        first, second = _queues_on_two_nodes(raw, make_broker())
        count = 500
        calls: list[tuple[str, tuple[int, ...], dict[str, Any], dict[str, Any]]]
        calls = [(f"{tasks.name}.add_noted", (i, i, i), {}, {"queue": (first, second)[i % 2]}) for i in range(count)]
        results = tasks.app.send_many(calls)
        assert tasks.app.broker.stats(first).ready == tasks.app.broker.stats(second).ready == count // 2
        worker = tasks.start_worker("-Q", f"{first},{second}", "-P", pool, "-c", "4", "--burst", "-l", "warning")
        assert worker.wait(timeout=120) == 0, worker.stdout.read() if worker.stdout else ""
        runs = Counter(tasks.lines("runs.txt"))
        assert len(runs) == count
        assert max(runs.values()) == 1, [tag for tag, n in runs.items() if n > 1][:10]
        assert results[123].get(timeout=5) == 246
        assert results[456].get(timeout=5) == 912
        for queue in (first, second):
            stats = tasks.app.broker.stats(queue)
            assert (stats.ready, stats.delayed, stats.reserved, stats.dead) == (0, 0, 0, 0)
    finally:
        tasks.close()
