"""redis-py alone (LPUSH; BRPOP + JSON; a reply list for round trips): the floor that the
frameworks on Redis are measured against, in the same run. Not a task queue: no ack, lease,
retry, delay or priority (see benchmarks/apps/raw_redis_app.py)."""

from __future__ import annotations

import json
import sys
import uuid
from typing import Any

from benchmarks.common import BenchEnv

from . import ROUND_TRIP_TIMEOUT_S, System


class RawRedis(System):
    name = "raw-redis"
    packages = ("redis",)
    brokers = ("redis",)
    batch_api = "a pipeline of LPUSH"
    app_module = "benchmarks.apps.raw_redis_app"

    connection: Any

    def setup(self) -> None:
        super().setup()
        self.connection = self.app.client()

    def worker_command(self, env: BenchEnv) -> list[str]:
        return [sys.executable, "-m", self.app_module]

    def enqueue_one(self, indices: range) -> None:
        lpush, queue = self.connection.lpush, self.app.QUEUE
        for i in indices:
            lpush(queue, json.dumps({"id": uuid.uuid4().hex, "args": [i, i]}))

    def enqueue_batched(self, indices: range) -> None:
        pipe = self.connection.pipeline(transaction=False)
        for i in indices:
            pipe.lpush(self.app.QUEUE, json.dumps({"id": uuid.uuid4().hex, "args": [i, i]}))
        pipe.execute()

    def round_trip(self) -> int:
        task_id = uuid.uuid4().hex
        self.connection.lpush(self.app.QUEUE, json.dumps({"id": task_id, "args": [1, 2]}))
        reply = self.connection.blpop([f"raw:reply:{task_id}"], timeout=int(ROUND_TRIP_TIMEOUT_S))
        if reply is None:
            msg = f"no reply for {task_id} within {ROUND_TRIP_TIMEOUT_S}s"
            raise TimeoutError(msg)
        value: int = json.loads(reply[1])["result"]
        return value
