"""The Redis broker and result backend found through Redis Sentinel (``redis+sentinel://``).

Each test starts its own primary, replica and Sentinel (tests/redis_sentinel_service.py) on
spare ports: a failover changes which server is the primary, so no test may share them.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from taskframe.broker import Envelope, QueueStats
from taskframe.exceptions import ConfigurationError
from taskframe.registry import create_backend, create_broker
from taskframe.settings import Settings
from tests import redis_sentinel_service
from tests.conftest import CI, TaskModule, stop_worker
from tests.redis_sentinel_service import LocalSentinel

pytestmark = pytest.mark.slow


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[LocalSentinel]:
    reason = redis_sentinel_service.unavailable()
    if reason:
        if CI:
            pytest.fail(reason)
        pytest.skip(reason)
    directory = tmp_path / "sentinel"
    directory.mkdir()
    started = redis_sentinel_service.start(directory)
    yield started
    started.stop()
    shutil.rmtree(directory, ignore_errors=True)


def _replicated(sentinel: LocalSentinel) -> None:
    """Wait until the replica has every write so far (WAIT), as a failover test needs."""
    _, port = sentinel.primary()
    with redis.Redis(port=port) as primary:
        assert primary.execute_command("WAIT", 1, 5000) == 1


def test_queued_messages_and_results_survive_a_failover(sentinel: LocalSentinel) -> None:
    # Given messages queued and a result stored through the Sentinel's primary
    url = sentinel.url()
    broker = create_broker(url, Settings(broker_url=url))
    backend = create_backend(url, Settings())
    try:
        for label in "abc":
            broker.publish("q", Envelope(body=b"[]", headers={"id": label}))
        backend.put("doc", {"answer": 42}, ttl_s=None)
        first_primary = sentinel.primary()
        _replicated(sentinel)

        # When the Sentinel fails over to the replica
        sentinel.fail_over()

        # Then the same broker and backend objects follow it: the messages and the result are
        # there, and new writes land on the new primary
        assert sentinel.primary() != first_primary
        consumer = broker.consumer(["q"], prefetch=3)
        deliveries = consumer.receive(5.0, max_messages=3)
        assert [d.envelope.task_id for d in deliveries] == ["a", "b", "c"]
        consumer.ack_many(deliveries)  # type: ignore[attr-defined]
        assert backend.get("doc") == {"answer": 42}
        broker.publish("q", Envelope(body=b"[]", headers={"id": "d"}))
        assert broker.stats("q") == QueueStats("q", ready=1, delayed=0, reserved=0, dead=0)
        _, port = sentinel.primary()
        with redis.Redis(port=port) as new_primary:
            assert new_primary.exists("taskframe:{q}:new4") == 1
    finally:
        broker.close()
        backend.close()


def test_workers_carry_on_through_a_failover(sentinel: LocalSentinel, tmp_path: Path) -> None:
    # Given a worker busy with 400 queued tasks, broker and results through the Sentinel
    url = sentinel.url()
    tasks = TaskModule(tmp_path, url, url, "result_expires=600, visibility_timeout=5.0")
    try:
        count = 400
        handles = tasks.app.send_many([(f"{tasks.name}.sleep_then", (0.02, i), {}, {}) for i in range(count)])
        worker = tasks.start_worker("-P", "threads", "-c", "4", "-l", "warning")
        tasks.wait_for_line("finished.txt", 30)
        _replicated(sentinel)

        # When the Sentinel fails over mid-run
        finished_before = len(tasks.lines("finished.txt"))
        sentinel.fail_over()

        # Then every task completes (at least once), and the worker exits cleanly
        try:
            values = [r.get(timeout=60) for r in handles]
        except Exception:
            worker.terminate()
            output = worker.communicate(timeout=30)[0]
            stats = tasks.app.broker.stats(tasks.queue)
            pytest.fail(f"{stats}; worker said:\n{output[-4000:]}")
        assert values == list(range(count))
        runs = Counter(tasks.lines("finished.txt"))
        assert set(runs) == {str(i) for i in range(count)}
        assert finished_before < count, "the failover came after the run; make the run longer"
        code, output = stop_worker(worker)
        assert code == 0, output
        assert "Traceback" not in output, output
        # While the Sentinel still named the demoted primary, the worker paused between
        # reconnects instead of spinning (which once filled its log pipe and hung it)
        assert output.count("lost the broker connection") <= 10, output[-3000:]
    finally:
        tasks.close()


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("redis+sentinel://127.0.0.1:26379", "service_name"),
        ("redis+sentinel://127.0.0.1:26379/svc/0/extra", "service_name"),
        ("redis+sentinel://127.0.0.1:notaport/svc", "bad Sentinel port"),
        ("redis+sentinel://127.0.0.1:26379/svc?cluster=true", "Sentinel and Redis Cluster"),
    ],
)
def test_bad_sentinel_urls_fail_at_construction(url: str, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        create_broker(url, Settings(broker_url=url))


def test_a_sentinel_url_without_a_reachable_sentinel_fails_in_bounded_time() -> None:
    from taskframe.exceptions import BrokerConnectionError

    url = "redis+sentinel://:secret@127.0.0.1:1/svc/0?socket_timeout=1&socket_connect_timeout=1"
    broker = create_broker(url, Settings(broker_url=url, broker_options={"publish_retry_s": 1.0}))
    started = time.monotonic()
    with pytest.raises(BrokerConnectionError) as info:
        broker.publish("q", Envelope(body=b"[]", headers={"id": "x"}))
    assert time.monotonic() - started < 10
    assert "secret" not in str(info.value)
    broker.close()
