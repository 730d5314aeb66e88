"""The floor under every Redis system: redis-py alone, no framework.

The producer LPUSHes a JSON ``{"id", "args"}``; the worker (``python -m
benchmarks.apps.raw_redis_app``) BRPOPs it, runs ``noop`` and, with results on, SETs the
result under the id and LPUSHes it to a reply list a round trip waits on with BLPOP. No ack,
no lease, no retry: a message a worker took is gone (at-most-once), as with LPUSH/BRPOP.
"""

from __future__ import annotations

import json

import redis

from benchmarks.common import BenchEnv

ENV = BenchEnv.from_environ()
COUNTER = ENV.counter()
#: The list the producer pushes to and the worker pops from.
QUEUE = "raw:bench"
#: Seconds a stored result is kept.
RESULT_TTL_S = 3600


def client() -> redis.Redis:
    return redis.Redis.from_url(ENV.redis_url)


def noop(x: int, y: int) -> int:
    COUNTER.incr()
    return x + y


def main() -> None:
    connection = client()
    while True:
        popped = connection.brpop([QUEUE], timeout=1)
        if popped is None:
            continue
        message = json.loads(popped[1])
        value = noop(*message["args"])
        if ENV.results:
            store_result(connection, message["id"], value)


def store_result(connection: redis.Redis, task_id: str, value: int) -> None:
    """SET the result under the id and LPUSH it to the reply list a round trip waits on."""
    encoded = json.dumps({"status": "SUCCESS", "result": value})
    pipe = connection.pipeline(transaction=False)
    pipe.set(f"raw:result:{task_id}", encoded, ex=RESULT_TTL_S)
    pipe.lpush(f"raw:reply:{task_id}", encoded)
    pipe.expire(f"raw:reply:{task_id}", RESULT_TTL_S)
    pipe.execute()


if __name__ == "__main__":
    main()
