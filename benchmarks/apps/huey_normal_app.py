"""SqliteHuey at taskframe's durability: WAL with ``synchronous=NORMAL``.

SqliteHuey leaves SQLite's default, ``synchronous=FULL`` (an fsync at every commit); its
``fsync=False`` means ``OFF``, weaker than taskframe's ``NORMAL`` (which fsyncs only at
checkpoints: a power loss may drop the last commits, a crashed process loses nothing).
This variant sets ``NORMAL`` on each connection, so the two run at the same durability.
"""

from __future__ import annotations

from huey import Huey
from huey.storage import SqliteStorage

from benchmarks.common import BenchEnv

ENV = BenchEnv.from_environ()
COUNTER = ENV.counter()


class NormalSyncStorage(SqliteStorage):
    def _create_connection(self):  # type: ignore[no-untyped-def]
        conn = super()._create_connection()
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn


huey = Huey("bench", storage_class=NormalSyncStorage, filename=ENV.path("huey.sqlite3"), results=ENV.results)


@huey.task()
def noop(x: int, y: int) -> int:
    COUNTER.incr()
    return x + y
