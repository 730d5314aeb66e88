"""Celery 5: kombu's SQLAlchemy transport on SQLite with the ``db+sqlite`` result backend, Redis, or
RabbitMQ (py-amqp) with results in Redis."""

from __future__ import annotations

from celery import Celery
from kombu.transport.sqlalchemy import Transport as SQLAlchemyTransport

from benchmarks.common import BenchEnv

ENV = BenchEnv.from_environ()
COUNTER = ENV.counter()

if ENV.broker == "redis":
    broker, backend = ENV.redis_url, ENV.redis_url
elif ENV.broker == "amqp":
    broker, backend = ENV.broker_url, ENV.redis_url
else:
    broker, backend = (
        f"sqla+sqlite:///{ENV.path('celery-broker.sqlite3')}",
        f"db+sqlite:///{ENV.path('celery-results.sqlite3')}",
    )

    # kombu's polling transports sleep polling_interval seconds when the queue is empty
    # (default 1 s); taskframe's SQLite consumer polls at most every 20 ms, so Celery gets
    # the same. Set on the class: the SQLAlchemy transport hands broker_transport_options
    # to create_engine(), which rejects polling_interval.
    SQLAlchemyTransport.polling_interval = 0.02

app = Celery("bench", broker=broker, backend=backend if ENV.results else None)
app.conf.update(task_ignore_result=not ENV.results)
if ENV.queue:
    app.conf.task_default_queue = ENV.queue
if ENV.broker == "amqp":
    # Remote control declares an exclusive pidbox queue per worker name (celery@host), which
    # a second worker on the same host cannot take; the benchmark never uses it.
    app.conf.worker_enable_remote_control = False


@app.task(name="bench.noop")
def noop(x: int, y: int) -> int:
    COUNTER.incr()
    return x + y
