"""Execution pools: where the worker's tasks run (inline, threads, or forked children).

A pool takes :class:`Job` objects and hands back ``(job, Outcome)`` pairs from ``collect``.
It never touches the broker consumer: the worker's main loop acks, so every consumer call
happens on one thread (which clients like pika require).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from . import states
from .broker import Delivery
from .exceptions import SoftTimeLimitExceeded, TaskframeError, TimeLimitExceeded
from .execution import Executor, Outcome, store_state
from .result import encode_exception

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from .app import App

log = logging.getLogger("taskframe.worker")


class WorkerTerminate(BaseException):
    """Raised into an inline task by a cold shutdown; BaseException so tasks do not catch it."""


@dataclass
class Job:
    delivery: Delivery
    task_id: str | None
    task_name: str | None
    acked_early: bool = False
    started_at: float = field(default_factory=time.monotonic)
    hard_limit_s: float | None = None

    @property
    def label(self) -> str:
        return f"{self.task_name}[{self.task_id}]"


class Pool(Protocol):
    capacity: int

    def start(self) -> None: ...
    def free_slots(self) -> int: ...
    def submit(self, job: Job) -> None: ...
    def collect(self, timeout_s: float) -> list[tuple[Job, Outcome]]:
        """Finished jobs; wait up to ``timeout_s`` for the first one if none is ready."""
        ...

    def running(self) -> list[Job]: ...
    def enforce_limits(self) -> list[tuple[Job, Outcome]]:
        """Stop jobs past their hard time limit, where the pool can; their outcomes."""
        ...

    def terminate(self, task_id: str) -> bool:
        """Stop the running task ``task_id`` (revoke with terminate=True), where the pool can."""
        ...

    def stop(self, *, abandon: bool) -> list[Job]:
        """Stop the pool. With ``abandon``, running jobs are stopped and returned unfinished."""
        ...


def time_limit_outcome(app: App, job: Job, limit_s: float) -> Outcome:
    """Record the hard-limit failure on behalf of a task that could not record it itself."""
    exc = TimeLimitExceeded(f"Time limit ({limit_s}s) exceeded")
    if job.task_id:
        try:
            store_state(app, job.task_id, states.FAILURE, encode_exception(exc))
        except TaskframeError as store_exc:  # the worker's main loop must go on
            log.error("could not store the time-limit failure of %s: %s", job.label, store_exc)
    log.error("Task %s: hard time limit (%ss) exceeded; the task was stopped", job.label, limit_s)
    return Outcome("ack", job.task_id, job.task_name, states.FAILURE, str(exc))


# -- solo ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def alarm_limits(hard_s: float | None, soft_s: float | None) -> Iterator[None]:
    """Time limits in a process's main thread through SIGALRM: the soft limit raises
    SoftTimeLimitExceeded in the task; a hard limit with no soft one raises
    TimeLimitExceeded (a task that catches everything can ignore it: use prefork)."""
    first = soft_s or hard_s
    if not first or threading.current_thread() is not threading.main_thread():
        yield
        return
    stage = {"soft_fired": False}

    def on_alarm(signum: int, frame: Any) -> None:
        if soft_s and not stage["soft_fired"]:
            stage["soft_fired"] = True
            if hard_s and hard_s > soft_s:
                signal.setitimer(signal.ITIMER_REAL, hard_s - soft_s)
            msg = f"soft time limit ({soft_s}s) exceeded"
            raise SoftTimeLimitExceeded(msg)
        msg = f"Time limit ({hard_s}s) exceeded"
        raise TimeLimitExceeded(msg)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, first)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class SoloPool:
    """Runs each task inline in the worker's main thread: no concurrency, least overhead."""

    capacity = 1

    def __init__(self, app: App, hostname: str) -> None:
        self.executor = Executor(app, hostname, limit_guard=alarm_limits)
        self._done: list[tuple[Job, Outcome]] = []
        self.current: Job | None = None

    def start(self) -> None:
        pass

    def free_slots(self) -> int:
        return 0 if self.current else 1

    def submit(self, job: Job) -> None:
        self.current = job
        try:
            outcome = self.executor.execute(job.delivery.envelope, job.delivery.queue, job.delivery.deliveries)
        except WorkerTerminate:
            outcome = Outcome("requeue", job.task_id, job.task_name, None, "cold shutdown")
        except Exception as exc:  # a bug around the task must not take the worker down
            log.exception("Task %s: the worker failed around it; the message goes back to the queue", job.label)
            outcome = Outcome("requeue", job.task_id, job.task_name, None, repr(exc))
        finally:
            self.current = None
        self._done.append((job, outcome))

    def collect(self, timeout_s: float) -> list[tuple[Job, Outcome]]:
        done, self._done = self._done, []
        return done

    def running(self) -> list[Job]:
        return [self.current] if self.current else []

    def enforce_limits(self) -> list[tuple[Job, Outcome]]:
        return []

    def terminate(self, task_id: str) -> bool:
        return False

    def stop(self, *, abandon: bool) -> list[Job]:
        return []


# -- threads ------------------------------------------------------------------------------------


def _raise_in_thread(thread_id: int, exc_type: type[BaseException]) -> None:
    # The only way to interrupt another Python thread; it lands at the next bytecode, so a
    # task blocked in C (a socket read) sees it only when that call returns.
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc_type))


class ThreadPool:
    """N threads; soft limits raise inside the task, hard limits too (best effort)."""

    def __init__(self, app: App, hostname: str, concurrency: int) -> None:
        self.capacity = concurrency
        self.executor = Executor(app, hostname, limit_guard=self._thread_limits)
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[Job, Outcome]] = queue.SimpleQueue()
        self._running: dict[int, Job] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._submitted = 0

    @contextlib.contextmanager
    def _thread_limits(self, hard_s: float | None, soft_s: float | None) -> Iterator[None]:
        thread_id = threading.get_ident()
        timers = []
        if soft_s:
            timers.append(threading.Timer(soft_s, _raise_in_thread, (thread_id, SoftTimeLimitExceeded)))
        if hard_s:
            timers.append(threading.Timer(hard_s, _raise_in_thread, (thread_id, TimeLimitExceeded)))
        for timer in timers:
            timer.daemon = True
            timer.start()
        try:
            yield
        finally:
            for timer in timers:
                timer.cancel()

    def start(self) -> None:
        for index in range(self.capacity):
            thread = threading.Thread(target=self._serve, name=f"taskframe-pool-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self) -> None:
        while True:
            job = self._inbox.get()
            if job is None:
                return
            with self._lock:
                self._running[threading.get_ident()] = job
            try:
                d = job.delivery
                outcome = self.executor.execute(d.envelope, d.queue, d.deliveries)
            except BaseException as exc:  # a bug, or an async exception landing outside the task
                log.exception("Task %s: the worker failed around it; the message goes back to the queue", job.label)
                outcome = Outcome("requeue", job.task_id, job.task_name, None, repr(exc))
            finally:
                with self._lock:
                    self._running.pop(threading.get_ident(), None)
            self._done.put((job, outcome))

    def free_slots(self) -> int:
        return self.capacity - self._submitted

    def submit(self, job: Job) -> None:
        self._submitted += 1
        self._inbox.put(job)

    def collect(self, timeout_s: float) -> list[tuple[Job, Outcome]]:
        done = []
        try:
            done.append(self._done.get(timeout=timeout_s) if timeout_s > 0 else self._done.get_nowait())
            while True:
                done.append(self._done.get_nowait())
        except queue.Empty:
            pass
        self._submitted -= len(done)
        return done

    def running(self) -> list[Job]:
        with self._lock:
            return list(self._running.values())

    def enforce_limits(self) -> list[tuple[Job, Outcome]]:
        return []

    def terminate(self, task_id: str) -> bool:
        with self._lock:
            for thread_id, job in self._running.items():
                if job.task_id == task_id:
                    _raise_in_thread(thread_id, WorkerTerminate)
                    return True
        return False

    def stop(self, *, abandon: bool) -> list[Job]:
        for _ in self._threads:
            self._inbox.put(None)
        if abandon:
            # Threads cannot be killed; their messages go back and they end with the process.
            return self.running()
        for thread in self._threads:
            thread.join(timeout=1.0)
        return []


# -- prefork ------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    # If the worker is SIGKILLed its leases lapse and its messages go to other workers; a
    # child still running one would run it a second time in parallel. Linux can end the
    # child with its parent (prctl PR_SET_PDEATHSIG); elsewhere the child ends at its next
    # pipe read instead.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _child_main(app: App, conn: Connection, inherited: list[Connection], hostname: str, max_tasks: int | None) -> None:
    _die_with_parent()
    # Fork copied the parent's ends of every pipe; holding them would keep this child from
    # seeing EOF when the parent dies.
    for other in inherited:
        with contextlib.suppress(OSError):
            other.close()
    # The parent decides when children stop; a terminal's Ctrl+C must not kill them mid-task.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    executor = Executor(app, hostname, limit_guard=alarm_limits)
    done = 0
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):
            break
        if item is None:
            break
        # The delivery's tag stays in the parent: it may hold an unpicklable client handle.
        key, envelope, queue_name, deliveries = item
        try:
            outcome = executor.execute(envelope, queue_name, deliveries)
        except BaseException as exc:  # never let the child die with the message unanswered
            log.exception("the worker failed around task %s; the message goes back to the queue", envelope.task_id)
            outcome = Outcome("requeue", envelope.task_id, None, None, repr(exc))
        done += 1
        retiring = bool(max_tasks and done >= max_tasks)
        # Saying so with the result lets the parent replace this child before it sends the
        # next job to a process that is about to exit.
        conn.send((key, outcome, retiring))
        if retiring:
            break
    conn.close()
    app.close()


@dataclass
class _Child:
    process: Any
    conn: Connection
    job: Job | None = None
    key: int = 0


class PreforkPool:
    """N forked child processes, one task at a time each. Hard time limits and revoke with
    terminate replace the child; a child that dies mid-task gives its message back."""

    def __init__(self, app: App, hostname: str, concurrency: int, max_tasks_per_child: int | None) -> None:
        self.app = app
        self.capacity = concurrency
        self.hostname = hostname
        self.max_tasks_per_child = max_tasks_per_child
        self._context = multiprocessing.get_context("fork")
        self._children: list[_Child] = []
        self._next_key = 0

    def _spawn(self) -> _Child:
        parent_conn, child_conn = self._context.Pipe()
        process = self._context.Process(
            target=_child_main,
            args=(
                self.app,
                child_conn,
                [parent_conn, *(c.conn for c in self._children)],
                self.hostname,
                self.max_tasks_per_child,
            ),
            name="taskframe-child",
            daemon=True,
        )
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork() with threads running; the child only runs the
            # executor with connections it opens itself (the App drops inherited ones).
            warnings.simplefilter("ignore", DeprecationWarning)
            process.start()
        child_conn.close()
        return _Child(process, parent_conn)

    def start(self) -> None:
        self._children = []
        for _ in range(self.capacity):  # one by one: each child closes the pipes made before it
            self._children.append(self._spawn())

    def free_slots(self) -> int:
        return sum(1 for c in self._children if c.job is None)

    def submit(self, job: Job) -> None:
        for index, child in enumerate(self._children):
            if child.job is None:
                if not child.process.is_alive():  # died while idle (killed from outside)
                    child = self._children[index] = self._replace(child)
                self._next_key += 1
                child.job, child.key = job, self._next_key
                job.started_at = time.monotonic()
                d = job.delivery
                child.conn.send((child.key, d.envelope, d.queue, d.deliveries))
                return
        msg = "no free child process"
        raise RuntimeError(msg)

    def _replace(self, child: _Child) -> _Child:
        with contextlib.suppress(OSError):
            child.conn.close()
        child.process.join(timeout=0.1)
        return self._spawn()

    def collect(self, timeout_s: float) -> list[tuple[Job, Outcome]]:
        busy = [c for c in self._children if c.job is not None]
        if not busy:
            if timeout_s > 0:
                time.sleep(min(timeout_s, 0.05))
            return []
        ready = multiprocessing.connection.wait([c.conn for c in busy], timeout=timeout_s)
        done = []
        for index, child in enumerate(self._children):
            if child.job is None or child.conn not in ready:
                continue
            job = child.job
            try:
                _key, outcome, retiring = child.conn.recv()
            except (EOFError, OSError):
                outcome = self._died(child, job)
                self._children[index] = self._spawn()
            else:
                child.job = None
                if retiring:
                    self._children[index] = self._replace(child)
            done.append((job, outcome))
        return done

    def _died(self, child: _Child, job: Job) -> Outcome:
        child.process.join(timeout=1.0)
        code = child.process.exitcode
        reason = f"worker child process {child.process.pid} exited with code {code} while running {job.label}"
        log.error("%s; the message goes back to the queue (delivery %d)", reason, job.delivery.deliveries)
        return Outcome("requeue", job.task_id, job.task_name, None, reason)

    def running(self) -> list[Job]:
        return [c.job for c in self._children if c.job is not None]

    def enforce_limits(self) -> list[tuple[Job, Outcome]]:
        done = []
        now = time.monotonic()
        for index, child in enumerate(self._children):
            job = child.job
            if job is None or not job.hard_limit_s or now - job.started_at < job.hard_limit_s:
                continue
            self._kill(child)
            self._children[index] = self._spawn()
            done.append((job, time_limit_outcome(self.app, job, job.hard_limit_s)))
        return done

    def terminate(self, task_id: str) -> bool:
        for index, child in enumerate(self._children):
            if child.job is not None and child.job.task_id == task_id:
                self._kill(child)
                self._children[index] = self._spawn()
                return True
        return False

    def _kill(self, child: _Child) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.process.pid, signal.SIGKILL)
        child.process.join(timeout=5.0)
        with contextlib.suppress(OSError):
            child.conn.close()

    def stop(self, *, abandon: bool) -> list[Job]:
        unfinished = []
        for child in self._children:
            if child.job is not None and abandon:
                unfinished.append(child.job)
                self._kill(child)
                continue
            with contextlib.suppress(OSError, BrokenPipeError):
                child.conn.send(None)
        for child in self._children:
            child.process.join(timeout=5.0)
            if child.process.is_alive():
                self._kill(child)
            with contextlib.suppress(OSError):
                child.conn.close()
        self._children = []
        return unfinished


def create_pool(kind: str, app: App, hostname: str, concurrency: int, max_tasks_per_child: int | None) -> Pool:
    if kind == "solo":
        return SoloPool(app, hostname)
    if kind == "threads":
        return ThreadPool(app, hostname, concurrency)
    if kind == "prefork":
        return PreforkPool(app, hostname, concurrency, max_tasks_per_child)
    msg = f"unknown pool {kind!r}; choose prefork, threads or solo"
    raise ValueError(msg)
