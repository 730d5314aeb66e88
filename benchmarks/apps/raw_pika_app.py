"""The floor under the RabbitMQ systems: pika alone, no framework, with taskframe's guarantees
on the wire: persistent messages to a durable queue, each publish confirmed by RabbitMQ
(written to disk) before it returns, acks after the task ran.

The producer publishes a JSON ``{"id", "args"}`` to the scenario's queue through the default
exchange; the worker (``python -m benchmarks.apps.raw_pika_app``) consumes it with a
prefetch of 5 (one slot + 4, as a taskframe solo worker holds), runs ``noop``, with results
on SETs the result under the id in Redis and LPUSHes it to a reply list a round trip waits
on with BLPOP, then acks. No retry, delay, priority or dead letter.
"""

from __future__ import annotations

import json
from typing import Any

import pika

from benchmarks.apps.raw_redis_app import ENV, noop, store_result
from benchmarks.apps.raw_redis_app import client as results_client
from benchmarks.common import AMQP_URL

#: The queue the producer publishes to and the worker consumes from.
QUEUE = ENV.queue or "raw-bench"
#: Unacked deliveries the worker may hold (a solo taskframe worker: 1 slot + worker_prefetch 4).
PREFETCH = 5
#: Persistent, as taskframe and Celery publish.
PERSISTENT = pika.BasicProperties(delivery_mode=2, content_type="application/json")


def channel() -> Any:
    """A channel on a new connection, with the queue declared (durable)."""
    url = ENV.broker_url or AMQP_URL
    if url.endswith("//"):  # Celery's spelling of the vhost "/"; pika reads it as ""
        url = url[:-1] + "%2F"
    connection = pika.BlockingConnection(pika.URLParameters(url))
    opened = connection.channel()
    opened.queue_declare(QUEUE, durable=True)
    return opened


def main() -> None:
    consuming = channel()
    consuming.basic_qos(prefetch_count=PREFETCH)
    store = results_client()
    for method, _properties, body in consuming.consume(QUEUE):
        message = json.loads(body)
        value = noop(*message["args"])
        if ENV.results:
            store_result(store, message["id"], value)
        consuming.basic_ack(method.delivery_tag)


if __name__ == "__main__":
    main()
