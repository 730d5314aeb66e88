"""Canvas through real worker processes, on every result backend a worker process can share:
the backend joins each chord (Celery's keys on Redis, an atomic counter elsewhere), and the
body runs exactly once."""

from __future__ import annotations

import signal
import time
import uuid
from typing import Any

import pytest

from taskframe import chain, chord, group
from taskframe.backend import ChordPart, chord_joiner
from taskframe.exceptions import ChordError
from taskframe.execution import store_state
from taskframe.result import AsyncResult, GroupResult

pytestmark = pytest.mark.slow


def test_chord_of_100_over_two_workers_survives_a_sigkill(make_tasks: Any, worker_backend_url: str) -> None:
    # Given a chord of 100 additions and two workers, one of which is killed mid-header
    tasks = make_tasks(backend_url=worker_backend_url, visibility_timeout=1.0)
    result = chord((tasks.slow_add.s(i, i) for i in range(100)), tasks.tsum_noted.s()).delay()
    doomed = tasks.start_worker("-P", "prefork", "-c", "2")
    tasks.start_worker("-P", "prefork", "-c", "2")
    assert result.parent is not None
    header = tasks.app.GroupResult.restore(result.parent.id)
    assert header is not None and len(header) == 100
    deadline = time.monotonic() + 30
    while header.completed_count() < 20:
        assert time.monotonic() < deadline, "the header made no progress"
        time.sleep(0.05)
    doomed.send_signal(signal.SIGKILL)
    # Then the body runs once, with every result, in order
    assert result.get(timeout=60) == sum(2 * i for i in range(100))
    assert tasks.lines("body.txt") == ["100"]


def test_chord_header_failure_is_a_chord_error(make_tasks: Any, worker_backend_url: str) -> None:
    tasks = make_tasks(backend_url=worker_backend_url)
    tasks.start_worker("-P", "threads", "-c", "2")
    result = chord([tasks.add.s(1, 1), tasks.boom.s("header broke")], tasks.tsum_noted.s()).delay()
    with pytest.raises(ChordError, match="header broke"):
        result.get(timeout=30)
    assert tasks.lines("body.txt") == []


def test_chain_with_a_group_returns_7(make_tasks: Any, worker_backend_url: str) -> None:
    tasks = make_tasks(backend_url=worker_backend_url)
    tasks.start_worker("-P", "threads", "-c", "2")
    workflow = chain(tasks.add.s(1, 1), group(tasks.add.s(1), tasks.add.s(2)), tasks.tsum_noted.s())
    assert workflow.delay().get(timeout=30) == 7


def test_a_header_task_reported_again_never_sends_the_body_twice(make_tasks: Any, worker_backend_url: str) -> None:
    # Given a chord of three whose header tasks report to the backend, one of them twice
    # (a redelivered message runs its task again)
    app = make_tasks(backend_url=worker_backend_url).app
    group_id, ids = str(uuid.uuid4()), [str(uuid.uuid4()) for _ in range(3)]
    GroupResult(group_id, [AsyncResult(i, app) for i in ids], app=app).save()
    joiner = chord_joiner(app.backend)
    joiner.chord_start(group_id, 3, ttl_s=60)

    def report(index: int) -> Any:
        store_state(app, ids[index], "SUCCESS", index * 10)
        return joiner.chord_part_return(ChordPart(group_id, index, ids[index], "SUCCESS", index * 10, 3), ttl_s=60)

    assert [report(0), report(0), report(1)] == [None, None, None]
    # When the last one reports, it alone gets the header's results, in order
    join = report(2)
    assert join is not None and join.parts == [(ids[i], "SUCCESS", i * 10) for i in range(3)]
    assert report(2) is None and report(0) is None
    # And a claim given back (the body could not be sent) passes to the next report, once
    joiner.chord_release(join)
    again = report(2)
    assert again is not None and again.parts == join.parts
    assert report(1) is None
    # And once the body was sent, no report sends it again
    joiner.chord_done(again)
    assert [report(0), report(1), report(2)] == [None, None, None]
