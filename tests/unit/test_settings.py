"""Settings: keyword arguments, then TASKFRAME_* variables, then defaults; clear errors."""

from __future__ import annotations

import pytest

from taskframe import App
from taskframe.exceptions import ConfigurationError
from taskframe.settings import DEFAULT_SQLITE_URL, mask_url


def test_defaults_are_the_embedded_sqlite_store() -> None:
    app = App("t")
    assert app.conf.broker_url == DEFAULT_SQLITE_URL
    assert app.conf.effective_result_backend == DEFAULT_SQLITE_URL
    assert app.conf.default_queue == "celery"
    assert app.conf.task_acks_late is True
    assert app.conf.max_deliveries == 5


def test_keyword_arguments_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKFRAME_BROKER_URL", "memory://")
    monkeypatch.setenv("TASKFRAME_MAX_DELIVERIES", "9")
    app = App("t", broker="sqlite:///x.db")
    assert app.conf.broker_url == "sqlite:///x.db"  # keyword argument
    assert app.conf.max_deliveries == 9  # environment, coerced to int


def test_environment_lists_and_dicts_are_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKFRAME_TASK_ROUTES", '{"tasks.*": "low"}')
    monkeypatch.setenv("TASKFRAME_ACCEPT_CONTENT", '["json", "msgpack"]')
    app = App("t")
    assert app.conf.task_routes == {"tasks.*": "low"}
    assert app.conf.accept_content == ["json", "msgpack"]


def test_bad_json_in_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKFRAME_TASK_ROUTES", "{not json")
    with pytest.raises(ConfigurationError, match="TASKFRAME_TASK_ROUTES"):
        App("t")


def test_unknown_setting_fails_naming_the_key() -> None:
    with pytest.raises(ConfigurationError, match="unknown setting 'max_delivery'; did you mean 'max_deliveries'"):
        App("t", max_delivery=3)


def test_bad_value_fails_naming_the_key() -> None:
    with pytest.raises(ConfigurationError, match="setting 'visibility_timeout'"):
        App("t", visibility_timeout="soon")
    with pytest.raises(ConfigurationError, match="setting 'max_deliveries'"):
        App("t", max_deliveries=0)


def test_credentials_are_masked_in_repr_and_errors() -> None:
    assert mask_url("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert mask_url("amqp://guest:guest@localhost:5672//") == "amqp://guest:***@localhost:5672//"
    app = App("t", broker="memory://", backend="memory://", broker_options={"x": 1})
    app.conf.result_backend = "redis://u:topsecret@h/1"
    assert "topsecret" not in repr(app.conf)
    with pytest.raises(ConfigurationError) as info:
        App("t", broker="reddis://u:topsecret@h/0").broker  # noqa: B018 - the property connects
    assert "topsecret" not in str(info.value)
    assert "did you mean 'redis'" in str(info.value) or "known:" in str(info.value)


def test_results_default_to_the_brokers_store_when_a_backend_speaks_it() -> None:
    assert App("t", broker="memory://").conf.effective_result_backend == "memory://"
    assert App("t", broker="redis://h:6379/0").conf.effective_result_backend == "redis://h:6379/0"
    assert App("t", broker="amqp://guest:guest@h//").conf.effective_result_backend == DEFAULT_SQLITE_URL
    assert App("t", broker="amqp://h//", backend="file:///tmp/r").conf.effective_result_backend == "file:///tmp/r"
