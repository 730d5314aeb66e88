"""The broker adapters under test: one entry each, and every conformance test runs on it.

A new adapter joins the suite by adding one :class:`BrokerSpec` to :data:`BROKERS`. Tests
that need a capability an adapter lacks skip by the capability's flag, never by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import rabbitmq_service, redis_cluster_service, redis_sentinel_service, redis_service
from tests.conformance import sqs_server

#: The Redis database of the kombu+redis entry (see BROKERS).
KOMBU_REDIS_DB = redis_service.KOMBU_DB


def _always_available() -> str | None:
    return None


@dataclass(frozen=True)
class BrokerSpec:
    """How to reach one broker adapter, and what it can do.

    Attributes:
        name: the test id, e.g. ``"sqlite"``.
        make_url: builds the broker URL; gets the test's ``tmp_path`` for file-based brokers.
        crosses_processes: its queues are shared by every broker object on the same URL, in
            any process, and survive the object that published (durable).
        lease_s: the ``visibility_timeout`` the lease tests use; raise it for a broker whose
            timers are coarse (SQS counts whole seconds).
        unavailable: returns why the service cannot be reached, or None when it can; such a
            test fails in CI (``CI=true``) and skips elsewhere, with that message.
        marks: pytest marks for this adapter's tests, e.g. ``pytest.mark.redis``.
    """

    name: str
    make_url: Callable[[Path], str]
    crosses_processes: bool
    lease_s: float = 0.5
    unavailable: Callable[[], str | None] = _always_available
    marks: tuple[Any, ...] = field(default=())
    #: An ack that comes after the lease ran out still deletes the message when nobody received
    #: it since. False for amqp: the lease's end already published a copy, which runs again.
    late_ack_deletes: bool = True
    #: ``stats().reserved`` counts deliveries held by other processes too. False for amqp:
    #: AMQP reports no unacked counts (only the management API does), so it counts its own.
    counts_others_reserved: bool = True
    #: ``purge()`` leaves reserved (leased) messages alone. False for sqs: SQS's PurgeQueue deletes
    #: in-flight messages too, and nothing else removes delayed ones.
    purge_keeps_reserved: bool = True
    #: The consumer reports what it dead-lettered after ``max_deliveries`` (``ReportsBuried``).
    #: False for sqs: its redrive policy moves them on the server, unseen.
    reports_buried: bool = True
    #: The consumer hands back unstarted deliveries without counting them (``ReleasesUnstarted``).
    #: False for sqs: SQS counts receives itself and cannot take one back.
    releases_unstarted: bool = True


BROKERS: list[BrokerSpec] = [
    BrokerSpec("memory", lambda tmp_path: "memory://", crosses_processes=False),
    BrokerSpec(
        "sqlite",
        lambda tmp_path: f"sqlite:///{tmp_path / 'broker.sqlite3'}",
        crosses_processes=True,
    ),
    # Redis: its own database (tests/redis_service.py); fresh queue names keep tests apart.
    BrokerSpec(
        "redis",
        lambda tmp_path: redis_service.url(redis_service.BROKER_DB),
        crosses_processes=True,
        unavailable=redis_service.unavailable,
    ),
    # The same adapter on a three-node Redis Cluster of this session (tests/redis_cluster_service.py,
    # started on first use): fresh queue names land on any node, so a consumer of two queues reads
    # across slots.
    BrokerSpec(
        "redis-cluster",
        lambda tmp_path: redis_cluster_service.url(),
        crosses_processes=True,
        unavailable=redis_cluster_service.unavailable,
    ),
    # The same adapter through Redis Sentinel (redis+sentinel://): a primary, a replica and a
    # Sentinel of this session (tests/redis_sentinel_service.py, started on first use).
    BrokerSpec(
        "redis-sentinel",
        lambda tmp_path: redis_sentinel_service.url(),
        crosses_processes=True,
        unavailable=redis_sentinel_service.unavailable,
    ),
    # SQS: one moto_server per session (tests/conformance/sqs_server.py); a queue prefix per URL.
    # SQS counts visibility and delays in whole seconds: a 0.3-s delay (1 s on SQS) must end before
    # a one-lease-old delivery comes back (test_messages_outlive_...), hence 2 s.
    BrokerSpec(
        "sqs",
        sqs_server.make_url,
        crosses_processes=True,
        lease_s=2.0,
        unavailable=sqs_server.unavailable,
        purge_keeps_reserved=False,
        reports_buried=False,
        releases_unstarted=False,
    ),
    # RabbitMQ: a vhost per test session (tests/rabbitmq_service.py); queues with x-max-priority 9.
    BrokerSpec(
        "amqp",
        lambda tmp_path: rabbitmq_service.url(max_priority=9),
        crosses_processes=True,
        unavailable=rabbitmq_service.unavailable,
        late_ack_deletes=False,
        counts_others_reserved=False,
    ),
    # The same adapter with quorum queues (replicated; RabbitMQ counts deliveries in
    # x-delivery-count; no priorities on RabbitMQ 3.x).
    BrokerSpec(
        "amqp-quorum",
        lambda tmp_path: rabbitmq_service.url(queue_type="quorum"),
        crosses_processes=True,
        unavailable=rabbitmq_service.unavailable,
        late_ack_deletes=False,
        counts_others_reserved=False,
    ),
    # kombu's Redis transport (brokers/kombu.py), Celery's layout: its own database, because kombu
    # keeps every lease of a database in one "unacked" hash and any client puts back expired ones.
    # 15 is free (tests/redis_service.py: 11-13; 14 is tests/integration/test_celery_interop.py).
    # late_ack_deletes: a put-back message is a new copy, which the old delivery cannot ack.
    BrokerSpec(
        "kombu+redis",
        lambda tmp_path: "kombu+" + redis_service.url(KOMBU_REDIS_DB),
        crosses_processes=True,
        unavailable=redis_service.unavailable,
        late_ack_deletes=False,
    ),
    # kombu's in-process transport: one process, no lease of its own (the adapter keeps them); a
    # lease that ran out hands back a copy, so a late ack cannot delete it.
    BrokerSpec("kombu+memory", lambda tmp_path: "kombu+memory://", crosses_processes=False, late_ack_deletes=False),
    # kombu's py-amqp transport on this session's vhost: leases kept by the adapter (RabbitMQ has
    # none but the connection's); AMQP reports no unacked counts, so reserved counts its own.
    BrokerSpec(
        "kombu+amqp",
        lambda tmp_path: "kombu+" + rabbitmq_service.url(),
        crosses_processes=True,
        unavailable=rabbitmq_service.unavailable,
        late_ack_deletes=False,
        counts_others_reserved=False,
    ),
]
