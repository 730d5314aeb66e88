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
]


def backend_params() -> list[object]:
    """``pytest.param`` per spec, with its id and marks, for ``@pytest.fixture(params=...)``."""
    return [pytest.param(spec, id=spec.name, marks=spec.marks) for spec in BACKENDS]
