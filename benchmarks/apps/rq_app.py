"""RQ: a job is a plain function; results are kept ``result_ttl`` seconds (0: not at all)."""

from __future__ import annotations

from benchmarks.common import BenchEnv

ENV = BenchEnv.from_environ()
COUNTER = ENV.counter()
#: Seconds RQ keeps a job's result: its default (500) with results on, 0 (discard) with them off.
RESULT_TTL_S = 500 if ENV.results else 0


def noop(x: int, y: int) -> int:
    COUNTER.incr()
    return x + y
