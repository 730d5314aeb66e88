"""The one table of result backends under test; test_backend.py runs every test on each.

A new backend joins by adding one ``BackendSpec``. A backend that talks to a service gives a
``check`` that raises :class:`ServiceUnavailable` when the service cannot be reached, and the
fixture then skips locally but fails in CI (``CI=true``), naming the service and how to start
it. Tests use fresh task ids and key prefixes, so a shared service needs no cleaning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import db_services as db
from tests import redis_sentinel_service, redis_service


class ServiceUnavailable(Exception):
    """A backend's service is not reachable; the message says which and how to start it."""


@dataclass(frozen=True)
class BackendSpec:
    #: Shown as the test id: ``test_fetch_unknown[sqlite]``.
    name: str
    #: Builds the backend URL; tmp_path is a fresh directory per test.
    make_url: Callable[[Path], str]
    #: Whether a second backend object, in this process or another, sees the same data.
    crosses_processes: bool
    #: Raises ServiceUnavailable when the backend's service is down; None for embedded ones.
    check: Callable[[], None] | None = None
    #: pytest marks, e.g. ``(pytest.mark.redis,)``, so ``-m "not redis"`` can leave it out.
    marks: tuple[pytest.MarkDecorator, ...] = field(default_factory=tuple)


def _sentinel_check() -> None:
    reason = redis_sentinel_service.unavailable()
    if reason:
        raise ServiceUnavailable(reason)


BACKENDS: list[BackendSpec] = [
    BackendSpec("memory", lambda tmp_path: "memory://", crosses_processes=False),
    BackendSpec(
        "sqlite",
        # sqlite:/// + an absolute path gives four slashes: an absolute file.
        lambda tmp_path: f"sqlite:///{tmp_path / 'results.sqlite3'}",
        crosses_processes=True,
    ),
    BackendSpec(
        "file",
        lambda tmp_path: f"file://{tmp_path / 'results'}",
        crosses_processes=True,
    ),
    # SQL and MongoDB: addresses, databases and the nx-27017 server are in tests/db_services.py.
    BackendSpec(
        "sql-postgresql",
        lambda tmp_path: db.postgres_url_for_test(),
        crosses_processes=True,
        check=db.check(db.postgres_database),
    ),
    BackendSpec(
        "sql-mysql",
        lambda tmp_path: db.mysql_url_for_test(),
        crosses_processes=True,
        check=db.check(db.mysql_database),
    ),
    BackendSpec(
        "sql-sqlite",
        lambda tmp_path: f"db+sqlite:///{tmp_path / 'results.db'}",
        crosses_processes=True,
    ),
    BackendSpec(
        "mongodb",
        lambda tmp_path: db.mongodb_url(),
        crosses_processes=True,
        check=db.check(db.mongodb_server),
    ),
    # Redis: its own database (tests/redis_service.py); fresh task ids and keys keep tests apart.
    BackendSpec(
        "redis",
        lambda tmp_path: redis_service.url(redis_service.BACKEND_DB),
        crosses_processes=True,
        check=lambda: redis_service.check(ServiceUnavailable),
    ),
    # The same backend through Redis Sentinel (tests/redis_sentinel_service.py, database 1).
    BackendSpec(
        "redis-sentinel",
        lambda tmp_path: redis_sentinel_service.url(db=1),
        crosses_processes=True,
        check=_sentinel_check,
    ),
]


def backend_params() -> list[object]:
    """``pytest.param`` per spec, with its id and marks, for ``@pytest.fixture(params=...)``."""
    return [pytest.param(spec, id=spec.name, marks=spec.marks) for spec in BACKENDS]
