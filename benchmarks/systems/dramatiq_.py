"""Dramatiq: ``dramatiq --processes 1 --threads 1`` (a supervisor and one worker process);
at-least-once (acks after running). Redis only: it has no SQLite broker."""

from __future__ import annotations

from benchmarks.common import BenchEnv

from . import ROUND_TRIP_TIMEOUT_S, System, executable


class Dramatiq(System):
    name = "dramatiq"
    packages = ("dramatiq",)
    brokers = ("redis",)
    batch_api = "group().run()"
    app_module = "benchmarks.apps.dramatiq_app"

    def worker_command(self, env: BenchEnv) -> list[str]:
        return [executable("dramatiq"), self.app_module, "--processes", "1", "--threads", "1"]

    def enqueue_one(self, indices: range) -> None:
        noop = self.app.noop
        for i in indices:
            noop.send(i, i)

    def enqueue_batched(self, indices: range) -> None:
        import dramatiq

        noop = self.app.noop
        dramatiq.group(noop.message(i, i) for i in indices).run()

    def round_trip(self) -> int:
        message = self.app.noop.send(1, 2)
        value: int = message.get_result(block=True, timeout=int(ROUND_TRIP_TIMEOUT_S * 1000))
        return value
