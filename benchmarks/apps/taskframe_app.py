"""taskframe: the embedded SQLite default (queue and results in one file), Redis, SQS or RabbitMQ.

``BENCH_BACKEND_URL`` (the per-backend run) stores results in a backend of its own.
``BENCH_COUNT_CALLS=1`` (the SQS run) counts this process's SQS API calls with a botocore
``before-call`` hook on each client the SQS broker builds; :data:`API_CALLS` holds the
count, and at exit the process writes it to ``api-calls-<pid>.txt`` in the run's directory,
where the driver adds up the worker's.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

from benchmarks.common import BenchEnv
from taskframe import App

ENV = BenchEnv.from_environ()
COUNTER = ENV.counter()
#: SQS API calls made by this process (BENCH_COUNT_CALLS=1 only).
API_CALLS = [0]

if ENV.broker == "redis":
    app = App("bench", broker=ENV.redis_url, backend=ENV.backend_url or ENV.redis_url)
elif ENV.broker in ("sqs", "amqp"):
    app = App("bench", broker=ENV.broker_url, backend=ENV.backend_url or ENV.redis_url)
else:
    app = App("bench", broker=f"sqlite:///{ENV.path('taskframe.sqlite3')}", backend=ENV.backend_url or None)


def _count_sqs_calls() -> None:
    from taskframe.brokers.sqs import SQSBroker

    make_client = SQSBroker._make_client

    def count(**_kwargs: Any) -> None:
        API_CALLS[0] += 1

    def counted_client(self: SQSBroker) -> Any:
        client = make_client(self)
        client.meta.events.register("before-call.sqs", count)
        return client

    def write_count() -> None:
        with open(ENV.path(f"api-calls-{os.getpid()}.txt"), "w") as out:
            out.write(str(API_CALLS[0]))

    setattr(SQSBroker, "_make_client", counted_client)  # noqa: B010 - the point here
    atexit.register(write_count)


if ENV.queue:
    app.conf.default_queue = ENV.queue

if ENV.count_calls:
    _count_sqs_calls()


@app.task(name="bench.noop", ignore_result=not ENV.results)
def noop(x: int, y: int) -> int:
    COUNTER.incr()
    return x + y
