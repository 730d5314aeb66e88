"""The result backend interface that every module in ``taskframe.backends`` implements.

A backend stores one record per task id, in Celery's layout::

    {"task_id": "...", "status": "SUCCESS", "result": 8, "traceback": None,
     "children": [], "date_done": "2026-11-25T14:43:51.123456+00:00"}

plus ``name, args, kwargs, worker, retries, queue`` when ``result_extended`` is on. A failure's
``result`` is ``{"exc_type": ..., "exc_module": ..., "exc_message": [...]}``.

Beside the records, a backend keeps small JSON documents by key (group metadata, durable
revocations, worker heartbeats) and atomic counters (chords). Every adapter passes
``tests/conformance/test_backend.py``.

Chords: the worker reports each finished header task to :func:`chord_joiner` of the backend.
A backend may join chords its own way by implementing :class:`JoinsChords` (the Redis backend
does, with Celery's keys, so Celery workers and taskframe workers join the same chords);
any other gets :class:`CounterChords`, built on ``incr``, ``get`` and ``fetch``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ChordPart:
    """One finished task of a chord's header, as the worker that ran it reports it."""

    group_id: str
    #: The task's place in the header (the ``group_index`` header); None if the sender gave none.
    group_index: int | None
    task_id: str
    state: str
    #: The task's return value, or its exception encoded as in a record.
    result: Any
    #: The header's size when the message carries it (taskframe's chords); Celery's chords
    #: leave it to the backend (Celery's ``set_chord_size``).
    size: int | None


@dataclass(frozen=True)
class ChordJoin:
    """A complete header, and the right of the one caller that got it to send the body."""

    group_id: str
    #: ``(task id, state, result)`` of every header task, in header order.
    parts: list[tuple[str, str, Any]]
    #: Names this caller's claim, for :meth:`JoinsChords.chord_done` and ``chord_release``.
    token: str = ""


@runtime_checkable
class JoinsChords(Protocol):
    """Optional: a backend that keeps a chord's header results and decides when it is complete."""

    def chord_start(self, group_id: str, size: int, *, ttl_s: float | None) -> None:
        """A chord of ``size`` header tasks is about to be sent under ``group_id``."""
        ...

    def chord_part_return(self, part: ChordPart, *, ttl_s: float | None) -> ChordJoin | None:
        """Record one finished header task (a second report of the same task counts once).
        Return the joined header to the one caller that completes it, None to every other."""
        ...

    def chord_done(self, join: ChordJoin) -> None:
        """The body was sent (or failed): no later report of a header task sends it again."""
        ...

    def chord_release(self, join: ChordJoin) -> None:
        """The body could not be sent: give up the claim, so that a redelivered header task can."""
        ...


class CounterChords:
    """Chords on any backend: a counter of finished header tasks, and the member ids from the
    header's saved group (``group-meta-<id>``), which the sender saves before sending it.

    A redelivered header task counts twice, so the count alone cannot decide: the header is
    complete once every member's record is ready, and a second counter lets one caller through.
    """

    def __init__(self, backend: ResultBackend) -> None:
        self.backend = backend

    def chord_start(self, group_id: str, size: int, *, ttl_s: float | None) -> None:
        """Nothing to prepare: the size travels in every header message."""

    def chord_part_return(self, part: ChordPart, *, ttl_s: float | None) -> ChordJoin | None:
        backend, group_id = self.backend, part.group_id
        if part.size is None:
            msg = (
                f"chord {group_id}: its header messages do not say the chord's size (a chord sent by Celery);"
                f" {type(backend).__name__} cannot join it: use the Redis result backend, or run its header on"
                " Celery workers"
            )
            raise ChordUnsupported(msg)
        if backend.incr(f"chord-counter-{group_id}", ttl_s=ttl_s) < part.size:
            return None
        meta = backend.get(f"group-meta-{group_id}")
        if meta is None:
            _log.error("chord %s: its group metadata is gone (expired?); the body cannot run", group_id)
            return None
        member_ids = [str(member) for member in meta["results"]]
        records = [backend.fetch(member) for member in member_ids]
        parts: list[tuple[str, str, Any]] = []
        for member, record in zip(member_ids, records, strict=True):
            if record is None or record.get("status") not in READY_STATES:
                return None
            parts.append((member, str(record["status"]), record.get("result")))
        if backend.incr(f"chord-fired-{group_id}", ttl_s=ttl_s) != 1:
            return None
        return ChordJoin(group_id, parts)

    def chord_done(self, join: ChordJoin) -> None:
        """Nothing to clean: the counters expire with the results."""

    def chord_release(self, join: ChordJoin) -> None:
        # The redelivered header task counts past the size, finds every record ready, and is
        # the first through the reset gate.
        self.backend.delete(f"chord-fired-{join.group_id}")


class ChordUnsupported(Exception):
    """The backend cannot join this chord; the message says why and what to do."""


def chord_joiner(backend: ResultBackend) -> JoinsChords:
    """The backend's own way of joining chords, or the counter-based default."""
    return backend if isinstance(backend, JoinsChords) else CounterChords(backend)


_log = logging.getLogger("taskframe.worker")


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


_expiry_log = logging.getLogger("taskframe.backends")


class ExpirySweeper:
    """When a backend that deletes its own expired entries sweeps them: on the back of its
    writes (:meth:`maybe_sweep`), at most one sweep at a time per process (a thread that finds
    one running goes on), one every ``interval_s``, and again after ``retry_s`` when the last
    one ran out of its ``budget_s`` with entries left.

    ``sweep(deadline)`` deletes until ``time.monotonic()`` reaches ``deadline`` and returns
    (entries removed, whether none is left). A sweep that fails is logged, not raised: the
    write that triggered it succeeded. Fork-safe: a child makes its own lock.
    """

    def __init__(
        self, sweep: Callable[[float], tuple[int, bool]], *, interval_s: float, retry_s: float, budget_s: float
    ) -> None:
        self._sweep = sweep
        self.interval_s, self.retry_s, self.budget_s = interval_s, retry_s, budget_s
        self._pid = os.getpid()
        self._lock = threading.Lock()
        #: time.monotonic() after which the next write sweeps (now: the first write does).
        self.next_at = time.monotonic()

    def maybe_sweep(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's lock may have been held at fork time
            self._lock, self._pid = threading.Lock(), os.getpid()
        if time.monotonic() < self.next_at or not self._lock.acquire(blocking=False):
            return
        delay_s = self.interval_s
        try:
            _removed, finished = self._sweep(time.monotonic() + self.budget_s)
            if not finished:
                delay_s = self.retry_s
        except BackendError as exc:
            _expiry_log.warning("%s; will try again in %.0fs", exc, delay_s)
        finally:
            self.next_at = time.monotonic() + delay_s
            self._lock.release()

    def purge(self, budget_s: float) -> int:
        """Sweep now for about ``budget_s``; how many entries were removed."""
        removed, _finished = self._sweep(time.monotonic() + budget_s)
        return removed
