"""One module per benchmarked system, each a :class:`System`: how to start its workers, how to
send it tasks (one call each, and through its batch API), and one round trip.

The methods other than ``unavailable`` and ``worker_command`` run in a driver process
whose ``BENCH_*`` variables are set (see :mod:`benchmarks.common`); ``setup`` imports the
system's app module there.
"""

from __future__ import annotations

import importlib
import os
import sys
from importlib import metadata
from typing import Any, ClassVar

from benchmarks.common import BenchEnv

#: Seconds a round trip may take before the benchmark gives up.
ROUND_TRIP_TIMEOUT_S = 30.0


class System:
    """A task framework under benchmark; subclasses fill in the class attributes and methods."""

    #: The name in the table and on the command line.
    name: ClassVar[str]
    #: The distributions whose versions the report prints.
    packages: ClassVar[tuple[str, ...]]
    #: The brokers it runs on in this benchmark.
    brokers: ClassVar[tuple[str, ...]]
    #: The API that sends many tasks at once, or None ("n/a" in the table).
    batch_api: ClassVar[str | None] = None
    #: The module the workers and the producer import (in benchmarks/apps/).
    app_module: ClassVar[str]

    app: Any  # the app module, after setup()

    def unavailable(self, broker: str) -> str | None:
        """Why the system cannot run on ``broker`` here, or None."""
        return None

    def versions(self) -> str:
        found = []
        for package in self.packages:
            try:
                found.append(f"{package} {metadata.version(package)}")
            except metadata.PackageNotFoundError:
                found.append(f"{package} (not installed)")
        return ", ".join(found)

    def setup(self) -> None:
        self.app = importlib.import_module(self.app_module)

    def worker_command(self, env: BenchEnv) -> list[str]:
        """The command a user would type to start one worker process with a single slot."""
        raise NotImplementedError

    def enqueue_one(self, indices: range) -> None:
        """Send ``noop(i, i)`` for each i, one call each."""
        raise NotImplementedError

    def enqueue_batched(self, indices: range) -> None:
        """Send ``noop(i, i)`` for each i in one call of ``batch_api``."""
        raise NotImplementedError

    def round_trip(self) -> int:
        """Send ``noop(1, 2)`` and wait for its result (3), the way the system's docs show."""
        raise NotImplementedError


def executable(name: str) -> str:
    """A console script of the interpreter's environment (the venv's ``bin/``)."""
    return os.path.join(os.path.dirname(sys.executable), name)


def all_systems() -> dict[str, System]:
    """Every system, in table order (taskframe first)."""
    from .celery_ import Celery, CeleryConfirmed
    from .dramatiq_ import Dramatiq
    from .huey_ import Huey, HueyNormal
    from .raw_pika_ import RawPika
    from .raw_redis_ import RawRedis
    from .rq_ import RQ
    from .taskframe_ import Taskframe

    systems: list[System] = [
        Taskframe(),
        RawRedis(),
        RawPika(),
        Huey(),
        HueyNormal(),
        Celery(),
        CeleryConfirmed(),
        Dramatiq(),
        RQ(),
    ]
    return {s.name: s for s in systems}
