"""The result backend interface that every module in ``taskframe.backends`` implements.

A backend stores one record per task id, in Celery's layout::

    {"task_id": "...", "status": "SUCCESS", "result": 8, "traceback": None,
     "children": [], "date_done": "2026-11-25T14:43:51.123456+00:00"}

plus ``name, args, kwargs, worker, retries, queue`` when ``result_extended`` is on. A failure's
``result`` is ``{"exc_type": ..., "exc_module": ..., "exc_message": [...]}``.

Beside the records, a backend keeps small JSON documents by key (group metadata, durable
revocations, worker heartbeats) and atomic counters (chords). Every adapter passes
``tests/conformance/test_backend.py``.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Protocol, runtime_checkable

from .exceptions import BackendError

#: States after which a task's record no longer changes (but for ``forget``).
READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})

#: A task's stored record; see the module docstring for its keys.
ResultRecord = dict[str, Any]


@runtime_checkable
class ResultBackend(Protocol):
    """Stores task results and the little state that must outlive a worker.

    Adapters are built by the registry as ``BackendClass(url, conf)`` where ``conf`` is the
    App's :class:`taskframe.settings.Settings` (``result_expires``, ``backend_options``).
    A backend object must survive ``os.fork()``: a child process reconnects on first use,
    and every method may be called from several threads.
    """

    #: True when :meth:`wait` blocks on a notification instead of polling.
    supports_wait: ClassVar[bool]

    def store(self, task_id: str, record: ResultRecord, *, ttl_s: float | None) -> None:
        """Save the record, replacing the previous one, except that a ready state
        (``READY_STATES``) is never replaced by a state that is not ready: a late ``STARTED``
        or ``RETRY`` write loses to a stored ``SUCCESS``. The check and the write are atomic.
        ``ttl_s`` of None keeps it until forgotten."""
        ...

    def fetch(self, task_id: str) -> ResultRecord | None:
        """The record, or None when there is none (PENDING) or it expired."""
        ...

    def wait(self, task_id: str, timeout_s: float) -> ResultRecord | None:
        """Return the record once it is in a ready state, or None after ``timeout_s``.

        Backends without notifications implement it with :func:`poll_until_ready`.
        """
        ...

    def forget(self, task_id: str) -> None:
        """Delete the record (the task reads as PENDING again). Idempotent."""
        ...

    def incr(self, key: str, *, ttl_s: float | None) -> int:
        """Atomically add one to the counter ``key`` (created at 0) and return the new value."""
        ...

    def put(self, key: str, value: dict[str, Any], *, ttl_s: float | None) -> None:
        """Save a small JSON document under ``key``."""
        ...

    def get(self, key: str) -> dict[str, Any] | None: ...

    def scan(self, prefix: str) -> list[dict[str, Any]]:
        """Every unexpired document whose key starts with ``prefix``."""
        ...

    def delete(self, key: str) -> None: ...

    def close(self) -> None: ...


def dump_json(value: Any, what: str) -> str:
    """Compact JSON text of a record or document; BackendError naming ``what`` if it has a
    value JSON cannot hold (nothing is stored then)."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        msg = f"{what} cannot be stored: it is not JSON-serializable ({exc})"
        raise BackendError(msg) from exc


def poll_until_ready(
    backend: ResultBackend,
    task_id: str,
    timeout_s: float,
    *,
    first_interval_s: float = 0.002,
    max_interval_s: float = 0.1,
) -> ResultRecord | None:
    """Fetch with backoff until the record is ready or ``timeout_s`` passed.

    The interval starts small so that a fast task's result arrives within milliseconds, and
    grows so that a slow one costs the store little.
    """
    import time

    deadline = time.monotonic() + timeout_s
    interval = first_interval_s
    while True:
        record = backend.fetch(task_id)
        if record is not None and record.get("status") in READY_STATES:
            return record
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        time.sleep(min(interval, remaining))
        interval = min(interval * 1.5, max_interval_s)
