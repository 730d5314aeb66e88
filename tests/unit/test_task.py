"""@app.task, calling conventions, argument binding and validation before anything is sent."""

from __future__ import annotations

import datetime

import pytest

from taskframe import App, AsyncResult
from taskframe.exceptions import ConfigurationError


def ready_count(app: App, queue: str = "celery") -> int:
    stats = app.broker.stats(queue)
    return stats.ready + stats.delayed


def test_task_names_are_module_and_qualname(memory_app: App) -> None:
    @memory_app.task
    def add(x: int, y: int) -> int:
        return x + y

    assert add.name == f"{__name__}.test_task_names_are_module_and_qualname.<locals>.add"
    assert memory_app.tasks[add.name] is add


def test_a_task_in_main_is_named_after_the_app() -> None:
    app = App("celery-task", broker="memory://", backend="memory://")

    def add(x: int, y: int) -> int:
        return x + y

    add.__module__ = "__main__"
    add.__qualname__ = "add"
    assert app.task(add).name == "celery-task.add"


def test_explicit_name_and_local_call(memory_app: App) -> None:
    @memory_app.task(name="tasks.add")
    def add(x: int, y: int) -> int:
        return x + y

    assert add.name == "tasks.add"
    assert add(2, 3) == 5  # a plain call, no queue
    assert ready_count(memory_app) == 0


def test_delay_returns_a_pending_result_and_queues_a_message(memory_app: App) -> None:
    @memory_app.task
    def add(x: int, y: int) -> int:
        return x + y

    result = add.delay(4, 4)
    assert isinstance(result, AsyncResult)
    assert result.state == "PENDING"
    assert ready_count(memory_app) == 1


def test_wrong_arguments_raise_before_sending(memory_app: App) -> None:
    @memory_app.task
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(TypeError, match="missing a required argument: 'y'"):
        add.delay(1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'z'"):
        add.apply_async(args=[1, 2], kwargs={"z": 3})
    assert ready_count(memory_app) == 0


def test_arguments_bind_the_same_on_every_call(memory_app: App) -> None:
    @memory_app.task
    def scale(x: int, factor: int = 2, *, offset: int = 0) -> int:
        return x * factor + offset

    for _ in range(3):  # the first call of each shape binds; later ones reuse what it found
        assert scale.bind_arguments([1, 3], {}) == ([1, 3], {})
        assert scale.bind_arguments([1], {"offset": 5}) == ([1], {"offset": 5})
        assert scale.bind_arguments([], {"x": 1, "factor": 3}) == ([1, 3], {})
        with pytest.raises(TypeError, match="too many positional arguments"):
            scale.bind_arguments([1, 2, 3], {})
        with pytest.raises(TypeError, match="unexpected keyword argument 'y'"):
            scale.bind_arguments([1], {"y": 1})


def test_validate_coerces_and_rejects(memory_app: App) -> None:
    @memory_app.task(validate=True)
    def when(day: datetime.date, times: int) -> str:
        return f"{day.isoformat()} x{times}"

    when.delay("2026-11-25", "3")  # coerced: a date and an int
    message = memory_app.broker.consumer(["celery"], prefetch=1).receive(1.0)[0]
    assert b'"2026-11-25",3' in message.envelope.body
    with pytest.raises(TypeError, match="times: Input should be a valid integer"):
        when.delay("2026-11-25", "many")
    # In the worker, arguments arrive as Python objects again.
    assert when.run_with(["2026-11-25", 3], {}) == "2026-11-25 x3"


def test_apply_async_options(memory_app: App) -> None:
    @memory_app.task(queue="low-priority", priority=2)
    def job() -> None: ...

    job.apply_async()
    assert memory_app.broker.stats("low-priority").ready == 1  # the decorator's queue
    job.apply_async(queue="other", countdown=30)
    assert memory_app.broker.stats("other").delayed == 1
    with pytest.raises(ValueError, match="priority 10 is out of range: use 0 to 9"):
        job.apply_async(priority=10)
    with pytest.raises(TypeError, match="unknown apply_async option"):
        job.apply_async(countdwn=3)
    with pytest.raises(TypeError, match="countdown or eta"):
        job.apply_async(countdown=1, eta=datetime.datetime.now(datetime.timezone.utc))


def test_routes_send_by_glob(memory_app: App) -> None:
    memory_app.conf.task_routes = {"reports.*": "slow"}
    memory_app.send_task("reports.monthly")
    assert memory_app.broker.stats("slow").ready == 1


def test_unknown_decorator_option_is_refused(memory_app: App) -> None:
    with pytest.raises(TypeError, match="unknown @app.task option"):
        memory_app.task(retries=3)(lambda: None)


def test_signature_from_the_most_recent_app() -> None:
    from taskframe import signature

    app = App("recent", broker="memory://", backend="memory://")
    sig = signature("tasks.add", args=(1, 2))
    assert sig.app is app
    assert app.signature("tasks.add", args=(1, 2)) == sig


def test_enqueue_refuses_what_a_worker_cannot_import(memory_app: App) -> None:
    def nested() -> None: ...

    with pytest.raises(ValueError, match="lambda"):
        memory_app.enqueue(lambda: 1)
    with pytest.raises(ValueError, match="nested function"):
        memory_app.enqueue(nested)
    with pytest.raises(ValueError, match="bound method"):
        memory_app.enqueue("abc".upper)
    assert ready_count(memory_app) == 0
    assert memory_app.enqueue(sum, [1, 2]).result is None
    assert ready_count(memory_app) == 1


def test_no_app_yet_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import taskframe.app

    monkeypatch.setattr(taskframe.app, "_current", None)
    with pytest.raises(ConfigurationError, match="no taskframe App exists yet"):
        taskframe.app.current_app()
