"""The scheme registry: lazy imports, one clear line for a typo or a missing extra."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from taskframe import registry
from taskframe.exceptions import ConfigurationError
from taskframe.settings import Settings


def test_known_schemes_resolve_to_adapter_classes() -> None:
    assert registry.load_class("broker", "sqlite:///x.db").__name__ == "SQLiteBroker"
    assert registry.load_class("broker", "memory://").__name__ == "MemoryBroker"
    assert registry.load_class("backend", "file:///tmp/x").__name__ == "FileBackend"


def test_unknown_scheme_suggests_the_closest() -> None:
    with pytest.raises(ConfigurationError) as info:
        registry.load_class("broker", "sqlitee:///x.db")
    message = str(info.value)
    assert "unknown broker scheme 'sqlitee'" in message
    assert "did you mean 'sqlite'?" in message
    assert "\n" not in message


def test_url_without_scheme_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="has no scheme"):
        registry.load_class("backend", "localhost:6379")


def test_missing_extra_names_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given an adapter module whose client library is not installed
    (tmp_path / "tf_fake_adapter.py").write_text("import tf_client_library_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.BROKERS, "fakeq", ("tf_fake_adapter:FakeBroker", "fakeq"))
    # When the App needs it, Then one line says what to install (credentials masked)
    with pytest.raises(ConfigurationError) as info:
        registry.create_broker("fakeq://user:pw@host//", Settings())
    assert str(info.value) == "broker 'fakeq://user:***@host//' needs: pip install 'taskframe[fakeq]'"
    sys.modules.pop("tf_fake_adapter", None)


def test_core_never_imports_a_client_library() -> None:
    core = Path(registry.__file__).parent
    clients = ("redis", "pika", "boto3", "kombu", "pymongo", "sqlalchemy")
    for source in core.glob("*.py"):
        text = source.read_text()
        for client in clients:
            assert f"import {client}" not in text, f"{source.name} imports {client}"
            assert f"from {client}" not in text, f"{source.name} imports {client}"
