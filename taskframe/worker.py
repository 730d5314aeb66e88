"""The worker: one consumer feeding a pool.

The main thread owns the consumer: it receives only as many messages as the pool has free
slots for (plus ``worker_prefetch``), hands them to the pool, and acks or nacks what the pool
finishes. A keeper thread renews the leases of every held message and writes the heartbeat
that ``taskframe status`` reads.

Shutdown order: stop receiving; hand back (nack) messages not yet started; let running
tasks finish for up to ``shutdown_timeout_s`` and ack them; then (or at a second SIGTERM)
stop the pool and hand back what still runs; stop the keeper last, so leases of running
tasks keep being renewed until the very end; close the consumer.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from . import states
from .broker import AcksWithReceive, Buried, Consumer, Delivery, ReleasesUnstarted, ReportsBuried, ack_all
from .exceptions import BackendError, BrokerConnectionError, BrokerError, TaskframeError
from .execution import Executor, Outcome, discard, store_state
from .pools import Job, SoloPool, WorkerTerminate, create_pool
from .ratelimit import TokenBucket, parse_rate
from .revocations import RevokedIds
from .settings import mask_url

if TYPE_CHECKING:
    from types import FrameType

    from .app import App

log = logging.getLogger("taskframe.worker")

#: How long one receive may block when nothing runs: bounds how late a stop is noticed.
IDLE_RECEIVE_S = 1.0
#: How long one receive may block while tasks run, so finished ones are acked promptly.
BUSY_RECEIVE_S = 0.05
#: Pause between attempts to reach the broker, at start and after a lost connection.
RECONNECT_DELAY_S = 1.0
#: Longest pause between reconnection attempts (the delay doubles up to this).
MAX_RECONNECT_DELAY_S = 10.0


class Worker:
    """Consume ``queues`` and run their tasks. ``run()`` returns the process exit code."""

    def __init__(
        self,
        app: App,
        queues: Sequence[str] | None = None,
        *,
        concurrency: int | None = None,
        pool: str = "prefork",
        prefetch: int | None = None,
        max_tasks_per_child: int | None = None,
        shutdown_timeout_s: float = 30.0,
        burst: bool = False,
        install_signals: bool = True,
    ) -> None:
        self.app = app
        self.queues = list(queues or [app.conf.default_queue])
        self.concurrency = 1 if pool == "solo" else (concurrency or app.conf.worker_concurrency or os.cpu_count() or 1)
        self.prefetch = app.conf.worker_prefetch if prefetch is None else prefetch
        self.shutdown_timeout_s = shutdown_timeout_s
        self.burst = burst
        self.install_signals = install_signals
        self.name = f"{os.getpid()}@{socket.gethostname()}"
        self.pool_kind = pool
        self.pool = create_pool(pool, app, self.name, self.concurrency, max_tasks_per_child)
        self.tasks_done = 0
        self.stop_reason = ""
        self._stop = threading.Event()
        self._cold = threading.Event()
        self._consumer: Consumer | None = None
        self._pending: collections.deque[Job] = collections.deque()
        # Acks of tasks that finished at the top of a pass, sent with the receive that follows
        # (AcksWithReceive: one round trip for both); flushed before anything that takes time.
        self._acks_due: list[Delivery] = []
        self._defer_acks = False
        self._acks_ride = False  # the consumer is an AcksWithReceive (known once per consumer)
        self._reports_buried = False  # the consumer is a ReportsBuried (known once per consumer)
        self._executor = Executor(app, self.name)  # for what the main loop fails itself
        self._reconnected_at = -RECONNECT_DELAY_S  # time.monotonic() of the last reconnect
        self._held: dict[int, Job] = {}  # id(delivery) -> job, every message whose lease we keep
        self._held_lock = threading.Lock()
        self._to_terminate: set[str] = set()
        self._revoked = RevokedIds(app)
        self._buckets: dict[str, TokenBucket] = {}
        self._keeper: threading.Thread | None = None
        self._keeper_stop = threading.Event()
        self.ready = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        if self.install_signals:
            self._install_signal_handlers()
        try:
            self._adopt(self._connect())
        except BrokerError as exc:
            log.error("%s", mask_url(str(exc)))
            return 1
        self.pool.start()
        self._keeper = threading.Thread(target=self._keep, name="taskframe-keeper", daemon=True)
        self._keeper.start()
        log.info(
            "worker %s ready: queues %s, pool %s (concurrency %d), broker %s",
            self.name,
            ",".join(self.queues),
            self.pool_kind,
            self.concurrency,
            mask_url(self.app.conf.broker_url),
        )
        self.ready.set()
        try:
            while not self._stop.is_set():
                self._run_once()
        finally:
            self._shutdown()
        log.info("worker %s stopped: %s", self.name, self.stop_reason or "done")
        return 0

    def stop(self, reason: str = "stop requested", *, cold: bool = False) -> None:
        """Ask the worker to stop (warm: running tasks finish; cold: they are handed back)."""
        if not self._stop.is_set():
            self.stop_reason = reason
        self._stop.set()
        if cold:
            self._cold.set()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self._stop.is_set():
            log.warning(
                "%s received: warm shutdown: no new tasks; running ones finish (up to %ss); "
                "send it again for a cold shutdown",
                name,
                self.shutdown_timeout_s,
            )
            self.stop(f"{name} (warm shutdown)")
            return
        log.warning("%s received again: cold shutdown: running tasks go back to their queues", name)
        self._cold.set()
        if isinstance(self.pool, SoloPool) and self.pool.current is not None:
            raise WorkerTerminate

    def _connect(self) -> Consumer:
        """Open the consumer, retrying for ``broker_connect_timeout`` seconds, a line a try."""
        deadline = time.monotonic() + self.app.conf.broker_connect_timeout
        attempt = 0
        delay_s = RECONNECT_DELAY_S
        while True:
            attempt += 1
            try:
                broker = self.app.broker
                consumer = broker.consumer(self.queues, prefetch=self.concurrency + self.prefetch)
                broker.stats(self.queues[0])  # a cheap round trip: proves the broker answers
                return consumer
            except BrokerConnectionError as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    msg = (
                        f"cannot reach the broker {mask_url(self.app.conf.broker_url)} after {attempt} attempt(s) "
                        f"over {self.app.conf.broker_connect_timeout:g}s: {exc}; is it running?"
                    )
                    raise BrokerConnectionError(msg) from None
                log.warning(
                    "cannot reach the broker (attempt %d): %s; retrying in %.1fs",
                    attempt,
                    mask_url(str(exc)),
                    min(delay_s, remaining),
                )
                time.sleep(min(delay_s, remaining))
                delay_s = min(delay_s * 2, MAX_RECONNECT_DELAY_S)

    def _adopt(self, consumer: Consumer) -> None:
        self._consumer = consumer
        # Checked once per consumer: isinstance of a runtime Protocol is slow.
        self._acks_ride = isinstance(consumer, AcksWithReceive)
        self._reports_buried = isinstance(consumer, ReportsBuried)

    # -- the loop ----------------------------------------------------------------------------

    def _run_once(self) -> None:
        self._defer_acks = self._acks_ride
        try:
            self._finish(self.pool.collect(0))
            self._finish(self.pool.enforce_limits())
        finally:
            self._defer_acks = False
        if self._pending or self._to_terminate:
            self._flush_acks()  # a solo pool runs tasks right here: their acks must not wait
        self._terminate_revoked()
        self._dispatch_pending()
        room = self.concurrency + self.prefetch - len(self._held)
        if room <= 0:
            self._flush_acks()
            self._finish(self.pool.collect(BUSY_RECEIVE_S))
            return
        # A burst worker only needs to learn that nothing is ready; waiting longer would
        # only delay its exit.
        short = bool(self._held) or self.burst
        deliveries = self._receive(BUSY_RECEIVE_S if short else IDLE_RECEIVE_S, room)
        if self._reports_buried:
            self._fail_buried(cast(ReportsBuried, self._consumer).take_buried())
        if deliveries is None:
            return
        if not deliveries and self.burst and not self._held:
            self.stop("burst: no ready message left in " + ",".join(self.queues))
            return
        if deliveries and not self._refresh_revoked(deliveries):
            return
        for delivery in deliveries:
            self._accept(delivery)
        self._dispatch_pending()

    def _refresh_revoked(self, deliveries: list[Delivery]) -> bool:
        """Learn of revokes made up to now (after these were received): one backend read per
        batch. If the backend cannot answer, hand the batch back rather than run revoked
        tasks (the same as when a result cannot be stored)."""
        try:
            self._revoked.refresh()
            return True
        except TaskframeError as exc:
            log.error(
                "could not read the revoked task ids (%s); %d message(s) go back to the queue",
                mask_url(str(exc)),
                len(deliveries),
            )
            reason = f"{type(exc).__name__}: {mask_url(str(exc))}"
            for delivery in deliveries:
                self._nack(delivery, requeue=True, reason=reason, delay_s=Executor.STORE_RETRY_DELAY_S)
            return False

    def _receive(self, timeout_s: float, max_messages: int) -> list[Delivery] | None:
        consumer = self._consumer
        assert consumer is not None
        acks, self._acks_due = self._acks_due, []
        try:
            if acks and self._acks_ride:
                riding = cast(AcksWithReceive, consumer)  # checked once per consumer: isinstance is slow
                return riding.ack_and_receive(acks, timeout_s, max_messages=max_messages)
            return consumer.receive(timeout_s, max_messages=max_messages)
        except BrokerConnectionError as exc:
            log.warning("lost the broker connection (%s); reconnecting", mask_url(str(exc)))
            # What this consumer buried before the loss: its replacement cannot report it.
            buried = cast(ReportsBuried, consumer).take_buried() if self._reports_buried else []
            self._reconnect()
            self._ack(acks)  # through the new consumer (acks are idempotent)
            self._fail_buried(buried)
            return None
        except BrokerError:
            if not acks:
                raise
            self._ack(acks)  # settles them the careful way (one by one, logged if refused)
            return None

    def _fail_buried(self, buried_messages: list[Buried]) -> None:
        """Fail the tasks a consumer dead-lettered after ``max_deliveries`` (each crashed its
        worker, or its leases kept running out), so ``get()`` does not wait for a task that
        will not run (``Executor.fail_dead_lettered``)."""
        for buried in buried_messages:
            try:
                self._executor.fail_dead_lettered(buried.envelope, buried.queue, buried.reason)
            except TaskframeError as exc:
                log.warning(
                    "could not store the failure of dead-lettered task %s: %s",
                    buried.envelope.task_id,
                    mask_url(str(exc)),
                )

    def _release(self, deliveries: list[Delivery]) -> None:
        """Hand back deliveries whose task never started; where the consumer can, without
        counting them toward ``max_deliveries`` (``ReleasesUnstarted``)."""
        if not deliveries:
            return
        consumer: object = self._consumer  # an optional protocol besides Consumer
        if isinstance(consumer, ReleasesUnstarted):
            try:
                consumer.release(deliveries)
                return
            except BrokerError as exc:
                log.warning("could not release %d unstarted message(s): %s", len(deliveries), mask_url(str(exc)))
        for delivery in deliveries:
            self._nack(delivery, requeue=True, reason="worker shutdown")

    def _flush_acks(self) -> None:
        acks, self._acks_due = self._acks_due, []
        self._ack(acks)

    def _reconnect(self) -> None:
        # Messages held now keep their leases only if the new consumer can renew them; if
        # not, they come back after visibility_timeout and run again (at-least-once).
        with contextlib.suppress(Exception):
            assert self._consumer is not None
            self._consumer.close()
        # A connection lost again right after a reconnect (a server that answers a ping but
        # refuses the work, e.g. a demoted primary that Sentinel still names): pause first,
        # instead of spinning and logging as fast as the server says no.
        since_s = time.monotonic() - self._reconnected_at
        if since_s < RECONNECT_DELAY_S:
            self._stop.wait(RECONNECT_DELAY_S - since_s)
        delay_s = RECONNECT_DELAY_S
        while not self._stop.is_set():
            try:
                self._adopt(self.app.broker.consumer(self.queues, prefetch=self.concurrency + self.prefetch))
                self._reconnected_at = time.monotonic()
                log.info("reconnected to the broker")
                return
            except BrokerConnectionError as exc:
                log.warning("cannot reach the broker: %s; retrying in %.1fs", mask_url(str(exc)), delay_s)
                self._stop.wait(delay_s)
                delay_s = min(delay_s * 2, MAX_RECONNECT_DELAY_S)

    def _accept(self, delivery: Delivery) -> None:
        envelope = delivery.envelope
        name = envelope.headers.get("task")
        job = Job(delivery, envelope.task_id, str(name) if name else None)
        if job.task_id in self._revoked:
            self._discard_revoked(job)
            return
        task = self.app.tasks.get(job.task_name or "")
        if task is not None:
            limits = envelope.headers.get("timelimit", [None, None])
            hard_s = limits[0] if isinstance(limits, list | tuple) and limits else None
            job.hard_limit_s = hard_s or task.options.time_limit or self.app.conf.task_time_limit
            track = task.options.track_started
            if (track if track is not None else self.app.conf.task_track_started) and job.task_id:
                self._store_quietly(job.task_id, states.RECEIVED, {"hostname": self.name})
            acks_late = task.options.acks_late
            if acks_late is None:
                acks_late = self.app.conf.task_acks_late
            if not acks_late:
                # At-most-once, by the task's choice: a crash from here on loses the message.
                self._ack([delivery])
                job.acked_early = True
        log.debug("Task %s received", job.label)
        with self._held_lock:
            self._held[id(delivery)] = job
        self._pending.append(job)

    def _discard_revoked(self, job: Job) -> None:
        assert job.task_id is not None
        try:
            outcome = discard(self.app, job.task_id, job.task_name, "revoked")
        except BackendError as exc:
            log.error("Task %s: %s; the message goes back to the queue", job.label, mask_url(str(exc)))
            reason = f"{type(exc).__name__}: {mask_url(str(exc))}"
            outcome = Outcome("requeue", job.task_id, job.task_name, None, reason, Executor.STORE_RETRY_DELAY_S)
        self._finish([(job, outcome)])

    def _store_quietly(self, task_id: str, state: str, result: Any) -> None:
        # A state the main loop records for the user's benefit; losing it to a backend hiccup
        # must not stop the worker.
        try:
            store_state(self.app, task_id, state, result)
        except TaskframeError as exc:
            log.warning("could not store %s for %s: %s", state, task_id, mask_url(str(exc)))

    def _dispatch_pending(self) -> None:
        # The stop check matters for the solo pool: a task runs inside this loop, and a
        # SIGTERM during it must not start the next one.
        held_back: list[Job] = []
        while self._pending and self.pool.free_slots() > 0 and not self._stop.is_set():
            job = self._pending.popleft()
            if job.task_id in self._revoked:  # revoked while it waited here
                self._discard_revoked(job)
                continue
            bucket = self._bucket_for(job)
            if bucket is not None and not bucket.try_take():
                held_back.append(job)  # over its rate: wait here, let other tasks pass
                continue
            self.pool.submit(job)
        self._pending.extendleft(reversed(held_back))

    def _bucket_for(self, job: Job) -> TokenBucket | None:
        task = self.app.tasks.get(job.task_name or "")
        if task is None or not task.options.rate_limit:
            return None
        bucket = self._buckets.get(task.name)
        if bucket is None:
            bucket = self._buckets[task.name] = TokenBucket(parse_rate(task.options.rate_limit))
        return bucket

    def _finish(self, finished: list[tuple[Job, Outcome]]) -> None:
        # The acks of one pass go out together: one round trip for the batch where the
        # consumer can (BatchAcker), instead of one per task. Every outcome was produced after
        # its result was stored, so no ack here precedes its result.
        to_ack: list[Delivery] = []
        for job, outcome in finished:
            with self._held_lock:
                self._held.pop(id(job.delivery), None)
            self.tasks_done += 1
            if job.acked_early:
                continue
            if outcome.action == "ack":
                to_ack.append(job.delivery)
            else:
                self._nack(
                    job.delivery,
                    requeue=outcome.action == "requeue",
                    reason=outcome.reason,
                    delay_s=outcome.delay_s if outcome.action == "requeue" else 0.0,
                )
        if self._defer_acks:
            self._acks_due += to_ack
        else:
            self._ack(to_ack)

    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        # A failed ack is retried once: the tasks already ran, and an unacked message would
        # run again after its lease ends. If the retry fails too, that is what happens.
        if not deliveries:
            return
        for attempt in (1, 2):
            try:
                assert self._consumer is not None
                ack_all(self._consumer, deliveries)
                return
            except BrokerConnectionError as exc:
                if attempt == 2:
                    self._log_lost_acks(deliveries, exc)
                else:
                    self._reconnect()
            except BrokerError as exc:  # refused, not lost: retrying would not help
                if len(deliveries) == 1:
                    self._log_lost_acks(deliveries, exc)
                    return
                # One refused delivery must not cost the others their ack: ack one by one
                # (acks are idempotent, so those the batch already removed do no harm).
                for delivery in deliveries:
                    self._ack([delivery])
                return

    def _log_lost_acks(self, deliveries: Sequence[Delivery], exc: BrokerError) -> None:
        ids = ", ".join(str(d.envelope.task_id) for d in deliveries[:5])
        more = f" and {len(deliveries) - 5} more" if len(deliveries) > 5 else ""
        what = (
            "it will run again after its lease ends" if len(deliveries) == 1 else "they run again when their leases end"
        )
        log.error("could not ack %s%s (%s): %s", ids, more, mask_url(str(exc)), what)

    def _nack(self, delivery: Delivery, *, requeue: bool, reason: str = "", delay_s: float = 0.0) -> None:
        try:
            assert self._consumer is not None
            self._consumer.nack(delivery, requeue=requeue, reason=reason, delay_s=delay_s)
        except BrokerError as exc:
            log.error(
                "could not hand back %s (%s): it returns after its lease ends",
                delivery.envelope.task_id,
                mask_url(str(exc)),
            )

    def _terminate_revoked(self) -> None:
        while self._to_terminate:
            task_id = self._to_terminate.pop()
            if self.pool.terminate(task_id):
                log.warning("Terminated revoked task %s", task_id)
                error = {
                    "exc_type": "TaskRevokedError",
                    "exc_module": "taskframe.exceptions",
                    "exc_message": ["revoked and terminated"],
                }
                self._store_quietly(task_id, states.REVOKED, error)
                for job in list(self._held.values()):
                    if job.task_id == task_id:
                        self._finish([(job, Outcome("ack", task_id, job.task_name, states.REVOKED))])

    # -- the keeper thread -------------------------------------------------------------------

    def _keep(self) -> None:
        """Renew leases and beat the heart until the worker is fully stopped."""
        renew_every_s = max(0.05, self.app.conf.visibility_timeout / 3)
        beat_every_s = self.app.conf.worker_heartbeat_interval
        next_renew = next_beat = time.monotonic()
        while not self._keeper_stop.is_set():
            now = time.monotonic()
            if now >= next_renew:
                self._renew_leases()
                next_renew = now + renew_every_s
            if now >= next_beat:
                self._heartbeat()
                self._check_revoked_running()
                next_beat = now + beat_every_s
            self._keeper_stop.wait(max(0.01, min(next_renew, next_beat) - time.monotonic()))

    def _renew_leases(self) -> None:
        with self._held_lock:
            deliveries = [job.delivery for job in self._held.values() if not job.acked_early]
        if not deliveries or self._consumer is None:
            return
        try:
            self._consumer.renew(deliveries)
        except Exception as exc:  # the keeper must outlive a broker hiccup
            log.warning("could not renew %d lease(s): %s", len(deliveries), mask_url(str(exc)))

    def _heartbeat(self, *, final: bool = False) -> None:
        try:
            if final:
                self.app.backend.delete(f"worker-{self.name}")
                return
            self.app.backend.put(
                f"worker-{self.name}",
                self.info(),
                ttl_s=self.app.conf.worker_heartbeat_interval * 3,
            )
        except Exception as exc:
            log.warning("could not write the heartbeat: %s", mask_url(str(exc)))

    def _check_revoked_running(self) -> None:
        running = [job.task_id for job in self.pool.running() if job.task_id]
        if not running:
            return
        try:
            self._revoked.refresh()
        except Exception:  # the keeper must outlive a backend hiccup; the next beat tries again
            return
        for task_id in running:
            if self._revoked.terminate_requested(task_id):
                self._to_terminate.add(task_id)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "queues": self.queues,
            "pid": os.getpid(),
            "pool": self.pool_kind,
            "concurrency": self.concurrency,
            "tasks_done": self.tasks_done,
            "last_heartbeat": time.time(),
        }

    # -- shutdown ----------------------------------------------------------------------------

    def _shutdown(self) -> None:
        self._flush_acks()
        unstarted = []
        while self._pending:
            job = self._pending.popleft()
            with self._held_lock:
                self._held.pop(id(job.delivery), None)
            if not job.acked_early:
                unstarted.append(job.delivery)
        self._release(unstarted)
        deadline = time.monotonic() + self.shutdown_timeout_s
        while self.pool.running() and not self._cold.is_set() and time.monotonic() < deadline:
            self._finish(self.pool.collect(0.1))
            self._finish(self.pool.enforce_limits())
        self._finish(self.pool.collect(0))
        for job in self.pool.stop(abandon=True):
            with self._held_lock:
                self._held.pop(id(job.delivery), None)
            if not job.acked_early:
                log.warning("Task %s was still running: handing it back to its queue", job.label)
                self._nack(job.delivery, requeue=True, reason="cold shutdown")
        self._keeper_stop.set()
        if self._keeper is not None:
            self._keeper.join(timeout=5.0)
        self._heartbeat(final=True)
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                self._consumer.close()
