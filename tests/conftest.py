"""Shared fixtures: apps on the embedded and in-memory adapters, task modules, worker processes."""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from taskframe import App

ROOT = Path(__file__).resolve().parent.parent
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees a developer's TASKFRAME_* variables."""
    for key in list(os.environ):
        if key.startswith("TASKFRAME_"):
            monkeypatch.delenv(key)


def require_service(name: str, host: str, port: int, how_to_start: str) -> None:
    """Skip locally, fail in CI, when a service the test needs does not answer."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as exc:
        msg = f"{name} is not reachable on {host}:{port} ({exc}); start it with: {how_to_start}"
        if CI:
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture
def memory_app() -> Iterator[App]:
    app = App("memtests", broker="memory://", backend="memory://")
    yield app
    app.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'taskframe.sqlite3'}"  # an absolute path: four slashes


@pytest.fixture
def sqlite_app(sqlite_url: str) -> Iterator[App]:
    app = App("sqlitetests", broker=sqlite_url, backend=sqlite_url)
    yield app
    app.close()


#: The tasks every worker-process test can call; the module is written anew per test.
TASKS_SOURCE = """
import json
import os
import time

from taskframe import App
from taskframe.exceptions import SoftTimeLimitExceeded

app = App(__name__, broker={broker_url!r}, backend={backend_url!r}, default_queue={queue!r}, {settings})


def _note(name, value):
    # Each run appends a line, so a test can count how often a task really ran.
    with open(os.path.join({tmp!r}, name), "a") as handle:
        handle.write(str(value) + "\\n")


@app.task
def add(x, y):
    return x + y


@app.task
def add_noted(x, y, tag):
    _note("runs.txt", tag)
    return x + y


@app.task
def boom(message="boom"):
    raise ValueError(message)


@app.task
def sleep_then(seconds, value):
    _note("started.txt", value)
    time.sleep(seconds)
    _note("finished.txt", value)
    return value


@app.task(time_limit=1)
def too_slow():
    time.sleep(10)
    return "never"


@app.task
def crash():
    _note("crashes.txt", os.getpid())
    os._exit(13)


@app.task(rate_limit="5/s")
def limited(i):
    _note("limited.txt", time.time())
    return i


@app.task(track_started=True)
def tracked(seconds):
    time.sleep(seconds)
    return "tracked"


@app.task(acks_late=False)
def at_most_once(seconds, value):
    _note("at_most_once.txt", value)
    time.sleep(seconds)
    return value


@app.task(soft_time_limit=0.5)
def soft_limited():
    try:
        time.sleep(5)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "never"


@app.task
def pid():
    return os.getpid()


@app.task
def record(*args):
    _note("callbacks.txt", json.dumps(args, separators=(",", ":")))


@app.task(bind=True)
def progress(self, seconds):
    self.update_state(state="PROGRESS", meta={{"step": 1}})
    time.sleep(seconds)
    return "done"


@app.task
def slow_add(x, y):
    time.sleep(0.05)
    return x + y


@app.task
def tsum_noted(values):
    _note("body.txt", len(values))
    return sum(values)


@app.task(bind=True, max_retries=2, default_retry_delay=0.2)
def flaky(self, succeed_on):
    _note("flaky.txt", self.request.retries)
    if self.request.retries < succeed_on:
        raise self.retry(exc=ConnectionError("try again"))
    return self.request.retries
"""


class TaskModule:
    """A freshly written tasks module, importable here and by worker processes."""

    def __init__(self, tmp_path: Path, broker_url: str, backend_url: str, settings: str) -> None:
        self.dir = tmp_path
        self.broker_url = broker_url
        self.name = f"tf_tasks_{uuid.uuid4().hex[:10]}"
        #: A queue of its own, so tests on a shared broker service never see each other's messages.
        self.queue = f"q-{self.name}"
        source = TASKS_SOURCE.format(
            broker_url=broker_url, backend_url=backend_url, queue=self.queue, tmp=str(tmp_path), settings=settings
        )
        (tmp_path / f"{self.name}.py").write_text(textwrap.dedent(source))
        sys.path.insert(0, str(tmp_path))
        self.module: ModuleType = importlib.import_module(self.name)
        self.app: App = self.module.app
        self.workers: list[subprocess.Popen[str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)

    def lines(self, filename: str) -> list[str]:
        path = self.dir / filename
        return path.read_text().split() if path.exists() else []

    def start_worker(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """A real `taskframe worker` process for this module (stderr captured as text)."""
        command = [sys.executable, "-m", "taskframe", "worker", "-A", self.name, *args]
        process = subprocess.Popen(
            command,
            cwd=self.dir,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.workers.append(process)
        return process

    def wait_for_line(self, filename: str, count: int = 1, timeout_s: float = 20.0) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.lines(filename)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        msg = f"{filename} did not get {count} line(s) within {timeout_s}s: {self.lines(filename)}"
        raise AssertionError(msg)

    def close(self) -> None:
        for process in self.workers:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
            if process.stdout:
                process.stdout.close()
        self.app.close()
        sys.modules.pop(self.name, None)
        sys.path.remove(str(self.dir))


def _process_broker_params() -> list[Any]:
    from tests.conformance.brokers import BROKERS

    return [pytest.param(spec, id=spec.name, marks=spec.marks) for spec in BROKERS if spec.crosses_processes]


@pytest.fixture(params=_process_broker_params())
def worker_broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of each broker a worker process can share with this test process."""
    spec = request.param
    why = spec.unavailable()
    if why:
        if CI:
            pytest.fail(why)
        pytest.skip(why)
    url: str = spec.make_url(tmp_path)
    return url


def _process_backend_params() -> list[Any]:
    from tests.conformance.backends import BACKENDS

    return [pytest.param(spec, id=spec.name, marks=spec.marks) for spec in BACKENDS if spec.crosses_processes]


@pytest.fixture(params=_process_backend_params())
def worker_backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of each result backend a worker process can share with this test process."""
    from tests.conformance.backends import ServiceUnavailable

    spec = request.param
    if spec.check is not None:
        try:
            spec.check()
        except ServiceUnavailable as exc:
            if CI:
                pytest.fail(str(exc))
            pytest.skip(str(exc))
    url: str = spec.make_url(tmp_path)
    return url


@pytest.fixture
def make_tasks(tmp_path: Path, sqlite_url: str) -> Iterator[Any]:
    """``make_tasks(visibility_timeout=1.0)`` → a TaskModule on a fresh SQLite file
    (``broker_url=`` puts its queue on another broker; results stay in SQLite)."""
    made: list[TaskModule] = []

    def make(broker_url: str | None = None, backend_url: str | None = None, **settings: Any) -> TaskModule:
        rendered = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        module = TaskModule(tmp_path, broker_url or sqlite_url, backend_url or sqlite_url, rendered)
        made.append(module)
        return module

    yield make
    for module in made:
        module.close()


def stop_worker(process: subprocess.Popen[str], timeout_s: float = 30.0) -> tuple[int, str]:
    """SIGTERM, wait, and return (exit code, output)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=timeout_s)
    return process.returncode, output
