"""Durable revocations, and a worker's view of them at one backend read per received batch.

DESIGN §2: ``revoke()`` is stored durably (no live worker needed; it survives restarts) and
workers skip revoked ids. Each revoke stores the document ``revoked-<id>`` and then bumps a
version. A worker reads the version once per batch it received, after receiving it, and
reloads the revoked ids (one scan) only when the version changed. A revoke that completed
before a message was received has bumped the version before that read, so it is always
seen, at the cost of one small read per batch instead of one per task.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import App
    from .backend import ResultBackend

#: Prefix of the document that records one revoked task id.
REVOKED_PREFIX = "revoked-"
#: The counter that numbers revokes (backends cannot read a counter without bumping it).
VERSION_COUNTER = "revocations-counter"
#: The document holding the counter's latest value: what workers read to notice a revoke.
VERSION_KEY = "revocations-version"


def record_revoke(backend: ResultBackend, task_id: str, *, terminate: bool, ttl_s: float) -> None:
    """Store a revoke, then announce it by a new version (in that order: a worker that sees
    the new version finds the id when it reloads)."""
    backend.put(f"{REVOKED_PREFIX}{task_id}", {"task_id": task_id, "terminate": terminate}, ttl_s=ttl_s)
    version = backend.incr(VERSION_COUNTER, ttl_s=None)
    # Two revokers may write their versions out of order; that is fine: a worker reloads on
    # any change, and a version number is never written twice.
    backend.put(VERSION_KEY, {"version": version}, ttl_s=None)


class RevokedIds:
    """The revoked task ids as of the last :meth:`refresh` (``task_id in revoked``).

    Ids whose revoke expired stay until the next reload; they are unique ids, so that only
    keeps a little memory. Thread-safe: the main loop and the keeper both refresh.
    """

    def __init__(self, app: App) -> None:
        self.app = app
        self._version: Any = None
        self._loaded = False
        self._terminate: dict[str, bool] = {}  # revoked id -> terminate requested
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Read the version; reload the ids when it changed. Raises the backend's errors."""
        with self._lock:
            backend = self.app.backend
            doc = backend.get(VERSION_KEY)
            version = doc.get("version") if doc else None
            if self._loaded and version == self._version:
                return
            revoked: dict[str, bool] = {}
            for record in backend.scan(REVOKED_PREFIX):
                task_id = record.get("task_id") if isinstance(record, dict) else None
                if task_id:
                    revoked[str(task_id)] = bool(record.get("terminate"))
            self._terminate = revoked  # replaced whole: readers need no lock
            self._version, self._loaded = version, True

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._terminate

    def terminate_requested(self, task_id: str) -> bool:
        return self._terminate.get(task_id, False)
