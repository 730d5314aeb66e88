"""A broker client in its own process, driven by tests/conformance/test_broker.py.

Usage: ``python _broker_child.py URL SETTINGS_JSON MODE QUEUE [ARGS...]`` where MODE is

- ``hold``: receive one message, print ``received <task id> <deliveries>``, then sleep until
  killed (the test kills it with SIGKILL); exit 2 if nothing arrives within 10 s;
- ``produce N PREFIX``: publish N messages with task ids ``PREFIX-0`` ... ``PREFIX-<N-1>``;
- ``consume STOP_FILE``: receive and ack, printing each task id once acked, until STOP_FILE
  exists and a receive comes back empty.
"""

from __future__ import annotations

import json
import os
import sys
import time

from taskframe.broker import Envelope
from taskframe.registry import create_broker
from taskframe.settings import Settings


def envelope(task_id: str) -> Envelope:
    return Envelope(body=b"[[], {}, {}]", headers={"task": "tests.child", "id": task_id})


def main(argv: list[str]) -> int:
    url, settings_json, mode, queue, *args = argv
    broker = create_broker(url, Settings(broker_url=url, **json.loads(settings_json)))
    try:
        if mode == "hold":
            deliveries = broker.consumer([queue], prefetch=1).receive(10.0)
            if not deliveries:
                return 2
            [delivery] = deliveries
            print("received", delivery.envelope.task_id, delivery.deliveries, flush=True)
            time.sleep(3600)
        elif mode == "produce":
            count, prefix = int(args[0]), args[1]
            for i in range(count):
                broker.publish(queue, envelope(f"{prefix}-{i}"))
        elif mode == "consume":
            stop_file = args[0]
            consumer = broker.consumer([queue], prefetch=10)
            while True:
                deliveries = consumer.receive(0.2, max_messages=10)
                for delivery in deliveries:
                    consumer.ack(delivery)
                    print(delivery.envelope.task_id, flush=False)
                if not deliveries and os.path.exists(stop_file):
                    break
        else:
            print(f"unknown mode {mode!r}", file=sys.stderr)
            return 64
    finally:
        broker.close()
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
