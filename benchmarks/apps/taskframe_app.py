"""taskframe: the embedded SQLite default (queue and results in one file), or Redis."""

from __future__ import annotations

from benchmarks.common import BenchEnv
from taskframe import App

ENV = BenchEnv.from_environ()
COUNTER = ENV.counter()

if ENV.broker == "redis":
    app = App("bench", broker=ENV.redis_url, backend=ENV.redis_url)
else:
    app = App("bench", broker=f"sqlite:///{ENV.path('taskframe.sqlite3')}")


@app.task(name="bench.noop", ignore_result=not ENV.results)
def noop(x: int, y: int) -> int:
    COUNTER.incr()
    return x + y
