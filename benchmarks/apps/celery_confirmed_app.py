"""Celery 5 on RabbitMQ with taskframe's guarantees: each publish waits for RabbitMQ's
publisher confirm (kombu's ``confirm_publish`` transport option) and a task is acked after it
ran (``task_acks_late``). The like-for-like row beside Celery's defaults (unconfirmed
publishes, ack before running)."""

from __future__ import annotations

from benchmarks.apps.celery_app import app, noop

app.conf.update(broker_transport_options={"confirm_publish": True}, task_acks_late=True)

__all__ = ["app", "noop"]
