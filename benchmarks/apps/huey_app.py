"""Huey: SqliteHuey (queue and results in one file), or RedisHuey.

Huey stores a task's return value only when the Huey instance has ``results=True``.
"""

from __future__ import annotations

from huey import RedisHuey, SqliteHuey

from benchmarks.common import BenchEnv

ENV = BenchEnv.from_environ()
COUNTER = ENV.counter()

if ENV.broker == "redis":
    # notify_result: Result.get(blocking=True) waits on BLPOP instead of polling.
    huey = RedisHuey("bench", url=ENV.redis_url, results=ENV.results, notify_result=True)
else:
    huey = SqliteHuey("bench", filename=ENV.path("huey.sqlite3"), results=ENV.results)


@huey.task()
def noop(x: int, y: int) -> int:
    COUNTER.incr()
    return x + y
