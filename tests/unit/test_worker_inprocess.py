"""Behaviour through a real worker running in this process (taskframe.testing.start_worker)
on the in-memory broker and backend: results, errors, canvas, retries, bad input."""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from typing import Any

import pytest

from taskframe import App, chain, chord, group
from taskframe.broker import Envelope
from taskframe.exceptions import (
    BrokerConnectionError,
    ChordError,
    DeliveryLimitExceeded,
    NotRegistered,
    SoftTimeLimitExceeded,
    TaskError,
    TaskRevokedError,
    TimeoutError,
)
from taskframe.testing import start_worker


class CustomError(Exception):
    pass


@pytest.fixture
def app() -> Iterator[App]:
    app = App("inproc", broker="memory://", backend="memory://", enqueue_allow=["builtins.sum"])
    calls: list[Any] = []
    app.calls = calls  # type: ignore[attr-defined]

    @app.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="t.tsum")
    def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(name="t.fail")
    def fail(message: str = "boom") -> None:
        raise CustomError(message)

    @app.task(name="t.record")
    def record(*args: Any) -> None:
        calls.append(args)

    @app.task(name="t.flaky", bind=True, max_retries=3, default_retry_delay=0.05)
    def flaky(self: Any, succeed_on: int) -> int:
        if self.request.retries < succeed_on:
            raise self.retry(exc=ConnectionError(f"attempt {self.request.retries}"))
        return int(self.request.retries)

    @app.task(name="t.auto", autoretry_for=(ConnectionError,), max_retries=2, retry_backoff=0.01)
    def auto() -> None:
        calls.append("auto")
        raise ConnectionError("still down")

    @app.task(name="t.progress", bind=True)
    def progress(self: Any, release: float) -> str:
        self.update_state(state="PROGRESS", meta={"done": 1, "total": 2})
        time.sleep(release)
        return "done"

    @app.task(name="t.slow", soft_time_limit=0.2)
    def slow() -> str:
        try:
            # Short sleeps: in the threads pool the limit lands between bytecodes, not in C.
            for _ in range(100):
                time.sleep(0.05)
        except SoftTimeLimitExceeded:
            return "cleaned up"
        return "never"

    @app.task(name="t.quiet", ignore_result=True)
    def quiet() -> None:
        calls.append("quiet")

    yield app
    app.close()


def test_result_and_states(app: App) -> None:
    with start_worker(app):
        result = app.tasks["t.add"].delay(4, 4)
        assert result.get(timeout=5) == 8
        assert result.state == "SUCCESS" and result.status == "SUCCESS"
        assert result.ready() and result.successful() and not result.failed()
        assert isinstance(result.date_done, datetime.datetime)
        assert result.traceback is None


def test_failure_reraises_the_tasks_own_exception(app: App) -> None:
    with start_worker(app):
        result = app.tasks["t.fail"].delay("broken")
        with pytest.raises(CustomError, match="broken"):
            result.get(timeout=5)
        assert result.failed() and result.state == "FAILURE"
        assert "CustomError: broken" in (result.traceback or "")
        assert isinstance(result.result, CustomError)
        assert isinstance(result.get(timeout=1, propagate=False), CustomError)


def test_unimportable_exception_becomes_task_error(app: App) -> None:
    record = {
        "task_id": "x1",
        "status": "FAILURE",
        "traceback": "Traceback...\nGone: away",
        "result": {"exc_type": "Gone", "exc_module": "no_such_module", "exc_message": ["away"]},
        "children": [],
        "date_done": None,
    }
    app.backend.store("x1", record, ttl_s=None)
    with pytest.raises(TaskError) as info:
        app.AsyncResult("x1").get(timeout=1)
    assert info.value.exc_type == "no_such_module.Gone"
    assert info.value.exc_message == "away"
    assert info.value.traceback == "Traceback...\nGone: away"


def test_get_times_out_with_taskframes_timeout_error(app: App) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 0.3s"):
        app.tasks["t.add"].delay(1, 1).get(timeout=0.3)
    assert 0.25 < time.monotonic() - started < 2


def test_wrong_arguments_sent_by_name_fail_with_type_error(app: App) -> None:
    with start_worker(app):
        result = app.send_task("t.add", args=[1])
        with pytest.raises(TypeError, match="missing a required argument"):
            result.get(timeout=5)
        assert app.tasks["t.add"].delay(1, 2).get(timeout=5) == 3  # the worker kept going


def test_chain_passes_each_result_on(app: App) -> None:
    add = app.tasks["t.add"]
    with start_worker(app):
        result = (add.s(4, 4) | add.s(8)).delay()
        assert result.get(timeout=5) == 16
        assert result.parent is not None and result.parent.get(timeout=5) == 8
        assert chain(add.s(1, 1), add.si(5, 5), add.s(1)).delay().get(timeout=5) == 11


def test_group_and_chord(app: App) -> None:
    add, tsum = app.tasks["t.add"], app.tasks["t.tsum"]
    with start_worker(app, concurrency=2):
        gres = group(add.s(i, i) for i in range(10)).delay()
        assert gres.get(timeout=10) == [i + i for i in range(10)]
        assert gres.completed_count() == 10
        assert chord((add.s(i, i) for i in range(5)), tsum.s()).delay().get(timeout=10) == 20
        assert chord([add.s(1, 2)])(tsum.s()).get(timeout=10) == 3


def test_chord_header_failure_is_a_chord_error(app: App) -> None:
    add, tsum, fail = app.tasks["t.add"], app.tasks["t.tsum"], app.tasks["t.fail"]
    with start_worker(app):
        result = chord([add.s(1, 1), fail.s("header broke")], tsum.s()).delay()
        with pytest.raises(ChordError, match="header broke"):
            result.get(timeout=10)


def test_a_dead_lettered_task_fails_with_its_errbacks_and_its_chord(app: App) -> None:
    # Given max_deliveries=1, a task with an errback and a chord, whose messages were each
    # delivered once and never acked (their worker died: here a consumer lets the leases run out)
    app.conf.max_deliveries = 1
    app.conf.visibility_timeout = 0.2
    add, tsum, record = app.tasks["t.add"], app.tasks["t.tsum"], app.tasks["t.record"]
    lone = add.apply_async((1, 2), link_error=record.s())
    joined = chord([add.s(1, 1)], tsum.s()).delay()
    unrecorded = add.apply_async((2, 3), link_error=record.s(), ignore_result=True)
    crashed = app.broker.consumer([app.conf.default_queue], prefetch=3).receive(1.0, max_messages=3)
    assert len(crashed) == 3
    time.sleep(0.4)
    # When a worker finds them, Then it dead-letters them and fails each task at once:
    # its result, its errback, and its chord (whose body does not run)
    with start_worker(app):
        with pytest.raises(DeliveryLimitExceeded, match=r"delivered 1 times .*max_deliveries=1"):
            lone.get(timeout=10)
        with pytest.raises(ChordError, match="DeliveryLimitExceeded"):
            joined.get(timeout=10)
        deadline = time.monotonic() + 5
        while len(app.calls) < 2 and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.02)
    # (the task that ignores its result has its errback called too: it did not finish)
    assert sorted(app.calls) == sorted([(lone.id,), (unrecorded.id,)])  # type: ignore[attr-defined]
    assert app.broker.stats(app.conf.default_queue).dead == 3


def test_a_task_dead_lettered_by_a_receive_that_then_lost_the_connection_still_fails(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a task whose one delivery was never acked (max_deliveries=1), and a consumer
    # whose first receive dead-letters it and then loses its connection (a crash of the
    # network, which this stands in for)
    app.conf.max_deliveries = 1
    app.conf.visibility_timeout = 0.2
    lone = app.tasks["t.add"].apply_async((1, 2), link_error=app.tasks["t.record"].s())
    assert len(app.broker.consumer([app.conf.default_queue], prefetch=1).receive(1.0)) == 1
    time.sleep(0.4)
    make_consumer = app.broker.consumer

    lost: list[bool] = []

    class LosesItsConnectionOnce:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def receive(self, timeout_s: float, *, max_messages: int = 1) -> Any:
            got = self.inner.receive(timeout_s, max_messages=max_messages)
            if not lost:
                lost.append(True)
                raise BrokerConnectionError("lost the connection to the test broker")
            return got

        def ack_and_receive(self, acks: Any, timeout_s: float, *, max_messages: int = 1) -> Any:
            self.inner.ack_many(acks)
            return self.receive(timeout_s, max_messages=max_messages)

    monkeypatch.setattr(app.broker, "consumer", lambda *a, **kw: LosesItsConnectionOnce(make_consumer(*a, **kw)))
    # When a worker's first receive buries it and raises, Then the worker reconnects and the
    # task still fails at once, with its errback, as if the connection had stayed up
    with start_worker(app):
        with pytest.raises(DeliveryLimitExceeded):
            lone.get(timeout=10)
        deadline = time.monotonic() + 5
        while not app.calls and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.02)
    assert app.calls == [(lone.id,)]  # type: ignore[attr-defined]


def test_tasks_prefetched_by_workers_that_stop_are_not_dead_lettered(app: App) -> None:
    # Given max_deliveries=2, and three tasks that three workers in a row (a rolling restart)
    # each prefetch, behind a more urgent task that keeps their one slot busy, and hand back
    # at their warm shutdown without running them
    app.conf.max_deliveries = 2
    progress, add = app.tasks["t.progress"], app.tasks["t.add"]
    waiting = [add.delay(i, i) for i in range(3)]
    for _ in range(3):
        blocker = progress.apply_async((0.3,), priority=9)
        with start_worker(app, pool="threads", concurrency=1):
            deadline = time.monotonic() + 5
            while (blocker.state != "PROGRESS" or app.broker.stats(app.conf.default_queue).ready) and (
                time.monotonic() < deadline
            ):
                time.sleep(0.01)  # the worker holds all four: one runs, three wait
        assert blocker.get(timeout=5) == "done"
        assert app.broker.stats(app.conf.default_queue).ready == 3
    # When a worker finally has room for them, Then they run: their hand-backs did not count
    with start_worker(app):
        assert [r.get(timeout=5) for r in waiting] == [0, 2, 4]
    assert app.broker.stats(app.conf.default_queue).dead == 0


def test_a_celery_chord_on_a_backend_that_cannot_join_it_fails_its_body_clearly(app: App) -> None:
    # Given a header task as Celery sends it (the body's signature in embed.chord, without the
    # size, which Celery keeps in its Redis backend only), on the in-memory backend
    body: dict[str, Any] = {
        "task": "t.tsum",
        "args": [],
        "kwargs": {},
        "options": {"task_id": "celery-body"},
        "subtask_type": None,
    }
    with start_worker(app):
        header = app.send_task("t.add", (1, 1), group_id="celery-group", group_index=0, chord=body)
        # Then the header task's result stands, and the body fails at once, saying what to do
        assert header.get(timeout=5) == 2
        with pytest.raises(ChordError, match="use the Redis result backend"):
            app.AsyncResult("celery-body").get(timeout=5)
        # And the worker goes on
        assert app.tasks["t.add"].delay(2, 2).get(timeout=5) == 4


def test_retry_keeps_the_id_and_counts(app: App) -> None:
    with start_worker(app):
        result = app.tasks["t.flaky"].delay(2)
        assert result.get(timeout=10) == 2


def test_retries_exhausted_fail_with_the_original_exception(app: App) -> None:
    with start_worker(app):
        result = app.tasks["t.auto"].delay()
        with pytest.raises(ConnectionError, match="still down"):
            result.get(timeout=10)
    assert app.calls.count("auto") == 3  # type: ignore[attr-defined]  # first run + max_retries=2


def test_links_get_the_result_or_the_failed_id(app: App) -> None:
    add, fail, rec = app.tasks["t.add"], app.tasks["t.fail"], app.tasks["t.record"]
    with start_worker(app):
        add.apply_async((2, 2), link=rec.s("ok")).get(timeout=5)
        failed = fail.apply_async(link_error=rec.s())
        with pytest.raises(CustomError):
            failed.get(timeout=5)
        deadline = time.monotonic() + 5
        while len(app.calls) < 2 and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.02)
    assert sorted(app.calls, key=repr) == sorted([(4, "ok"), (failed.id,)], key=repr)  # type: ignore[attr-defined]


def test_custom_state_meta_is_the_result(app: App) -> None:
    with start_worker(app):
        result = app.tasks["t.progress"].delay(0.5)
        deadline = time.monotonic() + 5
        while result.state != "PROGRESS" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert result.state == "PROGRESS"
        assert result.result == {"done": 1, "total": 2}
        assert result.get(timeout=5) == "done"


def test_soft_time_limit_raises_inside_the_task(app: App) -> None:
    with start_worker(app):
        assert app.tasks["t.slow"].delay().get(timeout=5) == "cleaned up"


def test_revoked_and_expired_tasks_end_revoked(app: App) -> None:
    add = app.tasks["t.add"]
    revoked = add.delay(1, 1)
    revoked.revoke()
    expired = add.apply_async((1, 1), expires=0.01)
    time.sleep(0.05)
    with start_worker(app):
        with pytest.raises(TaskRevokedError):
            revoked.get(timeout=5)
        with pytest.raises(TaskRevokedError, match="expired"):
            expired.get(timeout=5)
        assert revoked.state == "REVOKED" and expired.state == "REVOKED"


def test_a_revoke_made_while_the_worker_runs_is_honoured(app: App) -> None:
    add = app.tasks["t.add"]
    with start_worker(app):
        assert add.delay(1, 1).get(timeout=5) == 2  # the worker has read the revoked ids once
        later = add.apply_async((2, 2), countdown=0.3)
        later.revoke()  # done before the broker hands the message out
        with pytest.raises(TaskRevokedError, match="revoked"):
            later.get(timeout=5)
        assert add.delay(3, 3).get(timeout=5) == 6
    assert later.state == "REVOKED" and app.is_revoked(later.id)


def test_revoked_messages_are_discarded_from_a_batch_the_others_run(app: App) -> None:
    add = app.tasks["t.add"]
    results = [add.delay(i, i) for i in range(6)]
    for result in results[::2]:
        result.revoke()
    with start_worker(app, pool="solo"):
        assert [r.get(timeout=5) for r in results[1::2]] == [2, 6, 10]
        for result in results[::2]:
            with pytest.raises(TaskRevokedError):
                result.get(timeout=5)
    assert app.broker.stats("celery").ready == 0 and app.broker.stats("celery").reserved == 0


def test_ignore_result_and_forget(app: App) -> None:
    with start_worker(app):
        quiet = app.tasks["t.quiet"].delay()
        result = app.tasks["t.add"].delay(1, 1)
        assert result.get(timeout=5) == 2
        deadline = time.monotonic() + 5
        while "quiet" not in app.calls and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.01)
    assert quiet.state == "PENDING"
    result.forget()
    assert result.state == "PENDING"


def test_unknown_task_and_garbage_are_dead_lettered_and_the_worker_goes_on(app: App) -> None:
    broker = app.broker
    with start_worker(app):
        unknown = app.send_task("t.nope", args=[1])
        broker.publish("celery", Envelope(body=b"\x00 not json", headers={"id": "garbage-1", "task": "t.add"}))
        os_system = app.send_task("os.system", args=["echo pwned"])
        with pytest.raises(NotRegistered, match="unknown task 't.nope'"):
            unknown.get(timeout=5)
        with pytest.raises(NotRegistered, match="enqueue_allow"):
            os_system.get(timeout=5)
        assert app.AsyncResult("garbage-1").state == "FAILURE"
        assert app.tasks["t.add"].delay(2, 2).get(timeout=5) == 4
    dead = broker.dead_letters("celery")
    assert {d.task for d in dead} == {"t.nope", "t.add", "os.system"}
    assert any("cannot decode" in d.reason for d in dead)


def test_a_follow_up_that_cannot_be_built_leaves_the_finished_task_alone(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    # A chain step with an option no apply_async accepts: sending it fails the same way on
    # every run, so the task must run once, keep its result, and the worker must go on.
    record = app.tasks["t.record"]
    step = {"task": "t.record", "args": ["next"], "kwargs": {}, "options": {"no_such_option": 1}}
    result = record.apply_async(args=["first"], chain=[step])
    with start_worker(app):
        assert result.get(timeout=5) is None
        assert app.tasks["t.add"].delay(1, 2).get(timeout=5) == 3
    assert app.calls == [("first",)]  # type: ignore[attr-defined]
    assert result.state == "SUCCESS"
    assert app.broker.dead_letters("celery") == []
    assert app.broker.stats("celery").ready == 0
    assert any("succeeded, but the next step of its chain could not be sent" in r.message for r in caplog.records)


def test_rq_style_enqueue_runs_allowed_paths(app: App) -> None:
    with start_worker(app):
        job = app.enqueue(sum, [42, 43])
        assert job.get(timeout=5) == 85
        assert job.result == 85


def test_group_result_restores_in_another_app_object(app: App) -> None:
    add = app.tasks["t.add"]
    with start_worker(app, concurrency=2):
        saved = group(add.s(1, 1), add.s(2, 2)).delay()
        restored = app.GroupResult.restore(saved.id)
        assert restored is not None
        assert [r.id for r in restored.results] == [r.id for r in saved.results]
        assert restored.get(timeout=10) == [2, 4]
        assert restored.ready() and restored.successful() and not restored.failed()
    assert app.GroupResult.restore("no-such-group") is None


def test_retry_without_raise_still_ends_the_attempt(app: App) -> None:
    attempts: list[int] = []

    @app.task(name="t.retry_call", bind=True, max_retries=1, default_retry_delay=0.01)
    def retry_call(self: Any) -> str:
        attempts.append(self.request.retries)
        if self.request.retries == 0:
            self.retry()  # Celery semantics: retry() raises, so the line below is not reached
            attempts.append(-1)
        return "second time"

    with start_worker(app):
        assert retry_call.delay().get(timeout=5) == "second time"
    assert attempts == [0, 1]


def test_chain_with_a_group_becomes_a_chord(app: App) -> None:
    add, tsum = app.tasks["t.add"], app.tasks["t.tsum"]
    with start_worker(app, concurrency=2):
        # add(1, 1) = 2; then add(2, 1) and add(2, 2) in parallel; then tsum([3, 4])
        assert chain(add.s(1, 1), group(add.s(1), add.s(2)), tsum.s()).delay().get(timeout=10) == 7
        assert (add.s(1, 1) | group(add.s(1), add.s(2)) | tsum.s() | add.s(100)).delay().get(timeout=10) == 107


def test_groups_of_chains_and_nested_chords(app: App) -> None:
    add, tsum = app.tasks["t.add"], app.tasks["t.tsum"]
    with start_worker(app, concurrency=2):
        chains = group(chain(add.s(i, i), add.s(1)) for i in range(4)).delay()
        assert chains.get(timeout=10) == [1, 3, 5, 7]
        inner = chord([add.s(1, 1), add.s(2, 2)], tsum.s())  # 6
        outer = chord([inner, add.s(10, 10)], tsum.s())  # 6 + 20
        assert outer.delay().get(timeout=10) == 26
        assert chord([chain(add.s(1, 1), add.s(1)), add.s(5, 5)], tsum.s()).delay().get(timeout=10) == 13


def test_immutable_steps_ignore_the_parent_result(app: App) -> None:
    add = app.tasks["t.add"]
    with start_worker(app):
        result = (add.s(1, 1) | add.si(10, 10) | add.s(1)).delay()
        assert result.get(timeout=10) == 21
        assert result.parent is not None and result.parent.get(timeout=10) == 20


def test_map_starmap_and_chunks(app: App) -> None:
    add, tsum = app.tasks["t.add"], app.tasks["t.tsum"]
    with start_worker(app, concurrency=2):
        assert tsum.map([[1, 2], [3, 4]]).delay().get(timeout=10) == [3, 7]
        assert add.starmap([(1, 2), (3, 4)]).delay().get(timeout=10) == [3, 7]
        parts = add.chunks(zip(range(10), range(10), strict=True), 3).delay()
        assert parts.get(timeout=10) == [[0, 2, 4], [6, 8, 10], [12, 14, 16], [18]]


def test_results_convert_like_arguments_or_fail_clearly(app: App) -> None:
    @app.task(name="t.when")
    def when() -> datetime.date:
        return datetime.date(2026, 11, 25)

    @app.task(name="t.opaque")
    def opaque() -> object:
        return object()

    with start_worker(app):
        assert when.delay().get(timeout=5) == "2026-11-25"
        with pytest.raises(TypeError, match="cannot be stored as JSON"):
            opaque.delay().get(timeout=5)


def test_calling_a_chain_or_group_sends_it(app: App) -> None:
    add = app.tasks["t.add"]
    with start_worker(app):
        assert (add.s(1, 1) | add.s(2))().get(timeout=5) == 4
        assert group(add.s(1, 1), add.s(2, 2))().get(timeout=5) == [2, 4]


def test_a_result_that_cannot_be_stored_sends_the_message_back(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a backend that fails once when the worker stores a result (an outage)
    from taskframe.exceptions import BackendError

    backend = app.backend
    real_store = backend.store
    failures: list[str] = []

    def store_failing_once(task_id: str, record: dict[str, Any], *, ttl_s: float | None) -> None:
        if record["status"] == "SUCCESS" and not failures:
            failures.append(task_id)
            msg = "backend unreachable (simulated outage)"
            raise BackendError(msg)
        real_store(task_id, record, ttl_s=ttl_s)

    monkeypatch.setattr(backend, "store", store_failing_once)
    # When the task runs, Then the message goes back and its second run stores the result
    with start_worker(app):
        result = app.tasks["t.add"].delay(2, 3)
        assert result.get(timeout=10) == 5
    assert failures == [result.id]


def test_retry_delays_back_off_exponentially_with_a_cap(app: App) -> None:
    @app.task(name="t.backoff", retry_backoff=2, retry_backoff_max=10, retry_jitter=False)
    def backoff() -> None: ...

    @app.task(name="t.jitter", retry_backoff=True, retry_jitter=True)
    def jitter() -> None: ...

    @app.task(name="t.fixed", default_retry_delay=7)
    def fixed() -> None: ...

    assert [backoff.retry_delay_s(n) for n in range(5)] == [2, 4, 8, 10, 10]
    assert all(0 <= jitter.retry_delay_s(3) <= 8 for _ in range(50))
    assert len({jitter.retry_delay_s(3) for _ in range(50)}) > 1
    assert fixed.retry_delay_s(4) == 7


def test_time_limits_from_apply_async_and_settings(app: App) -> None:
    @app.task(name="t.loop")
    def loop() -> str:
        try:
            for _ in range(200):
                time.sleep(0.02)
        except SoftTimeLimitExceeded:
            return "stopped"
        return "finished"

    with start_worker(app):
        assert loop.apply_async(soft_time_limit=0.2).get(timeout=5) == "stopped"
        app.conf.task_soft_time_limit = 0.2
        assert loop.delay().get(timeout=5) == "stopped"


def test_chord_header_failure_runs_the_bodys_link_error(app: App) -> None:
    add, tsum, fail, rec = app.tasks["t.add"], app.tasks["t.tsum"], app.tasks["t.fail"], app.tasks["t.record"]
    with start_worker(app, concurrency=2):
        result = chord([add.s(1, 1), fail.s("no")], tsum.s().set(link_error=rec.s())).delay()
        with pytest.raises(ChordError, match="no"):
            result.get(timeout=10)
        deadline = time.monotonic() + 5
        while not app.calls and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.02)
    assert app.calls == [(result.id,)]  # type: ignore[attr-defined]


def test_a_refused_batch_ack_falls_back_to_one_by_one(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a broker that refuses every batch ack (as if one delivery in it were bad)
    from taskframe.exceptions import BrokerError

    consumer_class = type(app.broker.consumer(["celery"], prefetch=1))

    refused: list[int] = []

    def refuse(self: Any, deliveries: Any) -> None:
        refused.append(len(deliveries))
        raise BrokerError("batch refused")

    monkeypatch.setattr(consumer_class, "ack_many", refuse)
    add = app.tasks["t.add"]
    results = [add.delay(i, 1) for i in range(8)]
    # When a solo worker runs them in batches, Then each is acked on its own and none is left
    with start_worker(app, pool="solo"):
        assert [r.get(timeout=5) for r in results] == [i + 1 for i in range(8)]
        deadline = time.monotonic() + 5
        while app.broker.stats("celery").reserved and time.monotonic() < deadline:
            time.sleep(0.01)
    assert refused and max(refused) > 1
    stats = app.broker.stats("celery")
    assert (stats.ready, stats.reserved, stats.dead) == (0, 0, 0)


def test_a_batch_ack_lost_to_the_connection_is_retried(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    consumer_class: Any = type(app.broker.consumer(["celery"], prefetch=1))
    real_ack_many = consumer_class.ack_many
    lost: list[int] = []

    def lose_first(self: Any, deliveries: Any) -> None:
        if not lost:
            lost.append(len(deliveries))
            raise BrokerConnectionError("connection reset")
        real_ack_many(self, deliveries)

    monkeypatch.setattr(consumer_class, "ack_many", lose_first)
    add = app.tasks["t.add"]
    results = [add.delay(i, 1) for i in range(8)]
    with start_worker(app, pool="solo"):
        assert [r.get(timeout=5) for r in results] == [i + 1 for i in range(8)]
        deadline = time.monotonic() + 5
        while app.broker.stats("celery").reserved and time.monotonic() < deadline:
            time.sleep(0.01)
    assert lost and lost[0] > 1  # a real batch was lost, then sent again
    stats = app.broker.stats("celery")
    assert (stats.ready, stats.reserved, stats.dead) == (0, 0, 0)


def test_a_finished_task_is_acked_while_another_still_runs(app: App) -> None:
    # The acks of finished tasks ride with the worker's next receive (AcksWithReceive): they
    # must not wait for a task still running in the pool, nor for the queue to get new work.
    broker = app.broker
    queue = app.conf.default_queue
    with start_worker(app, concurrency=2):
        long_running = app.tasks["t.progress"].delay(1.5)
        quick = app.tasks["t.add"].delay(1, 1)
        assert quick.get(timeout=5) == 2
        deadline = time.monotonic() + 0.5
        while broker.stats(queue).reserved > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert broker.stats(queue).reserved == 1  # only the running one is still held
        assert long_running.get(timeout=5) == "done"
    assert broker.stats(queue).reserved == 0
