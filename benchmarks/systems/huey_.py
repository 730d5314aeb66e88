"""Huey: ``huey_consumer -w 1 -k thread``; at-most-once (a task is deleted when dequeued).

The consumer polls an empty queue from ``-d`` seconds, growing by ``-b`` up to ``-m``
(defaults 0.1 s, x1.15, 10 s); it is given taskframe's SQLite polling (1 ms, x1.25, 20 ms)
so round trips measure the system, not a sleep. ``Result.get(blocking=True)`` polls from
50 ms on SqliteHuey (fixed in Huey) and waits on BLPOP on RedisHuey (``notify_result``).
"""

from __future__ import annotations

from benchmarks.common import BenchEnv

from . import ROUND_TRIP_TIMEOUT_S, System, executable


class Huey(System):
    name = "huey"
    packages = ("huey",)
    brokers = ("sqlite", "redis")
    batch_api = "task.map()"
    app_module = "benchmarks.apps.huey_app"

    def worker_command(self, env: BenchEnv) -> list[str]:
        polling = ["-d", "0.001", "-b", "1.25", "-m", "0.02"]
        return [executable("huey_consumer"), f"{self.app_module}.huey", "-w", "1", "-k", "thread", "-q", *polling]

    def enqueue_one(self, indices: range) -> None:
        noop = self.app.noop
        for i in indices:
            noop(i, i)

    def enqueue_batched(self, indices: range) -> None:
        noop = self.app.noop
        noop.map([(i, i) for i in indices])

    def round_trip(self) -> int:
        value: int = self.app.noop(1, 2).get(blocking=True, timeout=ROUND_TRIP_TIMEOUT_S)
        return value


class HueyNormal(Huey):
    """SqliteHuey with ``synchronous=NORMAL``, taskframe's durability (see its app module)."""

    name = "huey-normal"
    brokers = ("sqlite",)
    app_module = "benchmarks.apps.huey_normal_app"
