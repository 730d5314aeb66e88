"""Helpers for users' own tests: a real worker running in this process."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .worker import Worker

if TYPE_CHECKING:
    from .app import App


@contextmanager
def start_worker(
    app: App,
    queues: Sequence[str] | None = None,
    pool: str = "threads",
    concurrency: int = 1,
    *,
    shutdown_timeout_s: float = 10.0,
) -> Iterator[Worker]:
    """Run a real worker in a background thread for the duration of the ``with`` block.

    It consumes ``queues`` (default: the app's ``default_queue``) of the app's own broker
    (``memory://`` works, since the worker shares this process) with a ``threads`` or
    ``solo`` pool, and stops warm on exit.
    """
    if pool not in ("threads", "solo"):
        msg = f"start_worker runs in-process: pool must be 'threads' or 'solo', not {pool!r}"
        raise ValueError(msg)
    worker = Worker(
        app,
        list(queues or [app.conf.default_queue]),
        pool=pool,
        concurrency=concurrency,
        shutdown_timeout_s=shutdown_timeout_s,
        install_signals=False,
    )
    thread = threading.Thread(target=worker.run, name="taskframe-test-worker", daemon=True)
    thread.start()
    worker.ready.wait(timeout=30)
    try:
        yield worker
    finally:
        worker.stop("start_worker block ended")
        thread.join(timeout=shutdown_timeout_s + 5)
