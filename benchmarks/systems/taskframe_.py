"""taskframe: ``taskframe worker -P solo``; at-least-once (late ack)."""

from __future__ import annotations

import importlib.util

from benchmarks.common import BenchEnv

from . import ROUND_TRIP_TIMEOUT_S, System, executable


class Taskframe(System):
    name = "taskframe"
    packages = ("taskframe",)
    brokers = ("sqlite", "redis", "amqp")
    batch_api = "app.send_many()"
    app_module = "benchmarks.apps.taskframe_app"

    def unavailable(self, broker: str) -> str | None:
        if broker == "amqp":
            return None if _importable("pika") else "pika (taskframe's AMQP adapter) is not installed"
        if broker != "redis":
            return None
        missing = [m for m in ("taskframe.brokers.redis", "taskframe.backends.redis") if not _importable(m)]
        if missing:
            return f"taskframe's Redis adapter is not there yet ({', '.join(missing)} missing)"
        return None

    def worker_command(self, env: BenchEnv) -> list[str]:
        return [executable("taskframe"), "worker", "-A", f"{self.app_module}:app", "-P", "solo", "-l", "warning"]

    def enqueue_one(self, indices: range) -> None:
        noop = self.app.noop
        for i in indices:
            noop.delay(i, i)

    def enqueue_batched(self, indices: range) -> None:
        app = self.app.app
        app.send_many([("bench.noop", (i, i), {}, {}) for i in indices])

    def round_trip(self) -> int:
        value: int = self.app.noop.delay(1, 2).get(timeout=ROUND_TRIP_TIMEOUT_S)
        return value


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False
