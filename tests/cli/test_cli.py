"""The `taskframe` command as a user types it: app discovery, --json, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import stop_worker


def taskframe(
    *args: str, cwd: Path, env: dict[str, str] | None = None, stdin: str | None = None, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskframe", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        input=stdin,
        check=False,
    )


def assert_one_line_error(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("taskframe: error: ")
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_call_wait_result_and_app_before_or_after_the_command(make_tasks: Any) -> None:
    tasks = make_tasks()
    worker = tasks.start_worker("-P", "threads", "-c", "2")
    waited = taskframe(
        "-A", tasks.name, "call", f"{tasks.name}.add", "--args", "[2, 3]", "--wait", "--timeout", "20", cwd=tasks.dir
    )
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout.splitlines() == ["SUCCESS", "5"]
    sent = taskframe("call", f"{tasks.name}.add", "--args", "[20, 22]", "-A", tasks.name, "--json", cwd=tasks.dir)
    task_id = json.loads(sent.stdout)["id"]
    shown = taskframe("result", task_id, "--wait", "--timeout", "20", "--json", "-A", tasks.name, cwd=tasks.dir)
    assert json.loads(shown.stdout) == {"id": task_id, "state": "SUCCESS", "result": 42}
    failed = taskframe(
        "result", tasks.boom.delay("bad").id, "--wait", "--timeout", "20", "-A", tasks.name, cwd=tasks.dir
    )
    assert failed.returncode == 1
    assert failed.stdout.splitlines()[0] == "FAILURE"
    assert json.loads(failed.stdout.splitlines()[1]) == {"exc_type": "ValueError", "exc_message": "bad"}
    stop_worker(worker)


def test_app_from_environment_and_pyproject(make_tasks: Any) -> None:
    tasks = make_tasks()
    tasks.add.apply_async((1, 1), queue="reports")
    from_env = taskframe("status", "-Q", "reports", cwd=tasks.dir, env={"TASKFRAME_APP": tasks.name})
    assert "queue reports: 1 ready" in from_env.stdout, from_env.stderr
    (tasks.dir / "pyproject.toml").write_text(f'[tool.taskframe]\napp = "{tasks.name}:app"\n')
    from_pyproject = taskframe("status", "--json", "-Q", "reports", cwd=tasks.dir)
    queues = {q["queue"]: q for q in json.loads(from_pyproject.stdout)["queues"]}
    assert queues["reports"]["ready"] == 1
    assert queues[tasks.queue]["ready"] == 0


def test_purge_asks_and_refuses_without_a_terminal(make_tasks: Any) -> None:
    tasks = make_tasks()
    for i in range(3):
        tasks.add.delay(i, i)
    refused = taskframe("purge", "-A", tasks.name, cwd=tasks.dir, stdin="")
    assert_one_line_error(refused, "no terminal", "-f")
    assert tasks.app.broker.stats(tasks.queue).ready == 3
    forced = taskframe("purge", "-f", "-A", tasks.name, cwd=tasks.dir)
    assert forced.stdout.strip() == f"purged 3 message(s) from {tasks.queue}"
    assert tasks.app.broker.stats(tasks.queue).ready == 0


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["-A", "no_such_module", "status"], ["cannot import the app module 'no_such_module'"]),
        (["worker"], ["no app given", "-A module"]),
        (["call", "tasks.add", "--args", "[1,"], ["--args is not valid JSON"]),
        (["call", "tasks.add", "--args", '{"x": 1}'], ["--args must be a JSON list"]),
    ],
)
def test_errors_are_one_line(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    done = taskframe(*args, cwd=tmp_path, env={"TASKFRAME_BROKER_URL": f"sqlite:///{tmp_path}/q.db"})
    assert_one_line_error(done, *fragments)


def test_bad_broker_url_is_one_line_with_the_password_masked(tmp_path: Path) -> None:
    done = taskframe("status", cwd=tmp_path, env={"TASKFRAME_BROKER_URL": "reddis://user:hunter2@host/0"})
    assert_one_line_error(done, "unknown broker scheme 'reddis'", "user:***@host")
    assert "hunter2" not in done.stderr + done.stdout


def test_worker_with_an_unusable_broker_exits_1_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("a file where a directory should be")
    module = tmp_path / "tf_bad_broker.py"
    module.write_text(
        f"from taskframe import App\napp = App('x', broker='sqlite:///{tmp_path}/blocked/q.db', "
        f"backend='sqlite:///{tmp_path}/r.db', broker_connect_timeout=1)\n"
    )
    done = taskframe("worker", "-A", "tf_bad_broker", "-P", "solo", cwd=tmp_path, timeout_s=30)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "blocked/q.db" in done.stderr


def test_python_dash_m_and_the_console_script_are_the_same_cli(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "taskframe"
    assert script.exists()
    helped = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True, timeout=30)
    assert "worker" in helped.stdout and "dead" in helped.stdout
    worker_help = taskframe("worker", "--help", cwd=tmp_path)
    for flag in ("-Q", "-c", "-P", "--prefetch", "--max-tasks-per-child", "--shutdown-timeout", "--burst", "-A"):
        assert flag in worker_help.stdout


def test_worker_json_logs_one_object_per_line(make_tasks: Any) -> None:
    tasks = make_tasks()
    tasks.add.delay(2, 2)
    done = taskframe("worker", "-A", tasks.name, "-P", "solo", "--burst", "--json", cwd=tasks.dir)
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stderr.splitlines()]
    assert any(e["message"].startswith(f"Task {tasks.name}.add[") and e["message"].endswith(": 4") for e in entries)
    assert {e["level"] for e in entries} <= {"info", "warning"}


def test_worker_retries_an_unreachable_broker_then_exits_1(tmp_path: Path) -> None:
    # Nothing listens on port 1: every attempt fails at once, as with a broker that is down.
    (tmp_path / "tf_down_broker.py").write_text(
        "from taskframe import App\n"
        "app = App('x', broker='redis://user:hunter2@127.0.0.1:1/0', "
        f"backend='sqlite:///{tmp_path}/r.db', broker_connect_timeout=2)\n"
    )
    started = time.monotonic()
    done = taskframe("worker", "-A", "tf_down_broker", "-P", "solo", cwd=tmp_path, timeout_s=60)
    assert done.returncode == 1
    assert time.monotonic() - started < 30
    retries = [line for line in done.stderr.splitlines() if "cannot reach the broker (attempt" in line]
    assert len(retries) >= 2, done.stderr  # a line per attempt
    assert "cannot reach the broker redis://user:***@127.0.0.1:1/0 after" in done.stderr
    assert "hunter2" not in done.stderr and "Traceback" not in done.stderr
