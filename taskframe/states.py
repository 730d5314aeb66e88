"""Task states, Celery's names and meanings."""

from __future__ import annotations

from typing import Final

PENDING: Final = "PENDING"  # unknown to the backend: queued, not yet run, or forgotten
RECEIVED: Final = "RECEIVED"  # a worker holds the message
STARTED: Final = "STARTED"  # running (stored only with task_track_started)
RETRY: Final = "RETRY"  # failed, scheduled again
SUCCESS: Final = "SUCCESS"
FAILURE: Final = "FAILURE"
REVOKED: Final = "REVOKED"  # revoked or expired: will not run

READY_STATES: Final = frozenset({SUCCESS, FAILURE, REVOKED})
EXCEPTION_STATES: Final = frozenset({RETRY, FAILURE, REVOKED})
ALL_STATES: Final = frozenset({PENDING, RECEIVED, STARTED, RETRY, SUCCESS, FAILURE, REVOKED})
