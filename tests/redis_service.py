"""Redis for the broker and backend tests: its address, and a probe that says how to start it.

The address comes from ``TASKFRAME_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379``),
read when this module is imported (the autouse fixture of ``tests/conftest.py`` hides
``TASKFRAME_*`` variables from the tests themselves). The server may be shared with other
work, so the tests keep to databases of their own and never flush one:

- 11: the broker conformance suite (fresh queue names per test);
- 12: the result backend conformance suite (fresh task ids and keys per test);
- 13: ``tests/integration/test_redis.py`` (a queue of its own per test, deleted after it);
- 10: ``tests/integration/test_celery_interop.py`` (Celery's keys, queues of its own per run);
- 15: the kombu+redis broker entry (kombu's fixed key names, fresh queue names per test).

The benchmarks keep to database 14, which they flush (``benchmarks/common.py``).
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

REDIS_URL = os.environ.get("TASKFRAME_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
#: Databases of the test suites (see the module docstring).
BROKER_DB, BACKEND_DB, INTEGRATION_DB = 11, 12, 13
INTEROP_DB, KOMBU_DB = 10, 15
HOW_TO_START = "apt-get install redis-server && redis-server --daemonize yes (or set TASKFRAME_TEST_REDIS_URL)"


def url(db: int) -> str:
    """The Redis URL of database ``db``."""
    return f"{REDIS_URL}/{db}"


def unavailable() -> str | None:
    """Why Redis cannot be reached, or None when it answers."""
    parts = urlsplit(REDIS_URL)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    try:
        with socket.create_connection((host, port), timeout=2):
            return None
    except OSError as exc:
        return f"Redis is not reachable on {host}:{port} ({exc}); start it with: {HOW_TO_START}"


def check(error: type[Exception]) -> None:
    """Raise ``error`` with the reason when Redis cannot be reached."""
    reason = unavailable()
    if reason:
        raise error(reason)
