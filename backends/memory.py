"""In-process result backend, for tests and for running everything in one process.

URL: ``memory://`` (anything after the scheme is ignored). Each backend object has its own
store: two objects built from the same URL do not share results, and nothing crosses a
process boundary (a forked child keeps a copy of what existed at fork time and works on it
alone).

Features: task records, small JSON documents and counters, each with an optional TTL.
``wait()`` blocks on a condition variable (``supports_wait = True``) and returns as soon as
another thread stores a ready state.

Guarantees: every operation holds one lock, so the ready-state rule of ``store()`` and
``incr()`` are atomic between threads. Values are kept as JSON text, so what ``fetch()``
returns is a fresh copy with the same types a persistent backend would give back (tuples come
back as lists), and a value that is not JSON-serializable fails at ``store()``.

Expiry: an entry's deadline is ``time.monotonic() + ttl_s``. Reads treat an expired entry as
missing and drop it; writes sweep every expired entry at most once a minute.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from taskframe.backend import READY_STATES, ResultRecord, dump_json
from taskframe.exceptions import BackendError, ConfigurationError
from taskframe.settings import Settings

#: Seconds between two sweeps of expired entries.
SWEEP_INTERVAL_S = 60.0

_V = TypeVar("_V")


@dataclass
class _Entry(Generic[_V]):
    value: _V
    expires_at: float | None  # time.monotonic() deadline; None = never

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now


class MemoryBackend:
    """Results in dictionaries of this object; see the module docstring."""

    supports_wait: ClassVar[bool] = True

    def __init__(self, url: str, conf: Settings) -> None:
        if conf.backend_options:
            msg = f"the memory result backend takes no backend_options, got {sorted(conf.backend_options)}"
            raise ConfigurationError(msg)
        self._records: dict[str, _Entry[tuple[str, str]]] = {}  # task id -> (status, JSON)
        self._docs: dict[str, _Entry[str]] = {}
        self._counters: dict[str, _Entry[int]] = {}
        self._pid = os.getpid()
        self._ready = threading.Condition(threading.Lock())
        self._next_sweep_at = time.monotonic() + SWEEP_INTERVAL_S

    def __repr__(self) -> str:
        return f"MemoryBackend(records={len(self._records)})"

    # -- task records -------------------------------------------------------------------------

    def store(self, task_id: str, record: ResultRecord, *, ttl_s: float | None) -> None:
        status = record.get("status")
        if not isinstance(status, str):
            msg = f"result record of task {task_id!r} has no 'status' string (got {status!r})"
            raise BackendError(msg)
        text = dump_json(record, f"result of task {task_id!r}")
        ready = self._condition()
        with ready:
            now = time.monotonic()
            current = _live(self._records, task_id, now)
            if current is not None and current[0] in READY_STATES and status not in READY_STATES:
                return  # a late STARTED/RETRY must not hide a final state
            self._records[task_id] = _Entry((status, text), _deadline(now, ttl_s))
            if status in READY_STATES:
                ready.notify_all()
            self._maybe_sweep(now)

    def fetch(self, task_id: str) -> ResultRecord | None:
        with self._condition():
            current = _live(self._records, task_id, time.monotonic())
        if current is None:
            return None
        record: ResultRecord = json.loads(current[1])
        return record

    def wait(self, task_id: str, timeout_s: float) -> ResultRecord | None:
        deadline = time.monotonic() + timeout_s
        ready = self._condition()
        with ready:
            while True:
                now = time.monotonic()
                current = _live(self._records, task_id, now)
                if current is not None and current[0] in READY_STATES:
                    record: ResultRecord = json.loads(current[1])
                    return record
                if now >= deadline:
                    return None
                ready.wait(deadline - now)

    def forget(self, task_id: str) -> None:
        with self._condition():
            self._records.pop(task_id, None)

    # -- counters and documents ---------------------------------------------------------------

    def incr(self, key: str, *, ttl_s: float | None) -> int:
        with self._condition():
            now = time.monotonic()
            current = _live(self._counters, key, now)
            value = 1 if current is None else current + 1
            self._counters[key] = _Entry(value, _deadline(now, ttl_s))
            self._maybe_sweep(now)
        return value

    def put(self, key: str, value: dict[str, Any], *, ttl_s: float | None) -> None:
        text = dump_json(value, f"document {key!r}")
        with self._condition():
            now = time.monotonic()
            self._docs[key] = _Entry(text, _deadline(now, ttl_s))
            self._maybe_sweep(now)

    def get(self, key: str) -> dict[str, Any] | None:
        with self._condition():
            text = _live(self._docs, key, time.monotonic())
        if text is None:
            return None
        doc: dict[str, Any] = json.loads(text)
        return doc

    def scan(self, prefix: str) -> list[dict[str, Any]]:
        """Every unexpired document whose key starts with ``prefix``, in key order."""
        with self._condition():
            now = time.monotonic()
            found = sorted(
                (key, entry.value)
                for key, entry in self._docs.items()
                if key.startswith(prefix) and not entry.expired(now)
            )
        return [json.loads(text) for _key, text in found]

    def delete(self, key: str) -> None:
        """Delete the document and the counter stored under ``key``. Idempotent."""
        with self._condition():
            self._docs.pop(key, None)
            self._counters.pop(key, None)

    def close(self) -> None:
        """Nothing to release; the data stays until the object is garbage-collected."""

    # -- expiry -------------------------------------------------------------------------------

    def purge_expired(self) -> int:
        """Drop every expired entry now; return how many."""
        with self._condition():
            return self._sweep(time.monotonic())

    def _maybe_sweep(self, now: float) -> None:
        """Sweep at most once per SWEEP_INTERVAL_S; the caller holds the lock."""
        if now >= self._next_sweep_at:
            self._next_sweep_at = now + SWEEP_INTERVAL_S
            self._sweep(now)

    def _sweep(self, now: float) -> int:
        removed = 0
        stores: tuple[dict[str, Any], ...] = (self._records, self._docs, self._counters)
        for store in stores:
            expired = [key for key, entry in store.items() if entry.expired(now)]
            for key in expired:
                del store[key]
            removed += len(expired)
        return removed

    def _condition(self) -> threading.Condition:
        if self._pid != os.getpid():
            # Forked: another thread of the parent may have held the lock at fork time,
            # and it would never be released in this process.
            self._ready = threading.Condition(threading.Lock())
            self._pid = os.getpid()
        return self._ready


def _live(store: dict[str, _Entry[_V]], key: str, now: float) -> _V | None:
    """The value under ``key``, None if missing or expired (then dropped). Caller holds the lock."""
    entry = store.get(key)
    if entry is None:
        return None
    if entry.expired(now):
        del store[key]
        return None
    return entry.value


def _deadline(now: float, ttl_s: float | None) -> float | None:
    return None if ttl_s is None else now + ttl_s
