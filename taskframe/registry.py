"""URL scheme -> adapter class, imported only when used.

Built-in adapters are listed here; third parties add theirs through the entry-point groups
``taskframe.brokers`` and ``taskframe.backends`` (name = scheme, value = ``module:Class``).
The core never imports an adapter or its client library except through this table.
"""

from __future__ import annotations

import difflib
import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Literal

from .exceptions import ConfigurationError
from .settings import mask_url

if TYPE_CHECKING:
    from .backend import ResultBackend
    from .broker import Broker
    from .settings import Settings

Kind = Literal["broker", "backend"]

#: scheme -> (import string, extra that installs its client library or None)
BROKERS: dict[str, tuple[str, str | None]] = {
    "memory": ("taskframe.brokers.memory:MemoryBroker", None),
    "sqlite": ("taskframe.brokers.sqlite:SQLiteBroker", None),
    "redis": ("taskframe.brokers.redis:RedisBroker", "redis"),
    "rediss": ("taskframe.brokers.redis:RedisBroker", "redis"),
    "amqp": ("taskframe.brokers.amqp:AMQPBroker", "amqp"),
    "amqps": ("taskframe.brokers.amqp:AMQPBroker", "amqp"),
    "sqs": ("taskframe.brokers.sqs:SQSBroker", "sqs"),
    "kombu": ("taskframe.brokers.kombu:KombuBroker", "kombu"),
}
BACKENDS: dict[str, tuple[str, str | None]] = {
    "memory": ("taskframe.backends.memory:MemoryBackend", None),
    "sqlite": ("taskframe.backends.sqlite:SQLiteBackend", None),
    "file": ("taskframe.backends.files:FileBackend", None),
    "redis": ("taskframe.backends.redis:RedisBackend", "redis"),
    "rediss": ("taskframe.backends.redis:RedisBackend", "redis"),
    "db": ("taskframe.backends.sql:SQLBackend", "sql"),
    "mongodb": ("taskframe.backends.mongodb:MongoDBBackend", "mongodb"),
}


def scheme_of(url: str) -> str:
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        return ""
    return scheme.lower()


def _table(kind: Kind) -> dict[str, tuple[str, str | None]]:
    table = dict(BROKERS if kind == "broker" else BACKENDS)
    for ep in entry_points(group=f"taskframe.{kind}s"):
        table.setdefault(ep.name, (ep.value, None))
    return table


def _lookup(kind: Kind, url: str) -> tuple[str, str | None]:
    table = _table(kind)
    scheme = scheme_of(url)
    if not scheme:
        msg = f"{kind} URL {mask_url(url)!r} has no scheme; expected e.g. 'sqlite:///taskframe.sqlite3'"
        raise ConfigurationError(msg)
    if scheme in table:
        return table[scheme]
    # Prefixed schemes: "kombu+redis" -> "kombu", "db+postgresql+psycopg" -> "db".
    prefix = scheme.split("+", 1)[0]
    if "+" in scheme and prefix in table:
        return table[prefix]
    known = sorted(table)
    close = difflib.get_close_matches(scheme, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    msg = f"unknown {kind} scheme {scheme!r} in {mask_url(url)!r}; {hint}known: {', '.join(known)}"
    raise ConfigurationError(msg)


def load_class(kind: Kind, url: str) -> type[Any]:
    target, extra = _lookup(kind, url)
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        # An adapter module that exists but whose client library does not.
        if extra and exc.name and not exc.name.startswith("taskframe"):
            msg = f"{kind} {mask_url(url)!r} needs: pip install 'taskframe[{extra}]'"
            raise ConfigurationError(msg) from None
        if exc.name == module_name:  # e.g. a third-party entry point naming a module that is gone
            msg = f"the {kind} adapter {target!r} for {mask_url(url)!r} cannot be imported: {exc}"
            raise ConfigurationError(msg) from None
        raise
    cls: type[Any] = getattr(module, attr)
    return cls


def create_broker(url: str, conf: Settings) -> Broker:
    broker: Broker = load_class("broker", url)(url, conf)
    return broker


def create_backend(url: str, conf: Settings) -> ResultBackend:
    backend: ResultBackend = load_class("backend", url)(url, conf)
    return backend
