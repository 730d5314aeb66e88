"""Dramatiq on Redis, with its Results middleware on the same Redis when results are on."""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

from benchmarks.common import BenchEnv

ENV = BenchEnv.from_environ()
COUNTER = ENV.counter()

broker = RedisBroker(url=ENV.redis_url)
if ENV.results:
    broker.add_middleware(Results(backend=RedisBackend(url=ENV.redis_url)))
dramatiq.set_broker(broker)


# store_results is an option of the Results middleware: an error without it.
@dramatiq.actor(actor_name="bench_noop", **({"store_results": True} if ENV.results else {}))
def noop(x: int, y: int) -> int:
    COUNTER.incr()
    return x + y
