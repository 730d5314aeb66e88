"""The Redis broker and result backend with real `taskframe worker` processes.

A worker killed with SIGKILL, Redis itself restarted in the middle of a run (on a server this
test starts), 10,000 tasks drained by two workers, the RQ-style ``app.enqueue``, the shared
pub/sub subscription of ``wait()``, and what a client sees while Redis is down. Broker and
results both live in Redis database 13 (``tests/redis_service.py``); each test's keys are
deleted after it.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from taskframe.broker import Envelope, QueueStats
from taskframe.exceptions import BackendError, BrokerConnectionError, ConfigurationError
from taskframe.registry import create_backend, create_broker
from taskframe.settings import Settings
from tests import redis_service
from tests.conftest import CI, TaskModule, stop_worker

pytestmark = pytest.mark.slow

URL = redis_service.url(redis_service.INTEGRATION_DB)

MakeTasks = Callable[..., TaskModule]


@pytest.fixture(autouse=True)
def _redis_is_up() -> None:
    reason = redis_service.unavailable()
    if reason:
        if CI:
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def raw() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(URL)
    yield client
    client.close()


@pytest.fixture
def make_tasks_on_redis(tmp_path: Path, raw: redis.Redis) -> Iterator[MakeTasks]:
    """``make(**settings)`` → a TaskModule whose broker and results are in Redis (``URL``
    unless ``broker_url=``/``backend_url=`` say otherwise); its keys are deleted after the test."""
    made: list[TaskModule] = []

    def make(broker_url: str = URL, backend_url: str = URL, **settings: Any) -> TaskModule:
        settings.setdefault("result_expires", 600)
        rendered = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        module = TaskModule(tmp_path, broker_url, backend_url, rendered)
        made.append(module)
        return module

    yield make
    for module in made:
        module.close()
        delete_keys(raw, f"taskframe:{{{module.queue}}}:*")


def delete_keys(client: redis.Redis, pattern: str) -> None:
    keys = list(client.scan_iter(match=pattern, count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])


def settled_counts(tasks: TaskModule, timeout_s: float = 10.0) -> tuple[int, int, int, int]:
    """The queue's (ready, delayed, reserved, dead) once nothing is reserved: a worker acks
    just after it stores the result that the test waited for."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = tasks.app.broker.stats(tasks.queue)
        if stats.reserved == 0 or time.monotonic() > deadline:
            return stats.ready, stats.delayed, stats.reserved, stats.dead
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    """A throw-away redis-server on a spare port, with an append-only file that is fsynced at
    every write, so that queued messages survive a restart (RDB snapshots are off)."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--dir", str(self.directory),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.exceptions.RedisError), redis.Redis(port=self.port) as client:
                if client.ping():
                    return
            time.sleep(0.02)
        raise AssertionError(f"redis-server on port {self.port} did not answer within 10s")

    def shutdown_nosave(self) -> None:
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown", "nosave"], check=False, capture_output=True)
        if self.process is not None:
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.shutdown_nosave()
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        message = f"redis-server and redis-cli are needed to restart Redis in a test; {redis_service.HOW_TO_START}"
        if CI:
            pytest.fail(message)
        pytest.skip(message)
    server = RedisServer(tmp_path / "redis-data")
    server.start()
    yield server
    server.stop()


# -- worker processes ---------------------------------------------------------------------


def test_sigkill_mid_task_loses_nothing(make_tasks_on_redis: MakeTasks) -> None:
    # Given a worker running three tasks at once
    tasks = make_tasks_on_redis(visibility_timeout=1.0)
    results = [tasks.sleep_then.delay(1.5, f"t{i}") for i in range(3)]
    first = tasks.start_worker("-P", "threads", "-c", "3")
    tasks.wait_for_line("started.txt", 3)
    # When it is killed with SIGKILL in the middle of them
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    assert tasks.lines("finished.txt") == []
    assert tasks.app.broker.stats(tasks.queue).reserved + tasks.app.broker.stats(tasks.queue).ready == 3
    # Then the next worker runs each again once the leases end, and each ends SUCCESS
    tasks.start_worker("-P", "threads", "-c", "3")
    assert [r.get(timeout=30) for r in results] == ["t0", "t1", "t2"]
    assert sorted(tasks.lines("started.txt")) == ["t0", "t0", "t1", "t1", "t2", "t2"]
    assert sorted(tasks.lines("finished.txt")) == ["t0", "t1", "t2"]
    assert settled_counts(tasks) == (0, 0, 0, 0)


def test_enqueue_a_plain_function_through_a_worker(make_tasks_on_redis: MakeTasks) -> None:
    tasks = make_tasks_on_redis(enqueue_allow=["builtins.sum"])
    job = tasks.app.enqueue(sum, [42, 43])
    worker = tasks.start_worker("-P", "solo")
    assert job.get(timeout=30) == 85
    assert job.result == 85
    code, output = stop_worker(worker)
    assert code == 0, output


@pytest.mark.parametrize("results", ["results-in-the-restarted-redis", "results-elsewhere"])
def test_redis_restarted_mid_run_every_task_completes(
    make_tasks_on_redis: MakeTasks, redis_server: RedisServer, results: str
) -> None:
    # Given two workers busy with 300 queued tasks on a Redis with an fsynced append-only file
    # (with the results elsewhere, tasks finish during the outage, so acks and receives fail)
    backend_url = redis_server.url if results == "results-in-the-restarted-redis" else URL
    tasks = make_tasks_on_redis(broker_url=redis_server.url, backend_url=backend_url, visibility_timeout=5.0)
    count = 300
    handles = tasks.app.send_many([(f"{tasks.name}.sleep_then", (0.02, i), {}, {}) for i in range(count)])
    workers = [tasks.start_worker("-P", "threads", "-c", "4", "-l", "warning") for _ in range(2)]
    tasks.wait_for_line("finished.txt", 40)
    # When Redis shuts down without saving, stays down for a second, and comes back
    redis_server.shutdown_nosave()
    finished_before = len(tasks.lines("finished.txt"))
    time.sleep(1.0)
    redis_server.start()
    # Then the workers reconnect and every task completes: nothing was lost
    assert [r.get(timeout=60) for r in handles] == list(range(count))
    runs = Counter(tasks.lines("finished.txt"))
    assert set(runs) == {str(i) for i in range(count)}
    duplicates = sum(runs.values()) - count  # at least once: an ack lost in the outage runs again
    assert finished_before < count, "the restart came after the run; make the run longer"
    assert duplicates <= 2 * 4, f"{duplicates} tasks ran twice; only those running at the restart may"
    assert settled_counts(tasks) == (0, 0, 0, 0)
    outputs = [stop_worker(worker) for worker in workers]
    for code, output in outputs:
        assert code == 0, output
        assert "Traceback" not in output, output
    # The outage reached the broker calls (ack, receive), not just the result writes
    lost = sum(output.count("cannot reach the broker") for _, output in outputs)
    if results == "results-elsewhere":
        assert lost >= 1, outputs[0][1]
    print(
        f"restart after {finished_before}/{count} tasks; {duplicates} ran twice; {lost} failed reconnection attempt(s)"
    )


def test_ten_thousand_tasks_two_workers_none_lost_or_duplicated(
    make_tasks_on_redis: MakeTasks, raw: redis.Redis
) -> None:
    # Given 10,000 tasks sent in one pipelined batch
    tasks = make_tasks_on_redis()
    count = 10_000
    started = time.monotonic()
    results = tasks.app.send_many([(f"{tasks.name}.add_noted", (i, i, i), {}, {}) for i in range(count)])
    sent_s = time.monotonic() - started
    assert tasks.app.broker.stats(tasks.queue).ready == count
    # When two worker processes drain the queue
    workers = [tasks.start_worker("-P", "threads", "-c", "4", "--burst", "-l", "warning") for _ in range(2)]
    for worker in workers:
        assert worker.wait(timeout=120) == 0, worker.stdout.read() if worker.stdout else ""
    drained_s = time.monotonic() - started - sent_s
    # Then every task ran exactly once (each run is noted) and its result is stored
    runs = Counter(tasks.lines("runs.txt"))
    assert len(runs) == count
    assert max(runs.values()) == 1, [tag for tag, n in runs.items() if n > 1][:10]
    keys = [f"celery-task-meta-{r.id}" for r in results]
    stored = [raw_value for i in range(0, count, 1000) for raw_value in raw.mget(keys[i : i + 1000])]
    assert all(value is not None and b'"status":"SUCCESS"' in value for value in stored)
    assert results[1234].get(timeout=5) == 2468
    assert settled_counts(tasks) == (0, 0, 0, 0)
    raw.delete(*keys[:5000])
    raw.delete(*keys[5000:])
    print(f"10,000 tasks: sent in {sent_s:.2f}s, drained by two workers in {drained_s:.2f}s")


# -- the broker and backend objects ---------------------------------------------------------


def test_every_key_of_a_queue_is_in_one_cluster_slot() -> None:
    broker = create_broker(URL, Settings(broker_url=URL))
    try:
        for queue in ("celery", "a}b{c", "ünï"):
            slots = {key_slot(key) for name in ("receive", "publish", "ack") for key in broker.keys(queue, name)}  # type: ignore[attr-defined]
            assert len(slots) == 1, queue
        # Queues that share a hash tag share a slot, so one consumer may read them on a cluster.
        high, low = (broker.keys(q, "receive")[0] for q in ("{jobs}.high", "{jobs}.low"))  # type: ignore[attr-defined]
        assert key_slot(high) == key_slot(low)
    finally:
        broker.close()


def test_a_consumer_of_several_queues_takes_priority_first_then_queue_order(raw: redis.Redis) -> None:
    from taskframe.broker import Envelope

    broker = create_broker(URL, Settings(broker_url=URL))
    first, second = (f"tf-int-{uuid.uuid4().hex[:8]}-{n}" for n in ("a", "b"))
    try:
        for queue, priority, label in [(second, 9, "b9"), (first, 5, "a5"), (second, 5, "b5"), (first, 0, "a0")]:
            broker.publish(queue, Envelope(body=b"[]", headers={"id": label}), priority=priority)
        consumer = broker.consumer([first, second], prefetch=4)
        deliveries = consumer.receive(1.0, max_messages=4)
        assert [d.envelope.task_id for d in deliveries] == ["b9", "a5", "b5", "a0"]
        for delivery in deliveries:
            consumer.ack(delivery)
    finally:
        broker.close()
        for queue in (first, second):
            delete_keys(raw, f"taskframe:{{{queue}}}:*")


def test_a_publish_sent_twice_after_a_lost_reply_is_delivered_once(raw: redis.Redis) -> None:
    # A publish whose reply was lost is sent again with the same id; when both copies landed,
    # the receive script keeps one.
    broker = create_broker(URL, Settings(broker_url=URL))
    queue = f"tf-int-{uuid.uuid4().hex[:8]}"
    try:
        broker.publish(queue, _envelope())
        (fresh_list,) = [key for key in raw.scan_iter(match=f"taskframe:{{{queue}}}:new*")]
        raw.rpush(fresh_list, *raw.lrange(fresh_list, 0, -1))  # what the retry leaves behind
        consumer = broker.consumer([queue], prefetch=5)

        deliveries = consumer.receive(1.0, max_messages=5)

        assert len(deliveries) == 1
        consumer.ack(deliveries[0])
        assert consumer.receive(0.1, max_messages=5) == []
        assert broker.stats(queue) == QueueStats(queue, ready=0, delayed=0, reserved=0, dead=0)
    finally:
        broker.close()
        delete_keys(raw, f"taskframe:{{{queue}}}:*")


def test_send_many_of_plain_calls_stores_what_the_general_path_frames(raw: redis.Redis) -> None:
    # A send_many of plain calls is framed from each task's template and handed to the
    # broker's publish_frames (no envelope built): Redis must hold the very bytes the general
    # path (publish_many of each call's envelope) would have stored, in call order.
    from taskframe import App

    app = App("frames", broker=URL, backend=URL)
    queue, other = (f"tf-int-{uuid.uuid4().hex[:8]}-{n}" for n in ("a", "b"))
    app.conf.default_queue = queue

    @app.task(name="frames.add")
    def add(x: Any, y: Any = 0) -> Any:
        return x

    @app.task(name="frames.urgent", priority=9)
    def urgent(x: Any) -> Any:
        return x

    calls: list[tuple[str, Any, Any, Any]] = [
        ("frames.add", (1, 2), {}, {}),
        ("frames.add", ('é"\\', [1.5, None]), {"y": {"k": True}}, {}),
        ("frames.urgent", ((1, 2),), {}, {}),
        ("frames.add", (), {"x": 2**70}, {"queue": other}),
        ("frames.add", (3,), {}, {"task_id": "given-id"}),
    ]
    framed: list[Any] = []
    publish_frames = app.broker.publish_frames  # type: ignore[attr-defined]
    app.broker.publish_frames = lambda batches: (framed.append(batches), publish_frames(batches))  # type: ignore[attr-defined]
    try:
        results = app.send_many(calls)

        assert len(framed) == 1  # the framed path, one write
        assert results[4].id == "given-id"
        stored: list[bytes] = []
        for name, priority in ((queue, 4), (queue, 9), (other, 4)):
            stored += raw.lrange(f"taskframe:{{{name}}}:new{priority}", 0, -1)
        expected = []
        for index in (0, 1, 4, 2, 3):  # by queue and priority, call order within each
            name, args, kwargs, options = calls[index]
            out, _ = app._general_outgoing(name, list(args), dict(kwargs), {**options, "task_id": results[index].id})
            expected.append((str(out.priority), out.envelope.to_bytes()))
        assert [(raw_message[:1].decode(), raw_message[33:]) for raw_message in stored] == expected
        assert all(len(set(raw_message[1:33].decode()) - set("0123456789abcdef")) == 0 for raw_message in stored)
        # A batch with one call that needs the general path (a countdown) takes it whole
        app.send_many([("frames.add", (1,), {}, {}), ("frames.add", (2,), {}, {"countdown": 60})])
        assert len(framed) == 1
        assert app.broker.stats(queue).delayed == 1 and app.broker.stats(queue).ready == 5
    finally:
        app.close()
        for name in (queue, other):
            delete_keys(raw, f"taskframe:{{{name}}}:*")


def test_a_blocked_consumer_takes_a_message_published_after_redis_forgot_its_scripts(raw: redis.Redis) -> None:
    # The receive script rides behind the BZPOPMIN of an idle consumer (one write): when Redis
    # lost its scripts meanwhile (a restart, SCRIPT FLUSH), the consumer loads them and takes.
    broker = create_broker(URL, Settings(broker_url=URL))
    queue = f"tf-int-{uuid.uuid4().hex[:8]}"
    try:
        consumer = broker.consumer([queue], prefetch=1)
        assert consumer.receive(0.05) == []  # the scripts are loaded; the queue is empty
        got: list[Any] = []
        waiting = threading.Thread(target=lambda: got.extend(consumer.receive(5.0)))
        started = time.monotonic()
        waiting.start()
        time.sleep(0.3)  # the consumer now blocks, its receive script queued behind the block
        raw.script_flush()
        broker.publish(queue, _envelope())
        waiting.join(timeout=6)

        assert [d.envelope.task_id for d in got] == ["x"]
        assert time.monotonic() - started < 2.0  # woken by the publish, not by the timeout
        consumer.ack(got[0])
        assert broker.stats(queue) == QueueStats(queue, ready=0, delayed=0, reserved=0, dead=0)
    finally:
        broker.close()
        delete_keys(raw, f"taskframe:{{{queue}}}:*")


def test_ack_and_receive_acks_the_finished_batch_and_leases_the_next(raw: redis.Redis) -> None:
    # What a worker does between batches, in one write: the acks run first, then the receive.
    broker = create_broker(URL, Settings(broker_url=URL))
    queue = f"tf-int-{uuid.uuid4().hex[:8]}"
    try:
        for label in "abcd":
            broker.publish(queue, Envelope(body=b"[]", headers={"id": label}))
        consumer = broker.consumer([queue], prefetch=2)
        first = consumer.receive(1.0, max_messages=2)
        raw.script_flush()  # Redis forgot the scripts (a restart): both are loaded again

        second = consumer.ack_and_receive(first, 1.0, max_messages=2)  # type: ignore[attr-defined]

        assert [d.envelope.task_id for d in first + second] == ["a", "b", "c", "d"]
        assert broker.stats(queue) == QueueStats(queue, ready=0, delayed=0, reserved=2, dead=0)
        assert consumer.ack_and_receive(second, 0.05, max_messages=2) == []  # type: ignore[attr-defined]
        assert broker.stats(queue) == QueueStats(queue, ready=0, delayed=0, reserved=0, dead=0)
    finally:
        broker.close()
        delete_keys(raw, f"taskframe:{{{queue}}}:*")


def test_ack_many_deletes_a_batch_of_several_queues_but_not_a_copy_received_again(raw: redis.Redis) -> None:
    broker = create_broker(URL, Settings(broker_url=URL, visibility_timeout=0.5))
    first, second = (f"tf-int-{uuid.uuid4().hex[:8]}-{n}" for n in ("a", "b"))
    try:
        for queue in (first, first, second, second):
            broker.publish(queue, _envelope())
        consumer = broker.consumer([first, second], prefetch=4)
        batch = consumer.receive(1.0, max_messages=4)
        assert len(batch) == 4
        # One delivery's lease runs out and another consumer receives the message again
        time.sleep(0.6)
        consumer.renew(batch[:3])  # the other three keep theirs
        again = broker.consumer([first, second], prefetch=1).receive(1.0)
        assert [d.envelope for d in again] == [batch[3].envelope]

        consumer.ack_many(batch)  # type: ignore[attr-defined]

        assert broker.stats(first) == QueueStats(first, ready=0, delayed=0, reserved=0, dead=0)
        assert broker.stats(second) == QueueStats(second, ready=0, delayed=0, reserved=1, dead=0)
        consumer.ack_many(batch)  # type: ignore[attr-defined]  # idempotent
        assert broker.stats(second).reserved == 1
    finally:
        broker.close()
        for queue in (first, second):
            delete_keys(raw, f"taskframe:{{{queue}}}:*")


def test_wait_shares_one_pubsub_connection_and_leaves_no_subscription(raw: redis.Redis) -> None:
    # Given a backend whose connections carry a name we can find in CLIENT LIST
    name = f"tf-test-{uuid.uuid4().hex[:8]}"
    backend = create_backend(URL, Settings(backend_options={"client_name": name}))
    ids = [str(uuid.uuid4()) for _ in range(20)]
    found: dict[str, Any] = {}

    def wait(task_id: str) -> None:
        found[task_id] = backend.wait(task_id, timeout_s=10)

    # When 20 threads wait for 20 tasks at once
    threads = [threading.Thread(target=wait, args=(task_id,)) for task_id in ids]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and pubsub_clients(raw, name)["channels"] != 20:
            time.sleep(0.02)
        # Then they share one pub/sub connection with one channel each
        assert pubsub_clients(raw, name) == {"subscribed": 1, "channels": 20}
        for task_id in ids:
            backend.store(task_id, {"task_id": task_id, "status": "SUCCESS", "result": task_id}, ttl_s=60)
    finally:
        for thread in threads:
            thread.join()
    # And each got its own result, after which no subscription is left
    assert {task_id: record["result"] for task_id, record in found.items()} == {i: i for i in ids}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and pubsub_clients(raw, name)["channels"]:
        time.sleep(0.02)
    assert pubsub_clients(raw, name) == {"subscribed": 0, "channels": 0}
    # The shared connection, and the pool's: at most one per thread that used it at once
    # (20 waiters and this one); none is left behind per wait.
    assert 1 <= len(named_clients(raw, name)) <= 1 + len(ids) + 1
    assert raw.pubsub_numsub(*[f"celery-task-meta-{i}" for i in ids]) == [
        (f"celery-task-meta-{i}".encode(), 0) for i in ids
    ]
    backend.close()
    assert named_clients(raw, name) == []
    assert not [t for t in threading.enumerate() if t.name == "taskframe-redis-results"]
    raw.delete(*[f"celery-task-meta-{i}" for i in ids])


def named_clients(client: redis.Redis, name: str) -> list[dict[str, Any]]:
    return [c for c in client.client_list() if c.get("name") == name]


def pubsub_clients(client: redis.Redis, name: str) -> dict[str, int]:
    """Connections named ``name`` in subscribed mode, and their channels in all."""
    subscribed = [c for c in named_clients(client, name) if "P" in c.get("flags", "")]
    return {"subscribed": len(subscribed), "channels": sum(int(c.get("sub", 0)) for c in subscribed)}


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"bogus": 1}, r"unknown broker_options \['bogus'\] for the redis broker 'redis://:\*\*\*@"),
        ({"key_prefix": "a{b"}, "must not contain braces"),
        ({"socket_timeout": 0}, "socket_timeout must be a number of seconds"),
        ({"publish_retry_s": "soon"}, "publish_retry_s must be a number of seconds"),
    ],
)
def test_bad_broker_options_fail_at_construction(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        create_broker("redis://:s3cret@127.0.0.1:6379/13", Settings(broker_options=options))


def test_bad_urls_and_backend_options_fail_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="bad redis broker URL 'redis://:\\*\\*\\*@h:port/1'"):
        create_broker("redis://:s3cret@h:port/1", Settings())
    with pytest.raises(ConfigurationError, match=r"unknown backend_options \['ttl'\]"):
        create_backend(URL, Settings(backend_options={"ttl": 5}))
    with pytest.raises(ConfigurationError, match="retry_s must be a number of seconds"):
        create_backend(URL, Settings(backend_options={"retry_s": -1}))


def test_a_redis_that_is_down_gives_clear_errors_in_bounded_time() -> None:
    # Given URLs of a port where nothing listens, with a password that must never be shown
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    broker = create_broker(url, Settings(broker_url=url, broker_options={"publish_retry_s": 0.5}))
    backend = create_backend(url, Settings(backend_options={"retry_s": 0.3}))
    try:
        # Then publishing retries for its bound and then names the URL (masked) and the cause
        started = time.monotonic()
        with pytest.raises(BrokerConnectionError, match=r"redis://:\*\*\*@127\.0\.0\.1.*gave up after") as info:
            broker.publish("q", _envelope())
        assert 0.4 <= time.monotonic() - started < 3
        assert "s3cret" not in str(info.value)
        # And a worker's consumer fails at once, so the worker backs off and tries again
        with pytest.raises(BrokerConnectionError, match="is Redis running"):
            broker.consumer(["q"], prefetch=1)
        with pytest.raises(BackendError, match=r"redis://:\*\*\*@.*gave up after"):
            backend.fetch("t1")
        with pytest.raises(BackendError, match="increment"):
            backend.incr("chord", ttl_s=60)
        # And wait() gives up within its timeout plus the retry bound, never hangs
        started = time.monotonic()
        with pytest.raises(BackendError, match="gave up after"):
            backend.wait("t1", timeout_s=0.3)
        assert time.monotonic() - started < 3
    finally:
        broker.close()
        backend.close()


def _envelope() -> Any:
    from taskframe.broker import Envelope

    return Envelope(body=b"[[], {}, {}]", headers={"task": "t", "id": "x"})


def test_wait_hears_a_result_stored_after_redis_restarted(redis_server: RedisServer) -> None:
    # Given a thread waiting for a result on a Redis that then restarts
    waiting, storing = (create_backend(redis_server.url, Settings()) for _ in range(2))
    task_id = str(uuid.uuid4())
    found: list[Any] = []
    waiter = threading.Thread(target=lambda: found.append(waiting.wait(task_id, timeout_s=20)))
    waiter.start()
    try:
        time.sleep(0.3)
        redis_server.shutdown_nosave()
        time.sleep(0.3)
        redis_server.start()
        # When the result is stored after the restart
        time.sleep(0.3)
        stored_at = time.monotonic()
        storing.store(task_id, {"task_id": task_id, "status": "SUCCESS", "result": 7}, ttl_s=60)
        waiter.join(timeout=20)
        # Then the waiter gets it promptly: its subscription was renewed, or its poll found it
        assert found and found[0] is not None and found[0]["result"] == 7
        assert time.monotonic() - stored_at < 2.0
    finally:
        waiter.join(timeout=20)
        waiting.close()
        storing.close()


def test_publish_retries_through_a_short_outage(redis_server: RedisServer) -> None:
    # Given a broker whose Redis goes away for half a second
    broker = create_broker(redis_server.url, Settings(broker_url=redis_server.url))
    try:
        broker.publish("q", _envelope())
        redis_server.shutdown_nosave()
        restarter = threading.Timer(0.5, redis_server.start)
        restarter.start()
        # When a message is published meanwhile, Then publish waits for Redis and succeeds
        broker.publish("q", _envelope())
        restarter.join()
        assert broker.stats("q").ready == 2  # both survived: the append-only file is fsynced
    finally:
        broker.close()
