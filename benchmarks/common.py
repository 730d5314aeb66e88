"""What the harness, the drivers and the benchmark apps share: the run's settings and the end marker.

A run's settings travel in ``BENCH_*`` environment variables, because the apps are imported
by real worker processes (``taskframe worker``, ``huey_consumer``, ``celery worker``, ...)
that the harness starts like a user would, with no other way to pass them a value.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from typing import Any, Protocol

#: The Redis database every benchmark on Redis uses; the harness FLUSHDBs it before each run.
REDIS_DB = 14
#: The Redis server the benchmarks use.
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
#: File of the end-marker counter on the SQLite broker, in the run's directory.
COUNTER_FILE = "counter.sqlite3"
#: The RabbitMQ server of the AMQP run (vhost "/").
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
#: Key of the end-marker counter on Redis.
COUNTER_KEY = "bench:done"


@dataclass(frozen=True)
class BenchEnv:
    """One run's settings: which broker, where its files go, whether tasks store results."""

    broker: str  # "sqlite", "redis" or "sqs"
    directory: str  # a fresh temporary directory, also the workers' working directory
    results: bool
    redis_url: str = REDIS_URL
    #: The broker's URL where the broker name alone does not say it (SQS: the emulator's URL).
    broker_url: str = ""
    #: A result backend of its own (the per-backend run), else the broker's default.
    backend_url: str = ""
    #: Count the SQS API calls of each process (see benchmarks.apps.taskframe_app).
    count_calls: bool = False
    #: The queue the producer sends to and the workers consume (AMQP: a fresh one per run), or "".
    queue: str = ""

    @classmethod
    def from_environ(cls) -> BenchEnv:
        return cls(
            broker=os.environ["BENCH_BROKER"],
            directory=os.environ["BENCH_DIR"],
            results=os.environ["BENCH_RESULTS"] == "1",
            redis_url=os.environ.get("BENCH_REDIS_URL", REDIS_URL),
            broker_url=os.environ.get("BENCH_BROKER_URL", ""),
            backend_url=os.environ.get("BENCH_BACKEND_URL", ""),
            count_calls=os.environ.get("BENCH_COUNT_CALLS") == "1",
            queue=os.environ.get("BENCH_QUEUE", ""),
        )

    def to_environ(self) -> dict[str, str]:
        return {
            "BENCH_BROKER": self.broker,
            "BENCH_DIR": self.directory,
            "BENCH_RESULTS": "1" if self.results else "0",
            "BENCH_REDIS_URL": self.redis_url,
            "BENCH_BROKER_URL": self.broker_url,
            "BENCH_BACKEND_URL": self.backend_url,
            "BENCH_COUNT_CALLS": "1" if self.count_calls else "0",
            "BENCH_QUEUE": self.queue,
        }

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def counter(self) -> Counter:
        if self.broker == "redis":
            return RedisCounter(self.redis_url)
        return SQLiteCounter(self.path(COUNTER_FILE))


class Counter(Protocol):
    """The end marker: every benchmark task adds one; the harness watches it reach N."""

    def reset(self) -> None: ...
    def incr(self) -> None: ...
    def value(self) -> int: ...


class SQLiteCounter:
    """One row in its own small file, so the broker's file sees no extra writes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._pid = 0

    def _connection(self) -> sqlite3.Connection:
        # Reopened after fork: a connection must not cross into a child process.
        if self._conn is None or self._pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def reset(self) -> None:
        conn = self._connection()
        conn.execute("CREATE TABLE IF NOT EXISTS done (n INTEGER NOT NULL)")
        conn.execute("DELETE FROM done")
        conn.execute("INSERT INTO done (n) VALUES (0)")

    def incr(self) -> None:
        self._connection().execute("UPDATE done SET n = n + 1")

    def value(self) -> int:
        return int(self._connection().execute("SELECT n FROM done").fetchone()[0])


class RedisCounter:
    """An INCR in the benchmark's Redis database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: Any = None
        self._pid = 0

    def _redis(self) -> Any:
        import redis

        if self._client is None or self._pid != os.getpid():
            self._client, self._pid = redis.Redis.from_url(self.url), os.getpid()
        return self._client

    def reset(self) -> None:
        self._redis().set(COUNTER_KEY, 0)

    def incr(self) -> None:
        self._redis().incr(COUNTER_KEY)

    def value(self) -> int:
        return int(self._redis().get(COUNTER_KEY) or 0)
