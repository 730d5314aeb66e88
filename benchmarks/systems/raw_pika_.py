"""pika alone (confirmed persistent publishes; basic.consume with prefetch 5 and late acks;
results and replies in Redis): the floor that the frameworks on RabbitMQ are measured against,
in the same run. Not a task queue (see benchmarks/apps/raw_pika_app.py)."""

from __future__ import annotations

import json
import sys
import uuid
from typing import Any

from benchmarks.common import BenchEnv

from . import ROUND_TRIP_TIMEOUT_S, System


class RawPika(System):
    name = "raw-pika"
    packages = ("pika",)
    brokers = ("amqp",)
    batch_api = "one AMQP transaction (tx.select, the publishes, tx.commit)"
    app_module = "benchmarks.apps.raw_pika_app"

    confirmed: Any  # a channel in confirm mode: each publish waits for RabbitMQ's confirm
    transacted: Any  # a channel in transaction mode: a batch is durable at its commit
    replies: Any

    def setup(self) -> None:
        super().setup()
        self.confirmed = self.app.channel()
        self.confirmed.confirm_delivery()
        self.transacted = self.app.channel()
        self.transacted.tx_select()
        self.replies = self.app.results_client()

    def worker_command(self, env: BenchEnv) -> list[str]:
        return [sys.executable, "-m", self.app_module]

    def _publish(self, channel: Any, task_id: str, i: int) -> None:
        body = json.dumps({"id": task_id, "args": [i, i]})
        channel.basic_publish("", self.app.QUEUE, body, self.app.PERSISTENT)

    def enqueue_one(self, indices: range) -> None:
        for i in indices:
            self._publish(self.confirmed, uuid.uuid4().hex, i)

    def enqueue_batched(self, indices: range) -> None:
        for i in indices:
            self._publish(self.transacted, uuid.uuid4().hex, i)
        self.transacted.tx_commit()

    def round_trip(self) -> int:
        task_id = uuid.uuid4().hex
        body = json.dumps({"id": task_id, "args": [1, 2]})
        self.confirmed.basic_publish("", self.app.QUEUE, body, self.app.PERSISTENT)
        reply = self.replies.blpop([f"raw:reply:{task_id}"], timeout=int(ROUND_TRIP_TIMEOUT_S))
        if reply is None:
            msg = f"no reply for {task_id} within {ROUND_TRIP_TIMEOUT_S}s"
            raise TimeoutError(msg)
        value: int = json.loads(reply[1])["result"]
        return value
