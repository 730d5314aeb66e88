"""RQ: ``rq worker -w rq.worker.SimpleWorker``: jobs run in the worker process, like the
other systems' solo pools (RQ's default worker forks a child per job). Jobs are removed
from the queue when a worker takes them; a job whose worker dies is marked failed, not
re-run, unless the job asks for retries. Redis only."""

from __future__ import annotations

from typing import Any

from benchmarks.common import BenchEnv

from . import ROUND_TRIP_TIMEOUT_S, System, executable

#: The RQ queue the benchmark uses.
QUEUE = "bench"


class RQ(System):
    name = "rq"
    packages = ("rq",)
    brokers = ("redis",)
    batch_api = "Queue.enqueue_many()"
    app_module = "benchmarks.apps.rq_app"

    queue: Any

    def setup(self) -> None:
        from redis import Redis
        from rq import Queue

        super().setup()
        self.queue = Queue(QUEUE, connection=Redis.from_url(self.app.ENV.redis_url))

    def worker_command(self, env: BenchEnv) -> list[str]:
        worker = ["-w", "rq.worker.SimpleWorker", "--logging_level", "WARNING"]
        return [executable("rq"), "worker", QUEUE, "--url", env.redis_url, *worker]

    def enqueue_one(self, indices: range) -> None:
        noop, ttl, queue = self.app.noop, self.app.RESULT_TTL_S, self.queue
        for i in indices:
            queue.enqueue(noop, i, i, result_ttl=ttl)

    def enqueue_batched(self, indices: range) -> None:
        from rq import Queue

        noop, ttl = self.app.noop, self.app.RESULT_TTL_S
        self.queue.enqueue_many([Queue.prepare_data(noop, (i, i), result_ttl=ttl) for i in indices])

    def round_trip(self) -> int:
        job = self.queue.enqueue(self.app.noop, 1, 2, result_ttl=self.app.RESULT_TTL_S)
        result = job.latest_result(timeout=int(ROUND_TRIP_TIMEOUT_S))
        if result is None:
            msg = f"RQ job {job.id} gave no result within {ROUND_TRIP_TIMEOUT_S}s"
            raise TimeoutError(msg)
        value: int = result.return_value
        return value
