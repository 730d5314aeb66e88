"""Real `taskframe worker` processes on the embedded SQLite broker: crashes, shutdowns,
time limits, dead letters, and a 2,000-task burst drained by two children."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from taskframe.exceptions import DeliveryLimitExceeded, TimeLimitExceeded
from tests.conftest import stop_worker

pytestmark = pytest.mark.slow


def test_sigkill_mid_task_loses_nothing(make_tasks: Any, worker_broker_url: str) -> None:
    # Given a worker that is running a task
    tasks = make_tasks(worker_broker_url, visibility_timeout=1.0)
    result = tasks.sleep_then.delay(2.0, "survivor")
    first = tasks.start_worker("-P", "solo")
    tasks.wait_for_line("started.txt", 1)
    # When the worker is killed with SIGKILL in the middle of it
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    assert tasks.lines("finished.txt") == []
    # Then the next worker runs it again once the lease has ended, and it ends SUCCESS
    tasks.start_worker("-P", "solo")
    assert result.get(timeout=30) == "survivor"
    assert tasks.lines("started.txt") == ["survivor", "survivor"]
    assert tasks.lines("finished.txt") == ["survivor"]


def test_two_thousand_tasks_burst_two_children_none_twice(make_tasks: Any, worker_broker_url: str) -> None:
    tasks = make_tasks(worker_broker_url)
    results = [tasks.add_noted.delay(i, i, i) for i in range(2000)]
    worker = tasks.start_worker("-c", "2", "--burst", "-l", "warning")
    code, output = worker.wait(timeout=240), ""
    assert code == 0, worker.stdout.read() if worker.stdout else output
    assert [r.get(timeout=5) for r in results] == [2 * i for i in range(2000)]
    assert all(r.state == "SUCCESS" for r in results[:50])
    runs = Counter(tasks.lines("runs.txt"))
    assert len(runs) == 2000
    assert max(runs.values()) == 1, [tag for tag, n in runs.items() if n > 1][:10]


def test_warm_shutdown_finishes_running_tasks_and_hands_back_the_rest(make_tasks: Any, worker_broker_url: str) -> None:
    tasks = make_tasks(worker_broker_url)
    running = tasks.sleep_then.delay(1.5, "running")
    waiting = [tasks.add.delay(i, 1) for i in range(3)]
    worker = tasks.start_worker("-P", "solo", "--prefetch", "3")
    tasks.wait_for_line("started.txt", 1)
    code, output = stop_worker(worker)
    assert code == 0, output
    assert "warm shutdown" in output
    assert running.get(timeout=1) == "running"
    # The messages it had prefetched but not started went back to the queue, untouched.
    assert [r.state for r in waiting] == ["PENDING"] * 3
    assert tasks.app.broker.stats(tasks.queue).ready == 3


def test_cold_shutdown_hands_back_the_running_task(make_tasks: Any, worker_broker_url: str) -> None:
    tasks = make_tasks(worker_broker_url)
    running = tasks.sleep_then.delay(30, "interrupted")
    worker = tasks.start_worker("-P", "prefork", "-c", "1")
    tasks.wait_for_line("started.txt", 1)
    worker.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    code, output = stop_worker(worker)
    assert code == 0, output
    assert "cold shutdown" in output
    assert running.state == "PENDING"
    assert tasks.app.broker.stats(tasks.queue).ready == 1  # back in the queue, ready at once


def test_hard_time_limit_replaces_the_child_and_the_worker_goes_on(make_tasks: Any, worker_broker_url: str) -> None:
    tasks = make_tasks(worker_broker_url)
    slow = tasks.too_slow.delay()
    worker = tasks.start_worker("-P", "prefork", "-c", "2")
    started = time.monotonic()
    with pytest.raises(TimeLimitExceeded, match="Time limit"):
        slow.get(timeout=20)
    assert time.monotonic() - started < 6  # time_limit=1; worker start-up included
    assert [tasks.add.delay(i, i).get(timeout=10) for i in range(5)] == [0, 2, 4, 6, 8]
    code, output = stop_worker(worker)
    assert code == 0, output


def test_a_message_that_kills_its_worker_is_dead_lettered(make_tasks: Any, worker_broker_url: str) -> None:
    # Given a task that kills the process running it, and max_deliveries=3
    tasks = make_tasks(worker_broker_url, max_deliveries=3)
    poison = tasks.crash.delay()
    worker = tasks.start_worker("-P", "prefork", "-c", "1")
    # Then after three deliveries it lands in the dead-letter store, and the worker goes on
    tasks.wait_for_line("crashes.txt", 3)
    assert tasks.add.delay(20, 22).get(timeout=20) == 42
    assert len(tasks.lines("crashes.txt")) == 3
    # And its caller is told, instead of waiting on PENDING forever (on SQS the redrive policy
    # moves it on the server, unseen by the worker: it stays PENDING there)
    if not worker_broker_url.startswith("sqs"):
        with pytest.raises(DeliveryLimitExceeded, match=r"delivered 3 times .*max_deliveries=3"):
            poison.get(timeout=10)
        assert poison.state == "FAILURE"
    listed = subprocess.run(
        [sys.executable, "-m", "taskframe", "dead", "list", "-A", tasks.name, "--json"],
        cwd=tasks.dir,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    dead = json.loads(listed.stdout)
    assert [(d["id"], d["task"], d["deliveries"]) for d in dead] == [(poison.id, f"{tasks.name}.crash", 3)]
    status = subprocess.run(
        [sys.executable, "-m", "taskframe", "-A", tasks.name, "status"],
        cwd=tasks.dir,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert f"queue {tasks.queue}: 0 ready, 0 delayed, 0 reserved, 1 dead" in status.stdout
    assert "worker " in status.stdout and "tasks done" in status.stdout
    stop_worker(worker)
    requeued = subprocess.run(
        [sys.executable, "-m", "taskframe", "-A", tasks.name, "dead", "requeue"],
        cwd=tasks.dir,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert f"requeued 1 dead letter(s) of {tasks.queue}" in requeued.stdout
    assert tasks.app.broker.stats(tasks.queue).ready == 1


def test_retry_runs_again_with_the_same_id(make_tasks: Any, worker_broker_url: str) -> None:
    tasks = make_tasks(worker_broker_url)
    result = tasks.flaky.delay(2)
    worker = tasks.start_worker("-P", "threads", "-c", "2")
    assert result.get(timeout=20) == 2
    assert tasks.lines("flaky.txt") == ["0", "1", "2"]
    stop_worker(worker)


def test_countdown_survives_a_worker_restart_and_runs_once(make_tasks: Any, worker_broker_url: str) -> None:
    tasks = make_tasks(worker_broker_url)
    result = tasks.add_noted.apply_async((1, 2, "later"), countdown=2)
    first = tasks.start_worker("-P", "solo")
    time.sleep(0.8)
    code, _ = stop_worker(first)
    assert code == 0 and result.state == "PENDING"
    second = tasks.start_worker("-P", "solo")
    assert result.get(timeout=20) == 3
    stop_worker(second)
    assert tasks.lines("runs.txt") == ["later"]


def test_the_seeds_main_module_pattern(tmp_path: Path, sqlite_url: str) -> None:
    # The seed's script defines App('celery-task') and its task in __main__; the worker is
    # started with -A celery-task. Both must agree on the task's name.
    script = tmp_path / "celery-task.py"
    script.write_text(
        textwrap.dedent(f"""
        from taskframe import App
        app = App('celery-task', broker={sqlite_url!r}, backend={sqlite_url!r})

        @app.task
        def add(x, y):
            return x + y

        if __name__ == '__main__':
            result = add.delay(4, 4)
            print("Task state: %s" % result.state)
            print("Result: %s" % result.get(timeout=30))
            print("Task state: %s" % result.state)
    """)
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "taskframe", "worker", "-A", "celery-task", "-P", "solo"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        run = subprocess.run(
            [sys.executable, "celery-task.py"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        first, *rest = run.stdout.splitlines()
        # The first state races the worker: PENDING unless the worker was quicker than print().
        assert first in ("Task state: PENDING", "Task state: SUCCESS"), run.stderr
        assert rest == ["Result: 8", "Task state: SUCCESS"], run.stderr
    finally:
        code, output = stop_worker(worker)
    assert "Task celery-task.add[" in output and "succeeded in" in output and ": 8" in output


def test_children_die_with_a_killed_worker(make_tasks: Any, worker_broker_url: str) -> None:
    tasks = make_tasks(worker_broker_url)
    tasks.sleep_then.delay(2, "orphan")
    worker = tasks.start_worker("-P", "prefork", "-c", "1")
    tasks.wait_for_line("started.txt", 1)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)
    time.sleep(3)  # longer than the task: a surviving child would have finished it
    assert tasks.lines("finished.txt") == []
