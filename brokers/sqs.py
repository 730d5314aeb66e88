"""Amazon SQS broker: standard and FIFO queues through boto3.

Connection string
=================

.. code-block::

    sqs://                                        boto3's own credentials, region and endpoint
    sqs://ACCESS_KEY_ID:SECRET_ACCESS_KEY@        explicit keys (URL-quote a secret with / or +)
    sqs://?region_name=eu-west-1&queue_prefix=prod-

Credentials, region and endpoint come from boto3's usual chain (environment, ``~/.aws``,
instance roles; ``AWS_ENDPOINT_URL_SQS`` points it at an emulator) unless the URL or the
options say otherwise. Keys in the URL are masked (``sqs://KEY:***@``) in every log line and
error. URL query parameters are read as ``broker_options``; a key given in both places takes
the ``broker_options`` value. Options:

* ``region_name``: the AWS region; required when boto3 cannot resolve one.
* ``endpoint_url``: an SQS-compatible endpoint, e.g. ``http://127.0.0.1:5000`` for moto.
* ``queue_prefix`` (default ``""``): prepended to every SQS queue name, e.g. per environment.
* ``message_group_id`` (FIFO queues only; default: the taskframe queue name).
* ``max_delay_s`` (default 900, at most 900): the longest ``DelaySeconds`` one hop uses; see Delays.
* ``ack_batch_s`` (default 0): 0 deletes each acked message inside ``ack()``. A positive value
  lets an ack wait up to that long to share a ``DeleteMessageBatch`` with up to nine others
  (about 0.4 instead of 1.3 requests per task; see Delivery guarantee for the price).
* ``max_message_bytes`` (default 262144 = 256 KiB, at most 1048576): the size limit, body plus
  message attributes, checked before sending; queues are created with this
  ``MaximumMessageSize``. Each 64 KiB of a request is billed as one request.

Queues
======
A taskframe queue ``q`` is the SQS queue ``<queue_prefix>q``; characters SQS does not allow in
names (anything but letters, digits, ``-`` and ``_``) become ``-``, so ``tasks.low`` is
``tasks-low``. A name ending in ``.fifo`` is a FIFO queue. Publishing to or consuming from a
queue creates it, with its dead-letter queue ``<name>-dead`` (``<name>-dead.fifo``) and a
redrive policy of ``maxReceiveCount = max_deliveries``. An existing queue is used as it is:
its redrive policy and attributes are not changed.

Features
========
* Priority: no (``supports_priority = False``). A priority other than the default is logged
  once per process and ignored; SQS delivers in roughly publish order (FIFO queues exactly,
  per message group).
* Delays: ``DelaySeconds`` (whole seconds, rounded up) up to ``max_delay_s``. A longer delay
  hops: the message carries its due time (``taskframe.due_at``), and a consumer that receives
  it early sends it again with the remaining delay (at most ``max_delay_s``) and deletes the
  early copy, until it is due (within 0.5 s). Retries with a countdown take the same path.
  FIFO queues cannot delay single messages: a delay there raises :class:`BrokerError`.
* Leases: the visibility timeout. ``receive`` sets ``VisibilityTimeout =
  ceil(visibility_timeout)``; ``renew`` extends it with ``ChangeMessageVisibilityBatch``.
  SQS caps a message's invisibility at 12 hours after its receipt: a task running longer is
  delivered again.
* Dead letters: SQS's redrive policy moves a message received more than ``max_deliveries``
  times to ``<name>-dead``. ``nack(requeue=False)`` and the consumer itself (for an unreadable
  message, or one whose count went past ``max_deliveries`` by other means) send a copy there
  with ``taskframe.reason``, ``taskframe.dead_at`` and ``taskframe.deliveries`` attributes,
  then delete the original. ``dead_letters()`` reads the dead queue by receiving (each listed
  message is hidden for 30 s while the list is made, then released at once; nothing is
  deleted, and each listing adds to the dead copy's SQS receive count). For messages moved by
  the redrive policy, SQS records no reason and no time of death: the reason names
  ``max_deliveries``, and ``dead_at`` is the time the message was first sent.
  ``requeue_dead`` sends each back as a fresh message and deletes the dead copy;
  ``purge_dead`` deletes them one batch at a time (no ``PurgeQueue`` cooldown).
* Delivery counts: SQS's ``ApproximateReceiveCount`` plus the deliveries a message had before
  it was re-sent with a delay (``nack(requeue=True, delay_s>0)``; ``taskframe.deliveries``).
* Purge: ``PurgeQueue``. SQS removes in-flight (reserved) messages too, allows one purge per
  queue every 60 s (a second one raises :class:`BrokerError`), and may take up to 60 s to
  finish on AWS; the count returned is SQS's approximate number of ready and delayed messages.
* Stats: SQS's approximate counts (``ApproximateNumberOfMessages``, ``...Delayed``,
  ``...NotVisible``; dead = visible + in-flight of the dead queue). AWS updates them within a
  minute or so; they are exact on moto.
* Batches: ``receive`` gets up to 10 messages a request (bounded by ``max_messages``);
  ``publish_many`` sends ``SendMessageBatch`` chunks of 10 messages and at most
  ``max_message_bytes``; acks are deleted ``DeleteMessageBatch``-wise (see ``ack_batch_s``).
* Waiting: a receive of one second or more long-polls (``WaitTimeSeconds`` up to 20, within
  its timeout), which costs at most a request a second while idle. A shorter one (the worker
  uses 50 ms while tasks run, to settle finished ones promptly) short-polls once and sleeps
  out the rest: a worker busy with long tasks on an empty queue makes up to ~20 requests a
  second. A consumer of several queues short-polls them in order (earlier first), then
  long-polls one at a time, in turn, for a second.
* Size: a message over ``max_message_bytes`` (body plus attributes) raises
  :class:`MessageTooLarge` at publish, before anything is sent.
* FIFO: ``MessageGroupId`` from ``message_group_id`` (default: the queue name), and
  ``MessageDeduplicationId`` = the task id (``<id>.r<retries>`` for a retry, so a retry is not
  taken for a duplicate of its first run; a fresh id for internal re-sends).

Delivery guarantee
==================
At least once, and duplicates are possible: SQS itself may deliver a standard-queue message
twice, and a worker whose lease ran out runs a task another worker runs too. Tasks must be
idempotent. A message is deleted only by an ack (or moved by a dead-lettering step that sends
the copy before deleting). Deletes are idempotent.

With ``ack_batch_s > 0`` an acked message is deleted within that time (at once on ``close()``,
``stats()``, the admin calls and a clean exit, and by the ack that fills a batch of 10); a
process killed in that window leaves the message to run again after its lease. That is
harmless for the default late acks (the task had run), but breaks the at-most-once promise of
``acks_late=False`` tasks, whose ack must be gone before they start: keep the default 0 if
you use them.

Late acks: SQS deletes only with the latest receipt handle of a message (an older one "succeeds
but the message is not deleted", per the DeleteMessage reference). Within one process this
adapter also drops ack, nack and renew of a delivery whose message was received again since,
because moto, unlike AWS, honours stale receipt handles.

What was tested on what
=======================
Every test (the shared conformance suite, worker processes, ``tests/integration/test_sqs.py``)
ran against moto 5.2 (``moto_server``) with boto3 1.44 on Python 3.11; not against AWS.
The AWS behaviours this module relies on without a test here: stale receipt handles, the
60-s purge cooldown and delay, approximate counts, short polls that may miss messages on a
small queue (the long poll that follows catches them), and at-least-once duplicates.
"""

from __future__ import annotations

import atexit
import difflib
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qsl, unquote, urlsplit

import boto3
import botocore.config
import botocore.exceptions

from taskframe.broker import (
    DEFAULT_PRIORITY,
    DeadLetter,
    Delivery,
    Envelope,
    OutgoingMessage,
    QueueStats,
    check_priority,
    check_queues,
    check_receive,
    warn_lost_leases,
)
from taskframe.exceptions import (
    BrokerConnectionError,
    BrokerError,
    ConfigurationError,
    MessageError,
    MessageTooLarge,
)
from taskframe.settings import mask_url

if TYPE_CHECKING:
    from taskframe.broker import Broker, Consumer
    from taskframe.settings import Settings

log = logging.getLogger(__name__)

#: SQS's longest long poll, in seconds.
MAX_WAIT_S = 20
#: SQS's longest per-message delay, in seconds.
MAX_DELAY_S = 900
#: SQS's longest visibility timeout, in seconds (also the cap on a message's total invisibility).
MAX_VISIBILITY_S = 43200
#: Messages per SQS batch request (send, receive, delete, change visibility).
BATCH_SIZE = 10
#: Default size limit of one message, body plus attributes, in bytes (SQS's default queue limit).
DEFAULT_MAX_MESSAGE_BYTES = 262_144
#: SQS's largest configurable MaximumMessageSize, in bytes.
SQS_MAX_MESSAGE_BYTES = 1_048_576
#: A message received at most this many seconds before its due time counts as due.
DUE_TOLERANCE_S = 0.5
#: A receive whose budget is this close to a whole second still long-polls that second.
WAIT_SLACK_S = 0.05
#: How long dead_letters() hides each message it lists, so one listing does not see it twice.
LIST_HIDE_S = 30
#: Retention of dead-letter queues: SQS's maximum, 14 days, in seconds.
DEAD_RETENTION_S = 1_209_600
#: Receipt handles remembered per process to spot stale deliveries (oldest forgotten first).
MAX_TRACKED_RECEIPTS = 100_000
#: Seconds a connection attempt may take before the request is retried or fails.
CONNECT_TIMEOUT_S = 5.0
#: Total attempts botocore makes for a request that fails with a retryable error.
MAX_ATTEMPTS = 4
#: How long an idle delete-batching thread lingers before it exits, in seconds.
DELETER_LINGER_S = 2.0

#: Message attributes this adapter writes; SQS counts them in the message size.
DUE_AT, DELIVERIES, REASON, DEAD_AT = (
    "taskframe.due_at",
    "taskframe.deliveries",
    "taskframe.reason",
    "taskframe.dead_at",
)
_OWN_ATTRIBUTES = (DUE_AT, DELIVERIES, REASON, DEAD_AT)

_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_DEDUP_SAFE = re.compile(r"^[A-Za-z0-9!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]{1,128}$")
_STALE_CODES = frozenset({"ReceiptHandleIsInvalid", "MessageNotInflight", "InvalidParameterValue"})
_MISSING_QUEUE_CODES = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "ExpiredToken",
        "AccessDenied",
        "AccessDeniedException",
        "InvalidSecurity",
    }
)
_RETRYABLE_CODES = frozenset(
    {"RequestThrottled", "ThrottlingException", "ServiceUnavailable", "InternalError", "KmsThrottled"}
)
_CONNECTION_ERRORS = (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)

#: Option name -> type, for broker_options and URL query parameters.
_OPTIONS: dict[str, type] = {
    "region_name": str,
    "endpoint_url": str,
    "queue_prefix": str,
    "message_group_id": str,
    "max_delay_s": float,
    "ack_batch_s": float,
    "max_message_bytes": int,
}

#: The process that logged the "priority is ignored" warning (one warning per process).
_priority_warned_pid = -1
#: Every delete batcher of this process, flushed at exit so that no ack is lost to a clean exit.
_DELETERS: weakref.WeakSet[_Deleter] = weakref.WeakSet()
#: Clients inherited through fork(): kept referenced so the child never closes the parent's sockets.
_INHERITED: list[Any] = []


@dataclass(frozen=True)
class _Receipt:
    """The tag of an SQS delivery: enough to delete, extend, re-send or dead-letter it."""

    queue_url: str
    message_id: str
    handle: str
    body: str
    attributes: Mapping[str, Any]


@dataclass(frozen=True)
class _QueueNames:
    sqs: str  # the SQS name of the queue
    dead: str  # the SQS name of its dead-letter queue
    fifo: bool


class SQSBroker:
    """The ``sqs://`` broker; see the module docstring for its options and guarantees."""

    supports_priority: ClassVar[bool] = False

    def __init__(self, url: str, conf: Settings) -> None:
        self.url = url
        options = _parse_options(url, conf.broker_options)
        parts = urlsplit(url)
        if parts.hostname:
            msg = (
                f"sqs broker {mask_url(url)!r}: a host in the URL is not used; write the endpoint as"
                " broker_options={'endpoint_url': ...} or sqs://?endpoint_url=..., or drop it for AWS"
            )
            raise ConfigurationError(msg)
        self.access_key_id = unquote(parts.username) if parts.username else None
        self.secret_access_key = unquote(parts.password) if parts.password else None
        self.region_name: str | None = options.get("region_name")
        self.endpoint_url: str | None = options.get("endpoint_url")
        self.queue_prefix: str = options.get("queue_prefix", "")
        self.message_group_id: str | None = options.get("message_group_id")
        self.max_delay_s = _bounded("max_delay_s", options.get("max_delay_s", MAX_DELAY_S), 1, MAX_DELAY_S, url)
        self.ack_batch_s = _bounded("ack_batch_s", options.get("ack_batch_s", 0.0), 0, 60, url)
        self.max_message_bytes = int(
            _bounded(
                "max_message_bytes",
                options.get("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES),
                1024,
                SQS_MAX_MESSAGE_BYTES,
                url,
            )
        )
        self.visibility_s = min(max(1, math.ceil(conf.visibility_timeout)), MAX_VISIBILITY_S)
        self.max_deliveries = conf.max_deliveries
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._client_obj: Any = None
        self._queue_urls: dict[str, str] = {}  # SQS queue name -> URL; strings, valid in any process
        self._latest: dict[str, str] = {}  # message id -> latest receipt handle received in this process
        self._deleter = _Deleter(self)

    def __repr__(self) -> str:
        return f"<SQSBroker {mask_url(self.url)}>"

    # -- the client, per process -----------------------------------------------------------

    def client(self) -> Any:
        """This process's boto3 SQS client (thread-safe; a forked child builds its own)."""
        if self._pid != os.getpid():
            self._after_fork()
        client = self._client_obj
        if client is not None:
            return client
        with self._lock:
            if self._client_obj is None:
                self._client_obj = self._make_client()
            return self._client_obj

    def _after_fork(self) -> None:
        # The parent's client, lock and threads are not ours: a thread of the parent may have
        # held the lock at fork time, and the client's sockets belong to the parent.
        if self._client_obj is not None:
            _INHERITED.append(self._client_obj)
        self._client_obj = None
        self._lock = threading.Lock()
        self._latest = {}
        self._deleter = _Deleter(self)
        self._pid = os.getpid()

    @property
    def _acks(self) -> _Deleter:
        """This process's batcher of acked deletes (a forked child starts with an empty one)."""
        if self._pid != os.getpid():
            self._after_fork()
        return self._deleter

    def _make_client(self) -> Any:
        # A Session per client: boto3's default session is not thread-safe to build clients on.
        session = boto3.session.Session(
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region_name,
        )
        if not session.region_name:
            msg = (
                f"sqs broker {mask_url(self.url)!r}: no AWS region; set broker_options={{'region_name': ...}},"
                " sqs://?region_name=..., or AWS_DEFAULT_REGION"
            )
            raise ConfigurationError(msg)
        config = botocore.config.Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=MAX_WAIT_S + 10,  # longer than the longest long poll
            retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
            max_pool_connections=32,
        )
        try:
            return session.client("sqs", endpoint_url=self.endpoint_url, config=config)
        except ValueError as exc:  # botocore's "Invalid endpoint: ..."
            msg = f"sqs broker {mask_url(self.url)!r}: {exc}; endpoint_url must look like https://host[:port]"
            raise ConfigurationError(msg) from None

    def _call(self, action: str, operation: str, **params: Any) -> Any:
        """Call ``operation`` on this process's client, turning failures into taskframe errors."""
        try:
            return getattr(self.client(), operation)(**params)
        except botocore.exceptions.ClientError as exc:
            raise self._client_error(exc, action) from exc
        except _CONNECTION_ERRORS as exc:
            msg = f"sqs broker {mask_url(self.url)!r}: {action} failed: {exc}; is SQS (or the endpoint) reachable?"
            raise BrokerConnectionError(msg) from exc
        except (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError) as exc:
            msg = (
                f"sqs broker {mask_url(self.url)!r}: {action} failed: {exc}; give credentials as"
                " sqs://KEY:SECRET@, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or a role"
            )
            raise ConfigurationError(msg) from exc
        except botocore.exceptions.BotoCoreError as exc:
            msg = f"sqs broker {mask_url(self.url)!r}: {action} failed: {type(exc).__name__}: {exc}"
            raise BrokerError(msg) from exc

    def _client_error(self, exc: botocore.exceptions.ClientError, action: str) -> BrokerError:
        codes = _error_codes(exc)
        text = mask_url(str(exc))
        where = f"sqs broker {mask_url(self.url)!r}: {action} failed"
        if codes & _CREDENTIAL_CODES:
            return BrokerError(f"{where}: AWS refused the credentials ({text}); check the keys, region and IAM policy")
        if codes & _RETRYABLE_CODES or _status(exc) >= 500:
            return BrokerConnectionError(f"{where}: {text}; SQS is busy or unavailable, retry later")
        if codes & {"AWS.SimpleQueueService.PurgeQueueInProgress", "PurgeQueueInProgress"}:
            return BrokerError(f"{where}: {text}; SQS allows one purge per queue every 60 s: try again in a minute")
        return BrokerError(f"{where}: {text}")

    # -- queues ----------------------------------------------------------------------------

    def _names(self, queue: str) -> _QueueNames:
        fifo = queue.endswith(".fifo")
        base = _NAME_UNSAFE.sub("-", self.queue_prefix + (queue[: -len(".fifo")] if fifo else queue))
        suffix = ".fifo" if fifo else ""
        names = _QueueNames(sqs=base + suffix, dead=base + "-dead" + suffix, fifo=fifo)
        if len(names.dead) > 80:
            msg = (
                f"queue {queue!r} is SQS queue {names.sqs!r}, whose dead-letter queue {names.dead!r} is"
                f" {len(names.dead)} characters long; SQS allows 80: use a shorter queue name or queue_prefix"
            )
            raise ConfigurationError(msg)
        return names

    def _queue_url(self, queue: str, *, create: bool) -> str | None:
        """The URL of ``queue``'s SQS queue; created with its dead-letter queue if ``create``."""
        names = self._names(queue)
        url = self._queue_urls.get(names.sqs)
        if url is not None:
            return url
        url = self._lookup(names.sqs)
        if url is None:
            if not create:
                return None
            url = self._create(queue, names)
        self._queue_urls[names.sqs] = url
        return url

    def _dead_url(self, queue: str, *, create: bool) -> str | None:
        names = self._names(queue)
        url = self._queue_urls.get(names.dead)
        if url is not None:
            return url
        if create:
            self._queue_url(queue, create=True)  # creates the pair when the queue is new
            url = self._queue_urls.get(names.dead)
        if url is None:
            url = self._lookup(names.dead)
        if url is None and create:  # a queue made elsewhere, without its dead-letter queue
            url = self._create_queue(names.dead, self._dead_attributes(names))
        if url is not None:
            self._queue_urls[names.dead] = url
        return url

    def _dead_attributes(self, names: _QueueNames) -> dict[str, str]:
        fifo = {"FifoQueue": "true"} if names.fifo else {}
        return {
            **fifo,
            "MaximumMessageSize": str(self.max_message_bytes),
            "MessageRetentionPeriod": str(DEAD_RETENTION_S),
        }

    def _lookup(self, sqs_name: str) -> str | None:
        try:
            return str(self._call(f"look up queue {sqs_name!r}", "get_queue_url", QueueName=sqs_name)["QueueUrl"])
        except BrokerError as exc:
            if _error_codes(exc.__cause__) & _MISSING_QUEUE_CODES:
                return None
            raise

    def _create(self, queue: str, names: _QueueNames) -> str:
        fifo = {"FifoQueue": "true"} if names.fifo else {}
        size = {"MaximumMessageSize": str(self.max_message_bytes)}
        dead_url = self._create_queue(names.dead, self._dead_attributes(names))
        self._queue_urls[names.dead] = dead_url
        arn = self._call(
            f"read the ARN of {names.dead!r}", "get_queue_attributes", QueueUrl=dead_url, AttributeNames=["QueueArn"]
        )["Attributes"]["QueueArn"]
        redrive = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": self.max_deliveries})
        url = self._create_queue(names.sqs, {**fifo, **size, "RedrivePolicy": redrive})
        log.info("created SQS queue %s (dead letters: %s) for taskframe queue %r", names.sqs, names.dead, queue)
        return url

    def _create_queue(self, sqs_name: str, attributes: dict[str, str]) -> str:
        try:
            reply = self._call(f"create queue {sqs_name!r}", "create_queue", QueueName=sqs_name, Attributes=attributes)
            return str(reply["QueueUrl"])
        except BrokerError as exc:
            # Another process created it first with other settings (an older max_deliveries,
            # say): use it as it is rather than change a queue others rely on.
            if not _error_codes(exc.__cause__) & {"QueueAlreadyExists", "QueueNameExists"}:
                raise
            log.warning("SQS queue %s exists with other attributes than %s; using it unchanged", sqs_name, attributes)
            url = self._lookup(sqs_name)
            if url is None:
                raise
            return url

    # -- publishing ------------------------------------------------------------------------

    def publish(
        self,
        queue: str,
        envelope: Envelope,
        *,
        delay_s: float = 0.0,
        priority: int = DEFAULT_PRIORITY,
    ) -> None:
        entry = self._entry(queue, envelope, delay_s, priority)
        url = self._queue_url(queue, create=True)
        assert url is not None
        self._call(f"publish to {queue!r}", "send_message", QueueUrl=url, **entry.params)

    def publish_many(self, messages: Sequence[OutgoingMessage]) -> None:
        # Every message is checked before the first one is sent.
        by_queue: dict[str, list[_Entry]] = {}
        for m in messages:
            by_queue.setdefault(m.queue, []).append(self._entry(m.queue, m.envelope, m.delay_s, m.priority))
        for queue, entries in by_queue.items():
            url = self._queue_url(queue, create=True)
            assert url is not None
            self._send_batches(queue, url, entries)

    def _entry(self, queue: str, envelope: Envelope, delay_s: float, priority: int) -> _Entry:
        check_priority(priority)
        _warn_priority_once(priority)
        names = self._names(queue)
        attributes: dict[str, Any] = {}
        params: dict[str, Any] = {"MessageBody": envelope.to_bytes().decode()}
        if delay_s > 0:
            if names.fifo:
                msg = (
                    f"SQS FIFO queue {names.sqs!r} cannot delay a single message (countdown, eta or retry"
                    f" delay of {delay_s:g}s); send delayed tasks to a standard queue"
                )
                raise BrokerError(msg)
            params["DelaySeconds"] = min(math.ceil(delay_s), int(self.max_delay_s))
            if delay_s > self.max_delay_s:
                attributes[DUE_AT] = _number(time.time() + delay_s)
        if names.fifo:
            params["MessageGroupId"] = self.message_group_id or queue
            params["MessageDeduplicationId"] = _deduplication_id(envelope)
        if attributes:
            params["MessageAttributes"] = attributes
        return self._checked(_Entry(params))

    def _checked(self, entry: _Entry) -> _Entry:
        size = entry.size
        if size > self.max_message_bytes:
            raise MessageTooLarge(size, self.max_message_bytes, "SQS")
        return entry

    def _send_batches(self, queue: str, url: str, entries: Sequence[_Entry]) -> None:
        """Send ``entries`` in batches of 10 messages and at most ``max_message_bytes``."""
        for chunk in _chunks(entries, self.max_message_bytes):
            batch = [{"Id": str(i), **e.params} for i, e in enumerate(chunk)]
            reply = self._call(f"publish to {queue!r}", "send_message_batch", QueueUrl=url, Entries=batch)
            failed = reply.get("Failed") or []
            if failed:
                # SQS may fail single entries of a batch for its own reasons: retry those once.
                retry = [batch[int(f["Id"])] for f in failed if not f.get("SenderFault")]
                if retry and len(retry) == len(failed):
                    reply = self._call(f"publish to {queue!r}", "send_message_batch", QueueUrl=url, Entries=retry)
                    failed = reply.get("Failed") or []
            if failed:
                first = failed[0]
                msg = (
                    f"sqs broker {mask_url(self.url)!r}: {len(failed)} of {len(batch)} messages to {queue!r}"
                    f" were refused ({first.get('Code')}: {first.get('Message')}); the others were sent"
                )
                raise BrokerError(msg)

    # -- consuming -------------------------------------------------------------------------

    def consumer(self, queues: Sequence[str], *, prefetch: int) -> SQSConsumer:
        return SQSConsumer(self, queues, prefetch=prefetch)

    def _track(self, receipt: _Receipt) -> None:
        with self._lock:
            self._latest.pop(receipt.message_id, None)  # re-inserted last: the oldest go first
            self._latest[receipt.message_id] = receipt.handle
            while len(self._latest) > MAX_TRACKED_RECEIPTS:
                del self._latest[next(iter(self._latest))]

    def _is_current(self, receipt: _Receipt) -> bool:
        """False when this process received the message again since ``receipt``."""
        latest = self._latest.get(receipt.message_id)
        return latest is None or latest == receipt.handle

    def _forget(self, receipt: _Receipt) -> None:
        with self._lock:
            if self._latest.get(receipt.message_id) == receipt.handle:
                del self._latest[receipt.message_id]

    def _delete_now(self, receipts: Sequence[_Receipt], action: str) -> None:
        """Delete ``receipts`` (any queues) in batches of 10; a stale or gone one is no error."""
        by_url: dict[str, list[_Receipt]] = {}
        for r in receipts:
            by_url.setdefault(r.queue_url, []).append(r)
        for url, group in by_url.items():
            for start in range(0, len(group), BATCH_SIZE):
                chunk = group[start : start + BATCH_SIZE]
                entries = [{"Id": str(i), "ReceiptHandle": r.handle} for i, r in enumerate(chunk)]
                reply = self._call(action, "delete_message_batch", QueueUrl=url, Entries=entries)
                for failure in reply.get("Failed") or []:
                    if failure.get("Code") not in _STALE_CODES:
                        log.warning(
                            "SQS did not delete message %s (%s: %s); it will be delivered again",
                            chunk[int(failure["Id"])].message_id,
                            failure.get("Code"),
                            failure.get("Message"),
                        )
                for r in chunk:
                    self._forget(r)

    def _resend(self, url: str, receipts: Sequence[tuple[_Receipt, dict[str, Any]]], action: str) -> list[_Receipt]:
        """Send each receipt's body with the given extra parameters; return those sent."""
        sent: list[_Receipt] = []
        for start in range(0, len(receipts), BATCH_SIZE):
            chunk = receipts[start : start + BATCH_SIZE]
            entries = [{"Id": str(i), "MessageBody": r.body, **params} for i, (r, params) in enumerate(chunk)]
            reply = self._call(action, "send_message_batch", QueueUrl=url, Entries=entries)
            ok = {int(s["Id"]) for s in reply.get("Successful") or []}
            for failure in reply.get("Failed") or []:
                log.warning(
                    "could not %s for message %s (%s: %s); it will be delivered again after its lease",
                    action,
                    chunk[int(failure["Id"])][0].message_id,
                    failure.get("Code"),
                    failure.get("Message"),
                )
            sent.extend(r for i, (r, _) in enumerate(chunk) if i in ok)
        return sent

    def _bury(self, queue: str, items: Sequence[tuple[_Receipt, int, str]]) -> None:
        """Send copies of the messages to ``queue``'s dead-letter queue, then delete them."""
        if not items:
            return
        dead_url = self._dead_url(queue, create=True)
        assert dead_url is not None
        fifo = self._names(queue).fifo
        now = _number(time.time())
        batch: list[tuple[_Receipt, dict[str, Any]]] = []
        for receipt, deliveries, reason in items:
            attributes = {
                REASON: {"DataType": "String", "StringValue": reason[:4096] or "rejected"},
                DEAD_AT: now,
                DELIVERIES: {"DataType": "Number", "StringValue": str(deliveries)},
            }
            params: dict[str, Any] = {"MessageAttributes": attributes}
            if fifo:
                params["MessageGroupId"] = self.message_group_id or queue
                params["MessageDeduplicationId"] = uuid.uuid4().hex
            batch.append((receipt, params))
        sent = self._resend(dead_url, batch, f"dead-letter messages of {queue!r}")
        self._delete_now(sent, f"delete dead-lettered messages of {queue!r}")

    # -- inspection and administration ---------------------------------------------------

    def stats(self, queue: str) -> QueueStats:
        self._acks.flush()  # counts include this process's acks
        url = self._queue_url(queue, create=False)
        if url is None:
            return QueueStats(queue, ready=0, delayed=0, reserved=0, dead=0)
        counts = self._counts(url, queue)
        dead_url = self._dead_url(queue, create=False)
        dead = self._counts(dead_url, queue) if dead_url else {}
        return QueueStats(
            queue,
            ready=counts.get("ApproximateNumberOfMessages", 0),
            delayed=counts.get("ApproximateNumberOfMessagesDelayed", 0),
            reserved=counts.get("ApproximateNumberOfMessagesNotVisible", 0),
            dead=dead.get("ApproximateNumberOfMessages", 0) + dead.get("ApproximateNumberOfMessagesNotVisible", 0),
        )

    def _counts(self, url: str, queue: str) -> dict[str, int]:
        names = [
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesDelayed",
            "ApproximateNumberOfMessagesNotVisible",
        ]
        reply = self._call(f"read the counts of {queue!r}", "get_queue_attributes", QueueUrl=url, AttributeNames=names)
        return {k: int(v) for k, v in (reply.get("Attributes") or {}).items() if k in names}

    def purge(self, queue: str) -> int:
        self._acks.flush()
        url = self._queue_url(queue, create=False)
        if url is None:
            return 0
        counts = self._counts(url, queue)
        purged = counts.get("ApproximateNumberOfMessages", 0) + counts.get("ApproximateNumberOfMessagesDelayed", 0)
        in_flight = counts.get("ApproximateNumberOfMessagesNotVisible", 0)
        if purged + in_flight == 0:
            return 0  # nothing to do, and no need to start SQS's 60-s purge cooldown
        self._call(f"purge {queue!r}", "purge_queue", QueueUrl=url)
        if in_flight:
            log.warning(
                "purging %r also deleted its %d in-flight message(s): SQS purges whole queues", queue, in_flight
            )
        return purged

    def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        url = self._dead_url(queue, create=False)
        if url is None or limit <= 0:
            return []
        listed: list[_Receipt] = []
        letters: list[DeadLetter] = []
        try:
            for batch in self._drain(url, queue, LIST_HIDE_S, limit):
                for receipt, attributes in batch:
                    listed.append(receipt)
                    letters.append(self._dead_letter(queue, receipt, attributes))
        finally:
            # Listing must not hide the dead letters from the next command.
            self._change_visibility(listed, 0, f"release listed dead letters of {queue!r}")
        return letters[:limit]

    def _dead_letter(self, queue: str, receipt: _Receipt, system: Mapping[str, str]) -> DeadLetter:
        attributes = receipt.attributes
        reason = _attribute(attributes, REASON)
        deliveries = _attribute(attributes, DELIVERIES)
        dead_at = _attribute(attributes, DEAD_AT)
        if reason is None:  # moved by SQS's redrive policy, which records neither
            reason = (
                f"delivered {self.max_deliveries} times without an ack (max_deliveries={self.max_deliveries}):"
                " the task probably crashed its worker"
            )
        try:
            envelope = Envelope.from_bytes(receipt.body.encode())
        except MessageError:
            # Listing must work even for the garbage that got a message buried.
            envelope = Envelope(body=receipt.body.encode(), headers={}, content_encoding="binary")
        task = envelope.headers.get("task")
        return DeadLetter(
            id=receipt.message_id,
            task=str(task) if task is not None else None,
            queue=queue,
            deliveries=int(deliveries) if deliveries else self.max_deliveries,
            reason=reason,
            dead_at=float(dead_at) if dead_at else int(system.get("SentTimestamp", "0")) / 1000,
            envelope=envelope,
        )

    def requeue_dead(self, queue: str) -> int:
        dead_url = self._dead_url(queue, create=False)
        if dead_url is None:
            return 0
        url = self._queue_url(queue, create=True)
        assert url is not None
        fifo = self._names(queue).fifo
        moved = 0
        for batch in self._drain(dead_url, queue, LIST_HIDE_S, None):
            items: list[tuple[_Receipt, dict[str, Any]]] = []
            for receipt, _ in batch:
                params: dict[str, Any] = {}
                kept = {k: v for k, v in receipt.attributes.items() if k not in _OWN_ATTRIBUTES}
                if kept:
                    params["MessageAttributes"] = kept
                if fifo:
                    params["MessageGroupId"] = self.message_group_id or queue
                    params["MessageDeduplicationId"] = uuid.uuid4().hex
                items.append((receipt, params))
            sent = self._resend(url, items, f"requeue dead letters of {queue!r}")
            self._delete_now(sent, f"delete requeued dead letters of {queue!r}")
            moved += len(sent)
        return moved

    def purge_dead(self, queue: str) -> int:
        url = self._dead_url(queue, create=False)
        if url is None:
            return 0
        purged = 0
        for batch in self._drain(url, queue, LIST_HIDE_S, None):
            receipts = [receipt for receipt, _ in batch]
            self._delete_now(receipts, f"purge dead letters of {queue!r}")
            purged += len(receipts)
        return purged

    def _drain(
        self, url: str, queue: str, hide_s: int, limit: int | None
    ) -> Iterator[list[tuple[_Receipt, dict[str, str]]]]:
        """Receive every visible message of ``url`` in batches (hidden for ``hide_s``).

        A short poll that finds nothing is trusted when SQS also counts no visible message;
        otherwise one long poll of a second settles it, because a short poll may miss the
        messages of a small queue on AWS.
        """
        seen = 0
        long_polled = False
        while limit is None or seen < limit:
            wanted = BATCH_SIZE if limit is None else min(BATCH_SIZE, limit - seen)
            wait_s = 1 if long_polled else 0
            messages = self._receive_raw(url, queue, wanted, wait_s, hide_s)
            if not messages:
                if long_polled or self._counts(url, queue).get("ApproximateNumberOfMessages", 0) == 0:
                    return
                long_polled = True
                continue
            seen += len(messages)
            yield [(_receipt(url, m), m.get("Attributes") or {}) for m in messages]

    def _receive_raw(self, url: str, queue: str, max_messages: int, wait_s: int, visibility_s: int) -> list[Any]:
        reply = self._call(
            f"receive from {queue!r}",
            "receive_message",
            QueueUrl=url,
            MaxNumberOfMessages=max(1, min(BATCH_SIZE, max_messages)),
            WaitTimeSeconds=wait_s,
            VisibilityTimeout=visibility_s,
            MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
            MessageAttributeNames=["All"],
        )
        return list(reply.get("Messages") or [])

    def _change_visibility(self, receipts: Sequence[_Receipt], visibility_s: int, action: str) -> int:
        """Set the visibility timeout of ``receipts``; return how many SQS refused (lost leases)."""
        refused = 0
        by_url: dict[str, list[_Receipt]] = {}
        for r in receipts:
            by_url.setdefault(r.queue_url, []).append(r)
        for url, group in by_url.items():
            for start in range(0, len(group), BATCH_SIZE):
                chunk = group[start : start + BATCH_SIZE]
                entries = [
                    {"Id": str(i), "ReceiptHandle": r.handle, "VisibilityTimeout": visibility_s}
                    for i, r in enumerate(chunk)
                ]
                reply = self._call(action, "change_message_visibility_batch", QueueUrl=url, Entries=entries)
                refused += len(reply.get("Failed") or [])
        return refused

    def close(self) -> None:
        """Delete what was acked, stop the delete thread, close this process's client."""
        if self._pid != os.getpid():
            self._after_fork()
            return
        try:
            self._acks.close()
        finally:
            with self._lock:
                client, self._client_obj = self._client_obj, None
            if client is not None:
                client.close()


class SQSConsumer:
    """Receives from a fixed list of queues; see :class:`taskframe.broker.Consumer`.

    ``prefetch`` is not enforced here: the worker asks for what it has room for through
    ``max_messages``, and nothing is buffered in memory between calls.
    """

    def __init__(self, broker: SQSBroker, queues: Sequence[str], *, prefetch: int) -> None:
        check_queues(queues)
        self.broker = broker
        self.queues = list(queues)
        self.prefetch = prefetch
        self._closed = False
        self._next_long_poll = 0  # index of the queue the next multi-queue long poll waits on

    def __repr__(self) -> str:
        return f"<SQSConsumer of {self.queues} on {self.broker!r}>"

    def receive(self, timeout_s: float, *, max_messages: int = 1) -> list[Delivery]:
        check_receive(self, closed=self._closed, max_messages=max_messages)
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while True:
            deliveries = self._poll(max_messages, deadline)
            if deliveries:
                return deliveries
            if time.monotonic() >= deadline:
                return []

    def _poll(self, max_messages: int, deadline: float) -> list[Delivery]:
        """One round: a long poll when a whole second is left, else one short poll.

        A short poll is made even when the last one found nothing a moment ago: callers take
        an empty result for "nothing is ready" (a ``--burst`` worker then exits).
        """
        remaining_s = deadline - time.monotonic()
        wait_s = min(MAX_WAIT_S, int(remaining_s + WAIT_SLACK_S))
        if wait_s < 1:
            found, deliveries = self._poll_queues(max_messages)
        elif len(self.queues) == 1:
            found, deliveries = self._poll_queue(self.queues[0], max_messages, wait_s)
        else:
            found, deliveries = self._poll_queues(max_messages)
            if not found:
                # One long poll at a time: wait on each queue in turn, a second each.
                queue = self.queues[self._next_long_poll % len(self.queues)]
                self._next_long_poll += 1
                found, deliveries = self._poll_queue(queue, max_messages, 1)
        if not found and wait_s < 1:
            time.sleep(max(0.0, deadline - time.monotonic()))  # SQS cannot wait less than a second
        return deliveries

    def _poll_queues(self, max_messages: int) -> tuple[bool, list[Delivery]]:
        """Short-poll the queues in order until ``max_messages`` are found."""
        found = False
        deliveries: list[Delivery] = []
        for queue in self.queues:
            if len(deliveries) >= max_messages:
                break
            got, more = self._poll_queue(queue, max_messages - len(deliveries), 0)
            found = found or got
            deliveries.extend(more)
        return found, deliveries

    def _poll_queue(self, queue: str, max_messages: int, wait_s: int) -> tuple[bool, list[Delivery]]:
        """Receive once from ``queue``; return whether SQS gave anything, and the deliveries."""
        url = self.broker._queue_url(queue, create=True)
        assert url is not None
        messages = self.broker._receive_raw(url, queue, max_messages, wait_s, self.broker.visibility_s)
        return bool(messages), self._sort(queue, url, messages)

    def _sort(self, queue: str, url: str, messages: list[Any]) -> list[Delivery]:
        """Deliveries for the due messages; early ones hop, over-delivered or unreadable ones die."""
        broker = self.broker
        now = time.time()
        deliveries: list[Delivery] = []
        hops: list[tuple[_Receipt, dict[str, Any]]] = []
        dead: list[tuple[_Receipt, int, str]] = []
        for message in messages:
            receipt = _receipt(url, message)
            broker._track(receipt)
            system = message.get("Attributes") or {}
            count = int(system.get("ApproximateReceiveCount", "1")) + int(
                _attribute(receipt.attributes, DELIVERIES) or 0
            )
            due_at = _attribute(receipt.attributes, DUE_AT)
            if due_at is not None and float(due_at) - now > DUE_TOLERANCE_S:
                # Early: wait again, at most one hop's worth. Rounding to the nearest second
                # (not up) lands the last hop within the tolerance either side of due.
                delay_s = min(int(broker.max_delay_s), max(1, round(float(due_at) - now)))
                hops.append((receipt, {"DelaySeconds": delay_s, "MessageAttributes": dict(receipt.attributes)}))
                continue
            if count > broker.max_deliveries:
                reason = (
                    f"delivered {count - 1} times without an ack (max_deliveries={broker.max_deliveries}):"
                    " the task probably crashed its worker"
                )
                log.warning("message %s of queue %r dead-lettered: %s", receipt.message_id, queue, reason)
                dead.append((receipt, count - 1, reason))
                continue
            try:
                envelope = Envelope.from_bytes(receipt.body.encode())
            except MessageError as exc:
                log.warning("message %s of queue %r dead-lettered: %s", receipt.message_id, queue, exc)
                dead.append((receipt, count, f"unreadable frame: {exc}"))
                continue
            deliveries.append(Delivery(envelope, queue, count, receipt))
        if hops:
            sent = broker._resend(url, hops, f"delay messages of {queue!r} again")
            broker._delete_now(sent, f"delete early copies of delayed messages of {queue!r}")
        broker._bury(queue, dead)
        return deliveries

    def ack(self, delivery: Delivery) -> None:
        receipt: _Receipt = delivery.tag
        if not self.broker._is_current(receipt):
            log.debug("ack of a stale delivery of message %s ignored: it was received again", receipt.message_id)
            return
        if self.broker.ack_batch_s <= 0:
            self.broker._delete_now([receipt], f"ack a message of {delivery.queue!r}")
            return
        self.broker._acks.add(receipt)

    def nack(self, delivery: Delivery, *, requeue: bool, reason: str = "", delay_s: float = 0.0) -> None:
        broker = self.broker
        receipt: _Receipt = delivery.tag
        if not broker._is_current(receipt) or broker._acks.pending(receipt):
            log.debug("nack of a stale or acked delivery of message %s ignored", receipt.message_id)
            return
        if not requeue:
            broker._bury(delivery.queue, [(receipt, delivery.deliveries, reason or "rejected by the worker")])
            return
        if delay_s <= 0 or broker._names(delivery.queue).fifo:
            # FIFO: a re-sent copy would lose its place in the group, so it waits in place.
            visibility_s = min(math.ceil(max(delay_s, 0.0)), MAX_VISIBILITY_S)
            broker._change_visibility([receipt], visibility_s, f"requeue a message of {delivery.queue!r}")
            return
        # A re-sent copy counts as delayed (not reserved) and may wait longer than 12 hours;
        # it carries its delivery count, which a new SQS message would restart at 1.
        attributes = {k: v for k, v in receipt.attributes.items() if k not in _OWN_ATTRIBUTES}
        attributes[DELIVERIES] = {"DataType": "Number", "StringValue": str(delivery.deliveries)}
        if delay_s > broker.max_delay_s:
            attributes[DUE_AT] = _number(time.time() + delay_s)
        params = {"DelaySeconds": min(math.ceil(delay_s), int(broker.max_delay_s)), "MessageAttributes": attributes}
        sent = broker._resend(receipt.queue_url, [(receipt, params)], f"requeue a message of {delivery.queue!r}")
        broker._delete_now(sent, f"delete a requeued message of {delivery.queue!r}")

    def renew(self, deliveries: Sequence[Delivery]) -> None:
        broker = self.broker
        receipts = [d.tag for d in deliveries if broker._is_current(d.tag) and not broker._acks.pending(d.tag)]
        if not receipts:
            return
        lost = broker._change_visibility(receipts, broker.visibility_s, "renew leases")
        warn_lost_leases(log, lost, len(receipts), "deleted, or past SQS's 12-hour visibility limit")

    def close(self) -> None:
        # Nothing is buffered but the acks, which go now; unacked deliveries come back when
        # their visibility timeout ends.
        self._closed = True
        self.broker._acks.flush()


class _Deleter:
    """Batches the deletes of acked messages: up to 10 per request, each sent within ``ack_batch_s``.

    The ack that fills a batch of 10 sends it from its own thread, so a fast consumer is held
    back by its deletes rather than outrunning them (acks piling up past the visibility
    timeout would come back as duplicates). A smaller batch is sent by a thread of its own
    once its oldest ack is ``ack_batch_s`` old; that thread starts with the first ack and ends
    after a short idle spell. ``flush()`` sends everything pending and waits for batches
    other threads are sending.
    """

    def __init__(self, broker: SQSBroker) -> None:
        self._broker = weakref.ref(broker)  # the thread must not keep the broker alive
        self._pid = os.getpid()  # a forked child's copy never sends: its locks may be held by a dead thread
        self._pending: dict[str, _Receipt] = {}  # receipt handle -> receipt, oldest first
        self._oldest = 0.0  # monotonic time the oldest pending ack was made
        self._sending = 0  # batches on their way
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        _DELETERS.add(self)

    def add(self, receipt: _Receipt) -> None:
        with self._cond:
            if not self._pending:
                self._oldest = time.monotonic()
            self._pending[receipt.handle] = receipt
            full = self._take(BATCH_SIZE) if len(self._pending) >= BATCH_SIZE else []
            if not full and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._run, name="taskframe-sqs-deleter", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        if full:
            self._send(full, raise_errors=True)

    def pending(self, receipt: _Receipt) -> bool:
        return receipt.handle in self._pending

    def _take(self, count: int | None = None) -> list[_Receipt]:
        """Remove up to ``count`` pending receipts (oldest first); the caller holds the lock
        and must pass them to :meth:`_send`."""
        handles = list(self._pending)[:count]
        taken = [self._pending.pop(h) for h in handles]
        if taken:
            self._sending += 1
            self._oldest = time.monotonic()
        return taken

    def _send(self, receipts: list[_Receipt], *, raise_errors: bool) -> None:
        try:
            broker = self._broker()
            if broker is not None:
                broker._delete_now(receipts, "delete acked messages")
        except BrokerError as exc:
            # Deletes are idempotent: keep them all for the next attempt.
            with self._cond:
                self._pending = {**{r.handle: r for r in receipts}, **self._pending}
            if raise_errors:
                raise
            log.warning(
                "could not delete %d acked message(s): %s; retrying, else they run again after their lease",
                len(receipts),
                exc,
            )
        finally:
            with self._cond:
                self._sending -= 1
                self._cond.notify_all()

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self._cond:
                broker = self._broker()
                if broker is None:
                    return
                batch_s = broker.ack_batch_s
                del broker
                now = time.monotonic()
                if not self._pending:
                    if now - idle_since >= DELETER_LINGER_S:
                        self._thread = None
                        return
                    self._cond.wait(DELETER_LINGER_S)
                    continue
                due_in_s = self._oldest + batch_s - now
                if due_in_s > 0:
                    self._cond.wait(due_in_s)
                    continue
                batch = self._take()
            self._send(batch, raise_errors=False)
            idle_since = time.monotonic()

    def flush(self) -> None:
        """Send every pending delete now, from this thread, and wait for those on their way."""
        if self._pid != os.getpid():
            return
        with self._cond:
            batch = self._take()
        if batch:
            self._send(batch, raise_errors=True)
        with self._cond:
            self._cond.wait_for(lambda: self._sending == 0, timeout=CONNECT_TIMEOUT_S + MAX_WAIT_S)

    def close(self) -> None:
        self.flush()


@atexit.register
def _flush_at_exit() -> None:
    for deleter in list(_DELETERS):
        try:
            deleter.flush()
        except Exception as exc:  # at exit there is nobody left to raise to
            log.warning("could not delete acked SQS messages at exit: %s; they will run again", exc)


@dataclass(frozen=True)
class _Entry:
    """The parameters of one SendMessage(Batch) entry, checked for size."""

    params: dict[str, Any]

    @property
    def size(self) -> int:
        """Bytes SQS counts against its limit: the body plus each attribute's name, type and value."""
        size = len(self.params["MessageBody"].encode())
        for name, value in (self.params.get("MessageAttributes") or {}).items():
            size += (
                len(name.encode()) + len(value["DataType"].encode()) + len(str(value.get("StringValue", "")).encode())
            )
        return size


def _chunks(entries: Sequence[_Entry], max_bytes: int) -> Iterator[list[_Entry]]:
    """Batches of at most 10 entries whose sizes add up to at most ``max_bytes``."""
    chunk: list[_Entry] = []
    size = 0
    for entry in entries:
        if chunk and (len(chunk) == BATCH_SIZE or size + entry.size > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(entry)
        size += entry.size
    if chunk:
        yield chunk


def _receipt(url: str, message: Mapping[str, Any]) -> _Receipt:
    return _Receipt(
        queue_url=url,
        message_id=str(message["MessageId"]),
        handle=str(message["ReceiptHandle"]),
        body=str(message.get("Body", "")),
        attributes=dict(message.get("MessageAttributes") or {}),
    )


def _attribute(attributes: Mapping[str, Any], name: str) -> str | None:
    value = attributes.get(name)
    return None if value is None else str(value.get("StringValue"))


def _number(value: float) -> dict[str, str]:
    return {"DataType": "Number", "StringValue": f"{value:.6f}"}


def _deduplication_id(envelope: Envelope) -> str:
    """The task id (with the retry number for a retry), so a re-published retry is not dropped."""
    task_id = envelope.task_id or uuid.uuid4().hex
    retries = envelope.headers.get("retries") or 0
    candidate = f"{task_id}.r{retries}" if retries else task_id
    if _DEDUP_SAFE.match(candidate):
        return candidate
    return hashlib.sha256(candidate.encode()).hexdigest()


def _warn_priority_once(priority: int) -> None:
    global _priority_warned_pid
    if priority == DEFAULT_PRIORITY or _priority_warned_pid == os.getpid():
        return
    _priority_warned_pid = os.getpid()
    log.warning(
        "SQS has no message priority: priority %d is ignored (as every other priority will be;"
        " this is said once per process). Route urgent tasks to a queue of their own instead.",
        priority,
    )


def _parse_options(url: str, broker_options: Mapping[str, Any]) -> dict[str, Any]:
    """URL query parameters, then ``broker_options`` over them, checked and typed."""
    merged: dict[str, Any] = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    merged.update(broker_options)
    typed: dict[str, Any] = {}
    for key, value in merged.items():
        kind = _OPTIONS.get(key)
        if kind is None:
            close = difflib.get_close_matches(key, list(_OPTIONS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            msg = f"unknown sqs broker option {key!r} in {mask_url(url)!r}; {hint}known: {', '.join(sorted(_OPTIONS))}"
            raise ConfigurationError(msg)
        try:
            typed[key] = kind(value)
        except (TypeError, ValueError):
            msg = f"sqs broker option {key!r} must be a {kind.__name__}; got {value!r}"
            raise ConfigurationError(msg) from None
    return typed


def _bounded(name: str, value: float, low: float, high: float, url: str) -> float:
    if not low <= value <= high:
        msg = f"sqs broker option {name!r} must be from {low:g} to {high:g}; got {value!r} ({mask_url(url)})"
        raise ConfigurationError(msg)
    return float(value)


def _error_codes(exc: BaseException | None) -> set[str]:
    """Both codes of an SQS error: the JSON protocol's ``Code`` and the older ``QueryErrorCode``."""
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error") or {}
        return {str(error[key]) for key in ("Code", "QueryErrorCode") if error.get(key)}
    return set()


def _status(exc: botocore.exceptions.ClientError) -> int:
    return int((exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)


if TYPE_CHECKING:  # mypy proves the adapter still fits the core's protocols

    def _fits(url: str, conf: Settings) -> tuple[Broker, Consumer]:
        broker = SQSBroker(url, conf)
        return broker, broker.consumer(["q"], prefetch=1)
