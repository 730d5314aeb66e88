"""Canvas through real worker processes, on every result backend a worker process can share:
chords are decided by the backend's atomic counter, and the body runs exactly once."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from taskframe import chain, chord, group
from taskframe.exceptions import ChordError

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
