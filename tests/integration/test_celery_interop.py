"""Wire interop with real Celery 5: both frameworks share queues and the Redis result backend.

For each broker pairing (taskframe's ``amqp://`` beside Celery's ``amqp://`` on RabbitMQ, and
taskframe's ``kombu+redis://`` beside Celery's ``redis://`` on Redis) a real ``celery worker``
consumes queue ``CQ`` and a real ``taskframe worker`` consumes queue ``TQ``. Producers of each
side send to the other side's queue, and read the results with their own ``AsyncResult``.
One tasks module, imported by this process and both workers, defines each task once for both
apps under the same name (``tasks.add``, ...). Results live in Redis DB 14, which no other
test suite uses (tests/redis_service.py: 11-13); every queue name and task id is fresh.
"""

from __future__ import annotations

import datetime
import importlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import celery  # type: ignore[import-untyped]
import pytest

from tests import rabbitmq_service, redis_service
from tests.conftest import CI

# Celery's Redis result backend calls redis-py's setex, which redis-py 8 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")

#: The Redis database of this file's results and (for kombu+redis) queues.
INTEROP_DB = redis_service.INTEROP_DB
RESULT_TIMEOUT_S = 20.0

TASKS_SOURCE = '''
"""Tasks for both frameworks: each function is registered with both apps under one name."""

import functools
import os
import time

from celery import Celery

from taskframe import App

NOTES = {notes!r}

app = App("interop", broker={tf_broker!r}, backend={backend!r}, default_queue={tq!r})
capp = Celery("interop", broker={celery_broker!r}, backend={backend!r})
capp.conf.update(
    task_default_queue={cq!r},
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


class Declined(Exception):
    """An exception of the tasks module itself: both sides can import and rebuild it."""


def note(name, value):
    with open(os.path.join(NOTES, name), "a") as handle:
        handle.write(str(value) + "\\n")


def add(x, y):
    return x + y


def fail(message="boom"):
    raise ValueError(message)


def decline(amount):
    raise Declined("card declined", amount)


def stamp(value):
    """When the task ran (epoch seconds), to check a countdown."""
    return [value, time.time()]


def flaky(self, tag):
    """Retries once, 0.3 s later, then returns how often it was retried."""
    note("flaky-" + tag, self.request.retries)
    if self.request.retries < 1:
        raise self.retry(exc=ConnectionError("try again"), countdown=0.3, max_retries=2)
    return self.request.retries


def collect(values, tag):
    """A chord body: notes that it ran (once per run) and returns the header's results as given."""
    note("body-" + tag, len(values))
    return values


def spawn(x):
    """Sends a child task (to the same side's queue) while it runs: the record lists it."""
    child = app.send_task("tasks.add", (x, x)) if RUNS_ON_TASKFRAME else capp.send_task("tasks.add", (x, x))
    return child.id


RUNS_ON_TASKFRAME = os.environ.get("INTEROP_SIDE") == "taskframe"

# shared=False: Celery otherwise adds each task to every Celery app (a test session has two).
for register in (app.task, functools.partial(capp.task, shared=False)):
    register(name="tasks.add")(add)
    register(name="tasks.fail")(fail)
    register(name="tasks.decline")(decline)
    register(name="tasks.stamp")(stamp)
    register(name="tasks.flaky", bind=True)(flaky)
    register(name="tasks.spawn")(spawn)
    register(name="tasks.collect")(collect)
'''


@dataclass
class Pairing:
    """How taskframe and Celery reach the same broker."""

    name: str
    taskframe_url: str
    celery_url: str


def _pairings() -> list[Any]:
    return [pytest.param("amqp", id="amqp"), pytest.param("kombu+redis", id="kombu+redis")]


def _pairing(kind: str) -> Pairing:
    if kind == "amqp":
        reason = rabbitmq_service.unavailable()
        url = rabbitmq_service.url()
        pairing = Pairing(kind, url, url)
    else:
        reason = redis_service.unavailable()
        url = redis_service.url(INTEROP_DB)
        pairing = Pairing(kind, "kombu+" + url, url)
    if reason:
        if CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return pairing


class Interop:
    """The tasks module, both apps, and one worker of each framework."""

    def __init__(self, directory: Path, pairing: Pairing) -> None:
        self.dir = directory
        self.pairing = pairing
        token = uuid.uuid4().hex[:10]
        self.module_name = f"interop_tasks_{token}"
        #: The queue of the taskframe worker, and that of the Celery worker.
        self.tq, self.cq = f"tf-{token}", f"celery-{token}"
        source = TASKS_SOURCE.format(
            notes=str(directory),
            tf_broker=pairing.taskframe_url,
            celery_broker=pairing.celery_url,
            backend=redis_service.url(INTEROP_DB),
            tq=self.tq,
            cq=self.cq,
        )
        (directory / f"{self.module_name}.py").write_text(source)
        sys.path.insert(0, str(directory))
        self.module: ModuleType = importlib.import_module(self.module_name)
        self.app = self.module.app
        self.capp = self.module.capp
        self.workers: list[subprocess.Popen[bytes]] = []

    def start_workers(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.dir), os.environ.get("PYTHONPATH", "")])}
        for key in [k for k in env if k.startswith(("TASKFRAME_", "CELERY_"))]:
            del env[key]
        bin_dir = Path(sys.executable).parent
        celery_command = [
            str(bin_dir / "celery"),
            "-A",
            f"{self.module_name}:capp",
            "worker",
            "--pool",
            "solo",
            "-Q",
            self.cq,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "info",
            "-n",
            f"celery-{self.cq}@%h",
        ]
        taskframe = [sys.executable, "-m", "taskframe", "worker", "-A", f"{self.module_name}:app", "-P", "solo"]
        for name, command, side in (("celery", celery_command, "celery"), ("taskframe", taskframe, "taskframe")):
            log = (self.dir / f"{name}-worker.log").open("wb")
            self.workers.append(
                subprocess.Popen(
                    command,
                    cwd=self.dir,
                    env={**env, "INTEROP_SIDE": side},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()

    def worker_log(self, name: str) -> str:
        path = self.dir / f"{name}-worker.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def notes(self, name: str) -> list[str]:
        path = self.dir / name
        return path.read_text().split() if path.exists() else []

    def close(self) -> None:
        for process in self.workers:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
        self.app.close()
        close_celery_client(self.capp)
        sys.modules.pop(self.module_name, None)
        sys.path.remove(str(self.dir))


def close_celery_client(capp: Any) -> None:
    """Close every connection the Celery client app opened: ``Celery.close()`` leaves its
    producers' broker connections and its Redis backend's pub/sub and pool open."""
    backend = capp.backend
    consumer = getattr(backend, "result_consumer", None)
    if consumer is not None and getattr(consumer, "_pubsub", None) is not None:
        consumer.stop()
    capp.amqp.producer_pool.connections.force_close_all()
    capp.close()
    client = getattr(backend, "client", None)
    if client is not None:
        client.connection_pool.disconnect()


@pytest.fixture(scope="module", params=_pairings())
def interop(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Interop]:
    pairing = _pairing(request.param)
    setup = Interop(tmp_path_factory.mktemp(f"interop-{pairing.name.replace('+', '-')}"), pairing)
    try:
        setup.start_workers()
        yield setup
    finally:
        setup.close()


def test_a_celery_send_task_runs_on_a_taskframe_worker(interop: Interop) -> None:
    sent = interop.capp.send_task("tasks.add", (2, 3), queue=interop.tq)
    assert sent.get(timeout=RESULT_TIMEOUT_S) == 5
    assert sent.state == "SUCCESS"
    mine = interop.app.AsyncResult(sent.id)
    assert (mine.state, mine.result) == ("SUCCESS", 5)


def test_a_taskframe_delay_runs_on_a_celery_worker(interop: Interop) -> None:
    sent = interop.module.app.tasks["tasks.add"].apply_async((2, 3), queue=interop.cq)
    assert sent.get(timeout=RESULT_TIMEOUT_S) == 5
    theirs = interop.capp.AsyncResult(sent.id)
    assert (theirs.state, theirs.result) == ("SUCCESS", 5)


def test_a_taskframe_failure_reaches_celery_as_its_class_and_message(interop: Interop) -> None:
    sent = interop.capp.send_task("tasks.fail", ("boom",), queue=interop.tq)
    with pytest.raises(ValueError) as failed:
        sent.get(timeout=RESULT_TIMEOUT_S)
    assert failed.value.args == ("boom",)
    assert sent.state == "FAILURE"
    assert "ValueError: boom" in (sent.traceback or "")
    declined = interop.capp.send_task("tasks.decline", (12,), queue=interop.tq)
    with pytest.raises(interop.module.Declined) as raised:
        declined.get(timeout=RESULT_TIMEOUT_S)
    assert raised.value.args == ("card declined", 12)


def test_a_celery_failure_reaches_taskframe_as_its_class_and_message(interop: Interop) -> None:
    sent = interop.app.send_task("tasks.fail", ("boom",), queue=interop.cq)
    with pytest.raises(ValueError) as failed:
        sent.get(timeout=RESULT_TIMEOUT_S)
    assert failed.value.args == ("boom",)
    assert sent.state == "FAILURE"
    assert "ValueError: boom" in (sent.traceback or "")
    declined = interop.app.send_task("tasks.decline", (12,), queue=interop.cq)
    with pytest.raises(interop.module.Declined) as raised:
        declined.get(timeout=RESULT_TIMEOUT_S)
    assert raised.value.args == ("card declined", 12)


def test_the_stored_failure_is_celery_s_exception_encoding(interop: Interop) -> None:
    # Given one failure stored by each worker
    by_taskframe = interop.capp.send_task("tasks.decline", (7,), queue=interop.tq)
    by_celery = interop.app.send_task("tasks.decline", (7,), queue=interop.cq)
    for result in (by_taskframe, by_celery):
        with pytest.raises(Exception, match="card declined"):
            result.get(timeout=RESULT_TIMEOUT_S)
    records = [interop.app.backend.fetch(r.id) for r in (by_taskframe, by_celery)]
    # Then both records hold the same exception fields, as Celery's backend writes them
    expected = {"exc_type": "Declined", "exc_module": interop.module_name, "exc_message": ["card declined", 7]}
    assert [r["result"] if r else None for r in records] == [expected, expected]
    assert all(r and r["status"] == "FAILURE" and r["date_done"] for r in records)


def test_date_done_is_an_aware_datetime_on_both_sides(interop: Interop) -> None:
    before = datetime.datetime.now(datetime.timezone.utc)
    by_taskframe = interop.capp.send_task("tasks.add", (1, 1), queue=interop.tq)
    by_celery = interop.app.send_task("tasks.add", (1, 1), queue=interop.cq)
    assert by_taskframe.get(timeout=RESULT_TIMEOUT_S) == by_celery.get(timeout=RESULT_TIMEOUT_S) == 2
    after = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)
    for task_id in (by_taskframe.id, by_celery.id):
        celery_done = interop.capp.AsyncResult(task_id).date_done
        taskframe_done = interop.app.AsyncResult(task_id).date_done
        assert isinstance(celery_done, datetime.datetime) and isinstance(taskframe_done, datetime.datetime)
        assert celery_done == taskframe_done
        assert before <= taskframe_done <= after


def _chain_steps(interop: Interop, signature: Any) -> list[Any]:
    # add(1, 2) on taskframe, + 10 on Celery, + 100 on taskframe: each side pops the other's chain
    return [
        signature("tasks.add", (1, 2), queue=interop.tq),
        signature("tasks.add", (10,), queue=interop.cq),
        signature("tasks.add", (100,), queue=interop.tq),
    ]


def test_a_celery_chain_runs_across_both_workers(interop: Interop) -> None:
    steps = _chain_steps(interop, lambda name, args, queue: interop.capp.signature(name, args, queue=queue))
    last: Any = celery.chain(*steps).apply_async()
    assert last.get(timeout=RESULT_TIMEOUT_S) == 113
    assert last.parent.get(timeout=1) == 13
    assert last.parent.parent.get(timeout=1) == 3


def test_a_taskframe_chain_runs_across_both_workers(interop: Interop) -> None:
    from taskframe import chain

    steps = _chain_steps(interop, lambda name, args, queue: interop.app.signature(name, args, queue=queue))
    last: Any = chain(*steps).apply_async()
    assert last.get(timeout=RESULT_TIMEOUT_S) == 113
    assert last.parent.get(timeout=1) == 13
    assert last.parent.parent.get(timeout=1) == 3


def test_a_celery_countdown_is_honoured_by_taskframe(interop: Interop) -> None:
    sent_at = time.time()
    result = interop.capp.send_task("tasks.stamp", ("late",), queue=interop.tq, countdown=2)
    value, ran_at = result.get(timeout=RESULT_TIMEOUT_S)
    # taskframe runs a message that arrives within 0.5 s of its ETA (execution.EARLY_ETA_TOLERANCE_S)
    assert value == "late" and 1.5 <= ran_at - sent_at < 6, ran_at - sent_at


def test_a_taskframe_countdown_is_honoured_by_celery(interop: Interop) -> None:
    sent_at = time.time()
    result = interop.app.send_task("tasks.stamp", ("late",), queue=interop.cq, countdown=2)
    value, ran_at = result.get(timeout=RESULT_TIMEOUT_S)
    assert value == "late" and 1.9 <= ran_at - sent_at < 6, ran_at - sent_at


def test_a_celery_task_retries_on_a_taskframe_worker(interop: Interop) -> None:
    tag = uuid.uuid4().hex[:8]
    result = interop.capp.send_task("tasks.flaky", (tag,), queue=interop.tq)
    assert result.get(timeout=RESULT_TIMEOUT_S) == 1
    assert interop.notes(f"flaky-{tag}") == ["0", "1"]


def test_a_taskframe_task_retries_on_a_celery_worker(interop: Interop) -> None:
    tag = uuid.uuid4().hex[:8]
    result = interop.app.send_task("tasks.flaky", (tag,), queue=interop.cq)
    assert result.get(timeout=RESULT_TIMEOUT_S) == 1
    assert interop.notes(f"flaky-{tag}") == ["0", "1"]


def test_a_retry_count_sent_by_one_side_is_the_other_s_request_retries(interop: Interop) -> None:
    # A message that says it is retry 1 is not retried again by either worker's flaky task
    tags = [uuid.uuid4().hex[:8] for _ in range(2)]
    by_celery = interop.capp.send_task("tasks.flaky", (tags[0],), queue=interop.tq, retries=1)
    by_taskframe = interop.app.send_task("tasks.flaky", (tags[1],), queue=interop.cq, retries=1)
    assert [by_celery.get(timeout=RESULT_TIMEOUT_S), by_taskframe.get(timeout=RESULT_TIMEOUT_S)] == [1, 1]
    assert [interop.notes(f"flaky-{tag}") for tag in tags] == [["1"], ["1"]]


def _receive_raw(interop: Interop, queue: str) -> Any:
    """The next message of ``queue`` as Celery's transport (kombu) reads it, acknowledged."""
    import kombu

    with kombu.Connection(interop.pairing.celery_url) as connection:  # type: ignore[attr-defined,no-untyped-call]
        simple = connection.SimpleQueue(queue)
        try:
            message = simple.get(timeout=10)
            message.ack()
            return message
        finally:
            simple.close()


def _shape(value: Any) -> Any:
    """The JSON types of a value, recursively: what must agree between two producers."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_shape(item) for item in value]
    return type(value).__name__


def _sent_both_ways(interop: Interop, build: Any) -> tuple[Any, Any]:
    """Celery's and taskframe's message for the same call, as Celery's transport reads them.

    ``build(app, signature, queue)`` sends the call with either app; ``signature`` builds a
    signature of that app. Each goes to a fresh queue no worker consumes.
    """
    import kombu

    token = uuid.uuid4().hex[:8]
    queues = {"celery": f"raw-celery-{token}", "taskframe": f"raw-tf-{token}"}
    with kombu.Connection(interop.pairing.celery_url) as connection:  # type: ignore[attr-defined,no-untyped-call]
        for queue in queues.values():  # declared as Celery declares them, so neither message is dropped
            connection.SimpleQueue(queue).close()
    build(interop.capp, interop.capp.signature, queues["celery"])
    build(interop.app, interop.app.signature, queues["taskframe"])
    return _receive_raw(interop, queues["celery"]), _receive_raw(interop, queues["taskframe"])


def _headers(message: Any) -> dict[str, Any]:
    # RabbitMQ's own x-death headers, added when its dead-lettering carried a delay, are not ours.
    return {k: v for k, v in message.headers.items() if not k.startswith("x-")}


#: Headers whose value depends on the call (ids, times, the sending process).
VARYING_HEADERS = {"id", "root_id", "eta", "expires", "origin", "ignore_result"}


def test_a_taskframe_message_reads_exactly_as_celery_s_own(interop: Interop) -> None:
    # Given the same call made by each producer
    def send(app: Any, signature: Any, queue: str) -> None:
        link = signature("tasks.add", (1,))
        app.send_task("tasks.add", (2, 3), queue=queue, link=link, expires=60, time_limit=5, soft_time_limit=2.5)

    theirs, ours = _sent_both_ways(interop, send)
    # Then the headers are the same, value for value where a value does not depend on the call
    assert set(_headers(ours)) == set(theirs.headers)
    assert {k: v for k, v in _headers(ours).items() if k not in VARYING_HEADERS} == {
        k: v for k, v in theirs.headers.items() if k not in VARYING_HEADERS
    }
    assert ours.headers["argsrepr"] == "(2, 3)"
    assert _shape(ours.headers["timelimit"]) == _shape(theirs.headers["timelimit"]) == ["int", "float"]
    assert ours.headers["root_id"] == ours.headers["id"] == ours.properties["correlation_id"]
    moments = [datetime.datetime.fromisoformat(m.headers["expires"]) for m in (ours, theirs)]
    assert all(m.utcoffset() == datetime.timedelta(0) for m in moments)  # ISO-8601 in UTC, as Celery
    assert abs((moments[0] - moments[1]).total_seconds()) < 5
    # And the properties and the body [args, kwargs, embed], the link in Celery's signature form
    assert (ours.content_type, ours.content_encoding) == (theirs.content_type, theirs.content_encoding)
    assert ours.properties.get("delivery_mode") == theirs.properties.get("delivery_mode")
    our_body, their_body = ours.decode(), theirs.decode()
    assert our_body[:2] == their_body[:2] == [[2, 3], {}]
    assert set(our_body[2]) == set(their_body[2]) == {"callbacks", "errbacks", "chain", "chord"}
    [our_link], [their_link] = our_body[2]["callbacks"], their_body[2]["callbacks"]
    assert {k: our_link[k] for k in their_link} == their_link


def test_a_countdown_travels_as_celery_s_eta_header(interop: Interop) -> None:
    def send(app: Any, signature: Any, queue: str) -> None:
        app.send_task("tasks.add", (2, 3), queue=queue, countdown=1)

    sent_at = datetime.datetime.now(datetime.timezone.utc)
    theirs, ours = _sent_both_ways(interop, send)
    moments = [datetime.datetime.fromisoformat(m.headers["eta"]) for m in (ours, theirs)]
    assert all(m.utcoffset() == datetime.timedelta(0) for m in moments)
    assert all(0.5 < (m - sent_at).total_seconds() < 5 for m in moments)


def test_a_chain_travels_in_embed_as_celery_s(interop: Interop) -> None:
    def send(app: Any, signature: Any, queue: str) -> None:
        steps = [signature("tasks.add", (2, 3), queue=queue), signature("tasks.add", (10,), queue="next")]
        (steps[0] | steps[1] | signature("tasks.add", (100,))).apply_async()

    theirs, ours = _sent_both_ways(interop, send)
    our_chain, their_chain = ours.decode()[2]["chain"], theirs.decode()[2]["chain"]
    # The steps still to run, last first (the worker pops the end), in Celery's signature form
    assert [(s["task"], s["args"]) for s in our_chain] == [(s["task"], s["args"]) for s in their_chain]
    assert [s["args"] for s in our_chain] == [[100], [10]]
    for our_step, their_step in zip(our_chain, their_chain, strict=True):
        assert set(their_step) <= set(our_step)
        assert our_step["options"].get("queue") == their_step["options"].get("queue")
        assert (our_step["subtask_type"], our_step["immutable"]) == (None, False)


def test_children_written_by_celery_read_as_taskframe_results(interop: Interop) -> None:
    # Given a task that sends a child task while it runs on the Celery worker
    parent = interop.app.send_task("tasks.spawn", (4,), queue=interop.cq)
    child_id = parent.get(timeout=RESULT_TIMEOUT_S)
    # Then taskframe reads Celery's children tuples as result handles of their own
    [child] = parent.children
    assert child.id == child_id
    assert child.get(timeout=RESULT_TIMEOUT_S) == 8
    assert [c.id for c in interop.capp.AsyncResult(parent.id).children] == [child_id]


def test_children_written_by_taskframe_read_as_celery_results(interop: Interop) -> None:
    parent = interop.capp.send_task("tasks.spawn", (4,), queue=interop.tq)
    child_id = parent.get(timeout=RESULT_TIMEOUT_S)
    [child] = parent.children
    assert child.id == child_id
    assert child.get(timeout=RESULT_TIMEOUT_S) == 8
    assert [c.id for c in interop.app.AsyncResult(parent.id).children] == [child_id]


def test_a_group_saved_by_taskframe_is_restored_by_celery(interop: Interop) -> None:
    from taskframe import group

    add = interop.app.tasks["tasks.add"]
    sent = group(add.s(i, i).set(queue=interop.cq) for i in range(3)).apply_async()
    restored = interop.capp.GroupResult.restore(sent.id)
    assert restored is not None
    assert [r.id for r in restored.results] == [r.id for r in sent.results]
    assert restored.get(timeout=RESULT_TIMEOUT_S) == [0, 2, 4]
    # Celery's workers stored each member's group, as for a group of their own
    assert {interop.capp.backend.get_task_meta(r.id).get("group_id") for r in sent.results} == {sent.id}


def test_a_group_saved_by_celery_is_restored_by_taskframe(interop: Interop) -> None:
    sent = celery.group(interop.capp.signature("tasks.add", (i, i), queue=interop.tq) for i in range(3)).apply_async()
    sent.save()
    restored = interop.app.GroupResult.restore(sent.id)
    assert restored is not None
    assert [r.id for r in restored.results] == [r.id for r in sent.results]
    assert restored.get(timeout=RESULT_TIMEOUT_S) == [0, 2, 4]
    assert sent.get(timeout=RESULT_TIMEOUT_S) == [0, 2, 4]


def test_a_chord_travels_as_celery_s(interop: Interop) -> None:
    # Given the same chord sent by each producer
    def send(app: Any, signature: Any, queue: str) -> None:
        header = [signature("tasks.add", (i, i), queue=queue) for i in range(2)]
        body = signature("tasks.collect", ("wire",), queue="elsewhere")
        sent = (celery.chord if app is interop.capp else _taskframe_chord)(header, body).apply_async()
        if app is interop.capp:  # nothing will run them: end Celery's subscriptions to their results now
            for task_id in [sent.id, *(r.id for r in sent.parent.results)]:
                interop.capp.backend.result_consumer.cancel_for(task_id)

    theirs, ours = _sent_both_ways(interop, send)
    # Then embed.chord is the body's signature, in Celery's form, with the header's size on it
    our_body, their_body = ours.decode()[2]["chord"], theirs.decode()[2]["chord"]
    assert set(their_body) <= set(our_body)
    assert (
        (our_body["task"], our_body["args"]) == (their_body["task"], their_body["args"]) == ("tasks.collect", ["wire"])
    )
    assert our_body["options"]["queue"] == their_body["options"]["queue"] == "elsewhere"
    assert our_body["chord_size"] == 2
    # And the header task names its group and its place in it, as Celery's does
    for message in (ours, theirs):
        assert message.headers["group"] and message.headers["group_index"] == 0
    # (reply_to names Celery's RPC result queue: taskframe has none)
    assert set(their_body["options"]) - {"reply_to"} == set(our_body["options"]) == {"queue", "task_id", "group_id"}
    assert our_body["options"]["group_id"] == ours.headers["group"]


def _taskframe_chord(header: list[Any], body: Any) -> Any:
    from taskframe import chord

    return chord(header, body)


def _chord_parts(interop: Interop, signature: Any, queues: list[str], body_queue: str) -> tuple[list[Any], Any, str]:
    """Header tasks add(i, i) for i in 0..len(queues)-1, each on the given queue, and a body that
    notes each of its runs under a fresh tag."""
    tag = uuid.uuid4().hex[:8]
    header = [signature("tasks.add", (i, i), queue=queue) for i, queue in enumerate(queues)]
    return header, signature("tasks.collect", (tag,), queue=body_queue), tag


def test_a_celery_chord_runs_its_header_on_taskframe_workers(interop: Interop) -> None:
    # Given a Celery chord whose header runs on the taskframe worker, its body on Celery's
    header, body, tag = _chord_parts(interop, interop.capp.signature, [interop.tq] * 4, interop.cq)
    result = celery.chord(header, body).apply_async()
    # Then the body gets every header result, in header order, once
    assert result.get(timeout=RESULT_TIMEOUT_S) == [0, 2, 4, 6]
    assert interop.notes(f"body-{tag}") == ["4"]
    assert [r.get(timeout=1) for r in result.parent.results] == [0, 2, 4, 6]


def test_a_taskframe_chord_runs_its_header_on_a_celery_worker(interop: Interop) -> None:
    # Given a taskframe chord whose header runs on the Celery worker, its body on taskframe's
    header, body, tag = _chord_parts(interop, interop.app.signature, [interop.cq] * 4, interop.tq)
    result = _taskframe_chord(header, body).apply_async()
    # Then Celery's worker joins it and sends the body, which gets the results in order, once
    assert result.get(timeout=RESULT_TIMEOUT_S) == [0, 2, 4, 6]
    assert interop.notes(f"body-{tag}") == ["4"]
    assert interop.capp.AsyncResult(result.id).get(timeout=1) == [0, 2, 4, 6]


@pytest.mark.parametrize("sender", ["celery", "taskframe"])
def test_a_chord_split_across_both_workers_fires_its_body_once(interop: Interop, sender: str) -> None:
    # Given chords whose header tasks alternate between the two workers, from either sender
    queues = [interop.tq, interop.cq] * 5
    tags, results = [], []
    for body_queue in (interop.tq, interop.cq):
        if sender == "celery":
            header, body, tag = _chord_parts(interop, interop.capp.signature, queues, body_queue)
            results.append(celery.chord(header, body).apply_async())
        else:
            header, body, tag = _chord_parts(interop, interop.app.signature, queues, body_queue)
            results.append(_taskframe_chord(header, body).apply_async())
        tags.append(tag)
    # Then each body runs once, with all ten results in header order
    expected = [2 * i for i in range(10)]
    assert [r.get(timeout=RESULT_TIMEOUT_S) for r in results] == [expected, expected]
    time.sleep(0.5)  # a second run of a body would come within this
    assert [interop.notes(f"body-{tag}") for tag in tags] == [["10"], ["10"]]


@pytest.mark.parametrize("sender", ["celery", "taskframe"])
def test_a_failed_header_task_on_either_worker_fails_the_chord(interop: Interop, sender: str) -> None:
    # Given a chord whose header fails on one worker and succeeds on the other, from either sender
    signature = interop.capp.signature if sender == "celery" else interop.app.signature
    for failing_queue, other_queue in ((interop.tq, interop.cq), (interop.cq, interop.tq)):
        tag = uuid.uuid4().hex[:8]
        header = [
            signature("tasks.add", (1, 1), queue=other_queue),
            signature("tasks.fail", ("header broke",), queue=failing_queue),
        ]
        body = signature("tasks.collect", (tag,), queue=other_queue)
        result = (celery.chord if sender == "celery" else _taskframe_chord)(header, body).apply_async()
        # Then the body fails with a chord error naming the failure, and does not run (read on
        # its own: Celery's get() would raise the header's error first)
        with pytest.raises(Exception, match="header broke") as failed:
            interop.app.AsyncResult(result.id).get(timeout=RESULT_TIMEOUT_S)
        assert type(failed.value).__name__ == "ChordError"
        if sender == "celery":  # Celery's handles read the same (and so drop their subscriptions)
            assert "header broke" in str(result.get(timeout=RESULT_TIMEOUT_S, propagate=False))
            assert [str(r) for r in result.parent.get(timeout=RESULT_TIMEOUT_S, propagate=False)] == [
                "2",
                "header broke",
            ]
        assert interop.notes(f"body-{tag}") == []


@pytest.mark.parametrize("sender", ["celery", "taskframe"])
def test_a_header_task_that_retries_keeps_its_place_in_the_chord(interop: Interop, sender: str) -> None:
    # Given a chord whose first header task retries once on each worker (a retry is a new message)
    signature = interop.capp.signature if sender == "celery" else interop.app.signature
    tags = [uuid.uuid4().hex[:8] for _ in range(3)]
    header = [
        signature("tasks.flaky", (tags[0],), queue=interop.tq),
        signature("tasks.add", (5, 5), queue=interop.tq),
        signature("tasks.flaky", (tags[1],), queue=interop.cq),
        signature("tasks.add", (7, 7), queue=interop.cq),
    ]
    body = signature("tasks.collect", (tags[2],), queue=interop.tq)
    result = (celery.chord if sender == "celery" else _taskframe_chord)(header, body).apply_async()
    # Then the body gets the results in header order, once
    assert result.get(timeout=RESULT_TIMEOUT_S) == [1, 10, 1, 14]
    assert interop.notes(f"body-{tags[2]}") == ["4"]
