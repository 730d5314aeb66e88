"""Running one message: decode, check, call the task, store the outcome, send what follows.

This is the part of the worker every pool shares (inline, in a thread, or in a prefork
child). It never talks to the consumer: it returns an :class:`Outcome` that the worker's
main loop turns into an ack or a nack, so all consumer calls stay on one thread.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import time
import traceback as traceback_module
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from . import states
from .backend import ChordPart, ChordUnsupported, chord_joiner
from .broker import Envelope
from .canvas import Signature
from .enqueue import resolve_enqueued
from .exceptions import (
    BackendError,
    BrokerError,
    ChordError,
    DeliveryLimitExceeded,
    MessageError,
    NotRegistered,
    Retry,
    TaskframeError,
)
from .message import Message, parse_isoformat
from .result import encode_exception
from .serialization import json_dumps, json_loads
from .settings import mask_url
from .task import Request, current_request

if TYPE_CHECKING:
    from .app import App
    from .task import Task

log = logging.getLogger("taskframe.worker")

#: A message that arrives this many seconds before its ETA is put back until it is due
#: (the broker normally holds it; Celery producers may send ETAs without a broker delay).
EARLY_ETA_TOLERANCE_S = 0.5

#: Wraps a task call with its (hard, soft) time limits in seconds; pools supply it.
LimitGuard = Callable[[float | None, float | None], contextlib.AbstractContextManager[None]]


@contextlib.contextmanager
def no_limits(hard_s: float | None, soft_s: float | None) -> Iterator[None]:
    yield


@dataclass(frozen=True)
class Outcome:
    """What the worker does with the delivery once the message was handled."""

    action: Literal["ack", "requeue", "dead"]
    task_id: str | None = None
    task_name: str | None = None
    state: str | None = None
    reason: str = ""
    delay_s: float = 0.0


def utcnow_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def store_state(
    app: App,
    task_id: str,
    state: str,
    result: Any,
    *,
    request: Request | None = None,
    traceback: str | None = None,
    children: list[str] | None = None,
) -> None:
    """Write a task's record in Celery's layout (plus extended fields when enabled)."""
    record: dict[str, Any] = {
        "task_id": task_id,
        "status": state,
        "result": result,
        "traceback": traceback,
        "children": [[[child, None], None] for child in children or []],  # Celery's result tuples
        "date_done": utcnow_iso() if state in states.READY_STATES else None,
    }
    if app.conf.result_extended and request is not None:
        record.update(
            name=request.task,
            args=request.args,
            kwargs=request.kwargs,
            worker=request.hostname,
            retries=request.retries,
            queue=request.delivery_info.get("queue"),
        )
    app.backend.store(task_id, record, ttl_s=app.conf.result_expires)


def discard(app: App, task_id: str, task_name: str | None, reason: str) -> Outcome:
    """Skip a revoked or expired task: record it REVOKED with ``reason``, and ack it."""
    log.info("Discarding %s task %s[%s]", reason, task_name, task_id)
    error = {
        "exc_type": "TaskRevokedError",
        "exc_module": "taskframe.exceptions",
        "exc_message": [reason],
    }
    store_state(app, task_id, states.REVOKED, error)
    return Outcome("ack", task_id, task_name, states.REVOKED, reason)


class Executor:
    """Handles messages for one process; create one per process (prefork child, or worker)."""

    def __init__(self, app: App, hostname: str | None = None, limit_guard: LimitGuard = no_limits) -> None:
        self.app = app
        self.hostname = hostname or f"{os.getpid()}@{socket.gethostname()}"
        self.limit_guard = limit_guard

    #: Seconds before a message whose result could not be stored is offered again.
    STORE_RETRY_DELAY_S = 1.0

    def execute(self, envelope: Envelope, queue: str, deliveries: int = 1) -> Outcome:
        """Handle one message; never raises for a problem of the message or the task."""
        try:
            return self._execute(envelope, queue, deliveries)
        except (BackendError, BrokerError) as exc:
            # The backend or broker failed around the task (storing its result, sending what
            # follows): hand the message back so it runs again, rather than ack a result that
            # nobody can read. Each such hand-back counts toward max_deliveries.
            task_id = envelope.task_id
            log.error(
                "Task %s[%s]: %s; the message goes back to the queue",
                envelope.headers.get("task"),
                task_id,
                mask_url(str(exc)),
            )
            reason = f"{type(exc).__name__}: {mask_url(str(exc))}"
            return Outcome("requeue", task_id, None, None, reason, delay_s=self.STORE_RETRY_DELAY_S)

    def fail_dead_lettered(self, envelope: Envelope, queue: str, reason: str) -> None:
        """The broker dead-lettered this message after ``max_deliveries``: fail its task as if
        it had raised :class:`DeliveryLimitExceeded` (result, errbacks, chord), so nobody waits
        for a task that will not run. A result stored already (the task ran; only its ack was
        lost) is left as it is. Raises BackendError or BrokerError when those fail."""
        try:
            message = Message.from_envelope(envelope, self.app.conf.accept_content)
        except MessageError as exc:
            log.debug("dead letter %s not failed: %s", envelope.task_id, exc)
            return
        task = self._find_task(message)
        if task is None:
            return
        if not (message.headers.ignore_result or task.options.ignore_result):
            record = self.app.backend.fetch(message.id)
            if record is not None and record.get("status") in states.READY_STATES:
                return
        # A task that ignores its result has none to tell whether it ran: its errbacks and
        # chord are told it failed, since as far as anyone can see it never finished.
        request = self._request(message, queue, self.app.conf.max_deliveries)
        self._on_failure(task, message, request, DeliveryLimitExceeded(reason), None)

    def _execute(self, envelope: Envelope, queue: str, deliveries: int) -> Outcome:
        try:
            message = Message.from_envelope(envelope, self.app.conf.accept_content)
        except MessageError as exc:
            return self._reject_unreadable(envelope, exc)
        task = self._find_task(message)
        if task is None:
            reason = self._unknown_task_reason(message.task)
            log.error(
                "Received unregistered task %s[%s]: %s; moved to dead letters",
                message.task,
                message.id,
                reason,
            )
            self._store_failure(message.id, NotRegistered(reason), None)
            return Outcome("dead", message.id, message.task, states.FAILURE, reason)
        skip = self._skip_reason(message)
        if skip is not None:
            return skip
        early_s = self._seconds_early(message)
        if early_s > EARLY_ETA_TOLERANCE_S:
            self.app.broker.publish(queue, envelope, delay_s=early_s, priority=message.priority)
            return Outcome(
                "ack",
                message.id,
                message.task,
                states.PENDING,
                "not due yet: sent back to the broker",
            )
        return self._run(task, message, queue, deliveries)

    # -- checks before running ---------------------------------------------------------------

    def _reject_unreadable(self, envelope: Envelope, exc: MessageError) -> Outcome:
        task_id = envelope.task_id
        log.error("Received unreadable message %s: %s; moved to dead letters", task_id or "(no id)", exc)
        if task_id:
            self._store_failure(task_id, exc, None)
        return Outcome("dead", task_id, envelope.headers.get("task"), states.FAILURE, str(exc))

    def _find_task(self, message: Message) -> Task[Any, Any] | None:
        task = self.app.tasks.get(message.task)
        if task is None:
            task = resolve_enqueued(self.app, message.task)
        return task

    def _unknown_task_reason(self, name: str) -> str:
        allow = self.app.conf.enqueue_allow
        return (
            f"unknown task {name!r}: no @app.task registered it in this worker, and its path does not "
            f"match the enqueue_allow setting {allow!r} (import the module that defines it with -A or "
            "the imports setting, or add a glob pattern to enqueue_allow to run plain functions by path)"
        )

    def _skip_reason(self, message: Message) -> Outcome | None:
        # Revoked ids are checked by the worker's main loop, once per received batch (see
        # taskframe.revocations), before a message reaches a pool; expiry needs no read.
        expires = message.headers.expires
        if expires and parse_isoformat(expires) < _now():
            return discard(self.app, message.id, message.task, f"expired at {expires}")
        return None

    def _seconds_early(self, message: Message) -> float:
        if not message.headers.eta:
            return 0.0
        return (parse_isoformat(message.headers.eta) - _now()).total_seconds()

    # -- running -----------------------------------------------------------------------------

    def _request(self, message: Message, queue: str, deliveries: int) -> Request:
        h = message.headers
        return Request(
            id=h.id,
            task=h.task,
            args=message.args,
            kwargs=message.kwargs,
            retries=h.retries,
            root_id=h.root_id,
            parent_id=h.parent_id,
            group=h.group,
            eta=h.eta,
            expires=h.expires,
            delivery_info={"queue": queue, "deliveries": deliveries, "priority": message.priority},
            hostname=self.hostname,
            timelimit=h.timelimit,
            headers=h.model_dump(),
            embed=message.embed.model_dump(),
        )

    def _run(self, task: Task[Any, Any], message: Message, queue: str, deliveries: int) -> Outcome:
        request = self._request(message, queue, deliveries)
        store_results = not (message.headers.ignore_result or task.options.ignore_result)
        track = task.options.track_started
        if track if track is not None else self.app.conf.task_track_started:
            store_state(
                self.app,
                message.id,
                states.STARTED,
                {"pid": os.getpid(), "hostname": self.hostname},
                request=request,
            )
        hard_s, soft_s = message.headers.timelimit
        hard_s = hard_s or self.app.conf.task_time_limit
        soft_s = soft_s or self.app.conf.task_soft_time_limit
        token = current_request.set(request)
        started = time.perf_counter()
        try:
            with self.limit_guard(hard_s, soft_s):
                value = task.run_with(message.args, message.kwargs)
        except Retry as retry:
            return self._on_retry(task, message, request, retry, store_results)
        except Exception as exc:
            retry_outcome = self._autoretry(task, message, request, exc, store_results)
            if retry_outcome is not None:
                return retry_outcome
            return self._on_failure(task, message, request, exc, time.perf_counter() - started)
        finally:
            current_request.reset(token)
        runtime_s = time.perf_counter() - started
        try:
            value = jsonable(value)
        except TypeError as exc:
            # A result the backend cannot hold would leave the task PENDING for ever.
            msg = f"the result of {message.task} cannot be stored as JSON: {exc}; return plain data"
            return self._on_failure(task, message, request, TypeError(msg), runtime_s)
        if store_results:
            store_state(self.app, message.id, states.SUCCESS, value, request=request, children=request.children)
        log.info("Task %s[%s] succeeded in %.4fs: %s", message.task, message.id, runtime_s, _short(value))
        self._after_success(message, value)
        return Outcome("ack", message.id, message.task, states.SUCCESS)

    def _autoretry(
        self,
        task: Task[Any, Any],
        message: Message,
        request: Request,
        exc: Exception,
        store_results: bool,
    ) -> Outcome | None:
        if not (task.options.autoretry_for and isinstance(exc, task.options.autoretry_for)):
            return None
        token = current_request.set(request)
        try:
            task.retry(exc=exc)
        except Retry as retry:
            return self._on_retry(task, message, request, retry, store_results)
        except Exception:  # retries exhausted: task.retry re-raised the original exception
            return None
        finally:
            current_request.reset(token)
        return None

    def _on_retry(
        self,
        task: Task[Any, Any],
        message: Message,
        request: Request,
        retry: Retry,
        store_results: bool,
    ) -> Outcome:
        reason = retry.exc if retry.exc is not None else retry
        if store_results:
            store_state(
                self.app,
                message.id,
                states.RETRY,
                encode_exception(reason),
                request=request,
                traceback=_format_traceback(retry.exc),
            )
        log.info("Task %s[%s] retry: %s: %r", message.task, message.id, retry, retry.exc)
        return Outcome("ack", message.id, message.task, states.RETRY)

    def _on_failure(
        self,
        task: Task[Any, Any],
        message: Message,
        request: Request,
        exc: Exception,
        runtime_s: float | None,
    ) -> Outcome:
        """Store FAILURE, send the errbacks, count the chord member; ``runtime_s`` None: the
        task did not run (dead-lettered), no traceback and no log line of its own."""
        text = _format_traceback(exc) if runtime_s is not None else None
        if not (message.headers.ignore_result or task.options.ignore_result):
            store_state(
                self.app,
                message.id,
                states.FAILURE,
                encode_exception(exc),
                request=request,
                traceback=text,
            )
        if runtime_s is not None:
            log.error(
                "Task %s[%s] raised unexpected: %r (after %.4fs)",
                message.task,
                message.id,
                exc,
                runtime_s,
            )
        for errback in message.embed.errbacks or []:
            self._send_follow_up(Signature.from_dict(errback, self.app), message, (message.id,))
        if message.embed.chord:
            self._count_chord_member(message, states.FAILURE, encode_exception(exc))
        return Outcome("ack", message.id, message.task, states.FAILURE, f"{type(exc).__name__}: {exc}")

    def _store_failure(self, task_id: str, exc: BaseException, traceback: str | None) -> None:
        try:
            store_state(self.app, task_id, states.FAILURE, encode_exception(exc), traceback=traceback)
        except TaskframeError as store_exc:  # the message still goes to dead letters
            log.error("could not store the failure of %s: %s", task_id, mask_url(str(store_exc)))

    # -- what follows a success --------------------------------------------------------------

    def _after_success(self, message: Message, value: Any) -> None:
        for callback in message.embed.callbacks or []:
            with self._follow_up_guard(message, "a link"):
                self._send_follow_up(Signature.from_dict(callback, self.app), message, (value,))
        if message.embed.chain:
            *rest, next_step = message.embed.chain
            options = {"chain": rest} if rest else {}
            with self._follow_up_guard(message, "the next step of its chain"):
                self._send_follow_up(Signature.from_dict(next_step, self.app), message, (value,), **options)
        if message.embed.chord:
            with self._follow_up_guard(message, "its chord's bookkeeping"):
                self._count_chord_member(message, states.SUCCESS, value)

    @contextlib.contextmanager
    def _follow_up_guard(self, message: Message, what: str) -> Iterator[None]:
        """Let broker and backend failures through (the message goes back and the task runs
        again, so what follows is not lost); log anything else once and carry on: a follow-up
        that cannot even be built (a malformed signature in ``embed``) would fail the same way on
        every run, and running a finished task again cannot mend it."""
        try:
            yield
        except (BackendError, BrokerError):
            raise
        except Exception as exc:
            log.error(
                "Task %s[%s] succeeded, but %s could not be sent: %s: %s",
                message.task,
                message.id,
                what,
                type(exc).__name__,
                exc,
            )

    def _send_follow_up(self, sig: Signature, parent: Message, args: tuple[Any, ...], **options: Any) -> None:
        sig.apply_async(args, parent_id=parent.id, root_id=parent.headers.root_id or parent.id, **options)

    def _count_chord_member(self, message: Message, state: str, result: Any) -> None:
        """Report one finished header task to the backend; the report that completes the header
        sends the body the header's results, in order (or fails it with ChordError).

        ``embed.chord`` is the body's signature, as Celery writes it (with ``chord_size`` when
        taskframe sent the chord), and the ``group`` and ``group_index`` headers place the task
        in its header. Messages of earlier taskframe versions carry ``{group_id, chord_size, body}``.
        """
        spec = message.embed.chord or {}
        if "task" not in spec and isinstance(spec.get("body"), dict):
            group_id, size, body_spec = spec.get("group_id"), spec.get("chord_size"), spec["body"]
        else:
            group_id, size, body_spec = message.headers.group, spec.get("chord_size"), spec
        if not group_id:
            log.error("chord header task %s[%s] names no group: its chord cannot be joined", message.task, message.id)
            return
        part = ChordPart(
            str(group_id),
            message.headers.group_index,
            message.id,
            state,
            result,
            size if type(size) is int else None,  # Celery's chords leave it out (None)
        )
        joiner = chord_joiner(self.app.backend)
        try:
            join = joiner.chord_part_return(part, ttl_s=self.app.conf.result_expires)
        except ChordUnsupported as exc:
            self._refuse_foreign_chord(message, body_spec, str(exc))
            return
        if join is None:
            return
        try:
            body = Signature.from_dict(body_spec, self.app)
            failed = [(task_id, error) for task_id, member_state, error in join.parts if member_state != states.SUCCESS]
            if failed:
                self._fail_chord(body, message, *failed[0])
            else:
                self._send_follow_up(body, message, ([value for _, _, value in join.parts],))
        except BaseException:
            # Let a redelivered header task (this one, handed back) send the body.
            with contextlib.suppress(TaskframeError):
                joiner.chord_release(join)
            raise
        joiner.chord_done(join)

    def _refuse_foreign_chord(self, message: Message, spec: dict[str, Any], reason: str) -> None:
        """A chord this backend cannot join (sent by Celery, which keeps the size in the Redis
        backend only): fail its body clearly rather than leave it PENDING for ever."""
        log.error("chord body %s will not run: %s", spec.get("task"), reason)
        body_id = (spec.get("options") or {}).get("task_id")
        if body_id:
            store_state(self.app, str(body_id), states.FAILURE, encode_exception(ChordError(reason)))

    def _fail_chord(self, body: Signature, message: Message, member_id: str, error: Any) -> None:
        error = error if isinstance(error, dict) else {}
        detail = f"{error.get('exc_type', 'Error')}({', '.join(map(repr, error.get('exc_message') or []))})"
        reason = f"Dependency {member_id} raised {detail}"
        body_id = str(body.options.get("task_id") or "")
        log.error("chord body %s[%s] will not run: %s", body.task, body_id, reason)
        if body_id:
            store_state(
                self.app,
                body_id,
                states.FAILURE,
                encode_exception(ChordError(reason)),
            )
        for errback in body.options.get("link_error") or []:
            sig = errback if isinstance(errback, Signature) else Signature.from_dict(errback, self.app)
            self._send_follow_up(sig, message, (body_id,))


def jsonable(value: Any) -> Any:
    """The JSON form of a result, with the conversions the JSON serializer makes for
    arguments (datetimes, UUIDs, Decimals, bytes, tuples); TypeError for anything else."""
    if value is None or type(value) in (int, str, float, bool):
        return value  # the common case costs no round trip
    return json_loads(json_dumps(value))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_traceback(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    return "".join(traceback_module.format_exception(type(exc), exc, exc.__traceback__))
