"""Celery 5: ``celery worker -P solo -c 1``; at-most-once by default (acks before running).

Mingle, gossip and heartbeats are off: they broadcast over fanout exchanges, which kombu's
SQLAlchemy transport lacks, and a benchmark worker has no peers to talk to. On a polling
result backend (``db+sqlite``) ``AsyncResult.get`` polls every ``interval`` seconds
(default 0.5 s); it is given 10 ms, and the SQLAlchemy transport 20 ms between polls of an
empty queue (``polling_interval``, default 1 s), as taskframe's SQLite consumer.
"""

from __future__ import annotations

from benchmarks.common import BenchEnv

from . import ROUND_TRIP_TIMEOUT_S, System, executable

#: Seconds between polls of a polling result backend in AsyncResult.get (Celery's default: 0.5).
RESULT_POLL_S = 0.01


class Celery(System):
    name = "celery"
    packages = ("celery", "kombu", "sqlalchemy")
    brokers = ("sqlite", "redis", "amqp")
    batch_api = "group().apply_async()"
    app_module = "benchmarks.apps.celery_app"

    def worker_command(self, env: BenchEnv) -> list[str]:
        quiet = ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        return [executable("celery"), "-A", self.app_module, "worker", "-P", "solo", "-c", "1", "-l", "warning", *quiet]

    def enqueue_one(self, indices: range) -> None:
        noop = self.app.noop
        for i in indices:
            noop.delay(i, i)

    def enqueue_batched(self, indices: range) -> None:
        from celery import group

        noop = self.app.noop
        group(noop.s(i, i) for i in indices).apply_async()

    def round_trip(self) -> int:
        value: int = self.app.noop.delay(1, 2).get(timeout=ROUND_TRIP_TIMEOUT_S, interval=RESULT_POLL_S)
        return value


class CeleryConfirmed(Celery):
    """Celery on RabbitMQ with publisher confirms and late acks: taskframe's guarantees."""

    name = "celery-confirmed"
    brokers = ("amqp",)
    app_module = "benchmarks.apps.celery_confirmed_app"
