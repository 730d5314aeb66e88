"""Execution semantics through real worker processes, on every broker a worker process can
share (the conformance table): expiry, revoke, time limits, rate limits, acks, callbacks."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pytest

from taskframe.exceptions import NotRegistered, TaskRevokedError
from tests.conftest import stop_worker

pytestmark = pytest.mark.slow


def wait_for_state(result: Any, state: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while result.state != state:
        assert time.monotonic() < deadline, f"state stayed {result.state}, expected {state}"
        time.sleep(0.02)


def test_expired_task_is_not_run_and_ends_revoked(make_tasks: Any, worker_broker_url: str) -> None:
    tasks = make_tasks(worker_broker_url)
    expired = tasks.add_noted.apply_async((1, 1, "expired"), expires=0.3)
    time.sleep(0.6)
    tasks.start_worker("-P", "solo")
    with pytest.raises(TaskRevokedError, match="expired"):
        expired.get(timeout=20)
    assert expired.state == "REVOKED"
    assert tasks.add_noted.delay(1, 2, "fresh").get(timeout=20) == 3
    assert tasks.lines("runs.txt") == ["fresh"]


def test_revoke_is_durable_for_a_worker_started_later(make_tasks: Any, worker_broker_url: str) -> None:
    tasks = make_tasks(worker_broker_url)
    revoked = tasks.add_noted.delay(1, 1, "revoked")
    revoked.revoke()  # no worker is running: the revoke is stored, not broadcast
    tasks.start_worker("-P", "solo")
    with pytest.raises(TaskRevokedError):
        revoked.get(timeout=20)
    assert tasks.add_noted.delay(1, 2, "kept").get(timeout=20) == 3
    assert tasks.lines("runs.txt") == ["kept"]


def test_revoke_with_terminate_stops_a_running_task(make_tasks: Any, worker_broker_url: str) -> None:
    tasks = make_tasks(worker_broker_url, worker_heartbeat_interval=0.2)
    running = tasks.sleep_then.delay(30, "victim")
    worker = tasks.start_worker("-P", "prefork", "-c", "1")
    tasks.wait_for_line("started.txt", 1)
    running.revoke(terminate=True)
    wait_for_state(running, "REVOKED", timeout_s=10)
    assert tasks.add.delay(2, 2).get(timeout=20) == 4  # a fresh child took over
    assert tasks.lines("finished.txt") == []
    code, output = stop_worker(worker)
    assert code == 0, output


def test_soft_time_limit_lets_a_prefork_task_clean_up(make_tasks: Any, worker_broker_url: str) -> None:
    tasks = make_tasks(worker_broker_url)
    tasks.start_worker("-P", "prefork", "-c", "1")
    started = time.monotonic()
    assert tasks.soft_limited.delay().get(timeout=20) == "cleaned up"
    assert time.monotonic() - started < 5


def test_rate_limit_spaces_one_task_without_blocking_others(make_tasks: Any, worker_broker_url: str) -> None:
    tasks = make_tasks(worker_broker_url)
    limited = [tasks.limited.delay(i) for i in range(6)]
    other = tasks.add.delay(20, 22)
    tasks.start_worker("-P", "threads", "-c", "2")
    assert other.get(timeout=20) == 42
    assert [r.get(timeout=20) for r in limited] == list(range(6))
    stamps = sorted(float(t) for t in tasks.lines("limited.txt"))
    assert stamps[-1] - stamps[0] >= 0.9  # 6 tasks at 5/s: at least 5 gaps of 0.2 s (minus jitter)
    assert other.date_done is not None and limited[-1].date_done is not None
    assert other.date_done < limited[-1].date_done  # the unlimited task did not wait behind them


def test_acks_late_false_is_at_most_once(make_tasks: Any, worker_broker_url: str) -> None:
    tasks = make_tasks(worker_broker_url, visibility_timeout=0.5)
    lost = tasks.at_most_once.delay(30, "once")
    first = tasks.start_worker("-P", "solo")
    tasks.wait_for_line("at_most_once.txt", 1)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    tasks.start_worker("-P", "solo")
    assert tasks.add.delay(1, 1).get(timeout=20) == 2
    time.sleep(1.0)  # past the lease: an unacked message would be back by now
    assert tasks.lines("at_most_once.txt") == ["once"]
    assert lost.state == "PENDING"
    stats = tasks.app.broker.stats(tasks.queue)
    assert (stats.ready, stats.reserved) == (0, 0)


def test_received_and_started_states_are_tracked(make_tasks: Any, worker_broker_url: str) -> None:
    tasks = make_tasks(worker_broker_url)
    result = tasks.tracked.delay(1.5)
    tasks.start_worker("-P", "solo")
    wait_for_state(result, "STARTED")
    assert result.info == {"pid": result.info["pid"], "hostname": result.info["hostname"]}
    assert result.get(timeout=20) == "tracked"


def test_update_state_shows_a_custom_state(make_tasks: Any, worker_broker_url: str) -> None:
    tasks = make_tasks(worker_broker_url)
    result = tasks.progress.delay(1.0)
    tasks.start_worker("-P", "threads", "-c", "1")
    wait_for_state(result, "PROGRESS")
    assert result.result == {"step": 1}
    assert result.get(timeout=20) == "done"


def test_max_tasks_per_child_replaces_children(make_tasks: Any, worker_broker_url: str) -> None:
    tasks = make_tasks(worker_broker_url)
    tasks.start_worker("-P", "prefork", "-c", "1", "--max-tasks-per-child", "2")
    pids = [tasks.pid.delay().get(timeout=20) for _ in range(4)]
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[0] != pids[2]


def test_link_and_link_error_callbacks(make_tasks: Any, worker_broker_url: str) -> None:
    tasks = make_tasks(worker_broker_url)
    tasks.start_worker("-P", "threads", "-c", "2")
    tasks.add.apply_async((2, 2), link=tasks.record.s("ok")).get(timeout=20)
    failed = tasks.boom.apply_async(("bad",), link_error=tasks.record.s())
    with pytest.raises(ValueError, match="bad"):
        failed.get(timeout=20)
    lines = tasks.wait_for_line("callbacks.txt", 2)
    assert sorted(lines) == sorted([json.dumps([4, "ok"], separators=(",", ":")), json.dumps([failed.id])])


def test_rq_style_enqueue_runs_only_allowed_paths(make_tasks: Any, worker_broker_url: str) -> None:
    tasks = make_tasks(worker_broker_url, enqueue_allow=["builtins.sum"])
    tasks.start_worker("-P", "prefork", "-c", "1")
    job = tasks.app.enqueue(sum, [42, 43])
    deadline = time.monotonic() + 20
    while job.result is None:  # the seed's RQ loop: .result stays None until the job is done
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert job.result == 85
    refused = tasks.app.send_task("os.system", args=["touch pwned"])
    with pytest.raises(NotRegistered, match="enqueue_allow"):
        refused.get(timeout=20)
    assert not (tasks.dir / "pwned").exists()
    assert tasks.add.delay(1, 2).get(timeout=20) == 3  # the worker keeps serving
    with pytest.raises(ValueError, match="lambda"):
        tasks.app.enqueue(lambda: 1)
