"""One scenario of one system, in its own process: ``python -m benchmarks.driver SYSTEM SCENARIO --tasks N``.

The harness starts it in a fresh directory with ``BENCH_*`` set; it is the producer, starts
the system's workers as subprocesses, and prints one JSON object of measurements.

Drain rates are timed from the first task's completion to the N-th, so that the workers'
start-up (imports, connecting) is left out for every system alike: rate = tasks completed
in that span / its length. A phase (sending, or draining) also stops at ``--budget``
seconds, so that a slow system cannot stretch the run: its rate is then over fewer tasks,
and the scenario reports how many. Peak RSS is the sum of ``VmHWM`` over a worker's
process tree (the worker and any child it forked), read after the drain, before it stops.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import BenchEnv, Counter
from benchmarks.systems import System, all_systems

#: Tasks per enqueue step, and per call of a batch API (taskframe ``send_many``, Celery ``group``, ...).
BATCH_SIZE = 1000

#: Seconds without progress after which a drain is declared stuck.
STALL_S = 60.0
#: Seconds a worker gets to stop after SIGTERM before SIGKILL.
STOP_S = 15.0
#: Round trips timed in the latency scenario, and untimed ones before them.
ROUND_TRIPS, WARM_UP_TRIPS = 300, 5

Measurements = dict[str, float]


class Workers:
    """``count`` worker processes of a system, each in its own session (so that stopping one
    stops its children too), logging to files in the run's directory."""

    def __init__(self, system: System, env: BenchEnv, count: int) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[str] = []
        for index in range(count):
            log = env.path(f"worker-{index}.log")
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    system.worker_command(env),
                    cwd=env.directory,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.procs.append(proc)
            self.logs.append(log)

    def check_alive(self) -> None:
        for proc, log in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                msg = f"worker {proc.args!r} exited with {proc.returncode}:\n{_tail(log)}"
                raise RuntimeError(msg)

    def peak_rss_mb(self) -> float:
        """The largest peak RSS of one worker, its forked children included."""
        return max(sum(_vm_hwm_kb(pid) for pid in _tree(proc.pid)) for proc in self.procs) / 1024

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _tail(path: str, lines: int = 20) -> str:
    with open(path, errors="replace") as handle:
        return "".join(handle.readlines()[-lines:])


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found


def _vm_hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def drain(counter: Counter, n: int, workers: Workers, budget_s: float) -> tuple[float, int]:
    """Wait for the counter to reach ``n``, or for ``budget_s`` after the first completion.

    Returns the tasks/s from the first completion on, and how many tasks that span covers.
    """
    first_at, first_value = 0.0, 0
    last_value, last_change = 0, time.monotonic()
    while True:
        value = counter.value()
        now = time.monotonic()
        if not first_at and value > 0:
            first_at, first_value = now, value
        if value >= n or (first_at and now - first_at >= budget_s):
            return (value - first_value) / (now - first_at) if now > first_at else float("nan"), value
        if value != last_value:
            last_value, last_change = value, now
        elif now - last_change > STALL_S:
            msg = f"no progress for {STALL_S:.0f}s at {value}/{n} tasks:\n{_tail(workers.logs[0])}"
            raise RuntimeError(msg)
        workers.check_alive()
        # Fine steps until the first completion (it starts the clock), coarser after.
        time.sleep(0.002 if not first_at else 0.01)


def send(system: System, n: int, budget_s: float, *, batched: bool) -> tuple[float, int]:
    """Send up to ``n`` tasks, BATCH_SIZE per step, stopping after ``budget_s``.

    Returns the tasks/s and how many were sent. ``batched``: one batch-API call per step.
    """
    action = system.enqueue_batched if batched else system.enqueue_one
    sent, started = 0, time.perf_counter()
    while sent < n and time.perf_counter() - started < budget_s:
        indices = range(sent, min(n, sent + BATCH_SIZE))
        action(indices)
        sent = indices.stop
    return sent / (time.perf_counter() - started), sent


def drain_with(system: System, env: BenchEnv, n: int, budget_s: float, processes: int) -> tuple[float, int, float]:
    """Start ``processes`` workers on ``n`` queued tasks: drain rate, tasks counted, peak RSS."""
    workers = Workers(system, env, processes)
    try:
        rate, done = drain(env.counter(), n, workers, budget_s)
        return rate, done, workers.peak_rss_mb()
    finally:
        workers.stop()


# -- the scenarios: each runs in a fresh directory / Redis DB, with BENCH_RESULTS as noted --------
# Each returns {metric: value}, and {metric + "_tasks": count} where a rate is over fewer
# than the N tasks asked for because a phase reached its time budget.


def _counted(found: Measurements, key: str, rate: float, count: int, n: int) -> None:
    found[key] = rate
    if count < n:
        found[key + "_tasks"] = count


def scenario_plain(system: System, env: BenchEnv, n: int, budget_s: float) -> Measurements:
    """Results off: N tasks queued (fastest way, not timed), then one worker, one slot, drains them."""
    _rate, queued = send(system, n, budget_s, batched=system.batch_api is not None)
    found: Measurements = {}
    rate, done, _rss = drain_with(system, env, queued, budget_s, 1)
    _counted(found, "drain_1", rate, done, n)
    return found


def scenario_results(system: System, env: BenchEnv, n: int, budget_s: float) -> Measurements:
    """Results on: N one-call enqueues, then one worker drains them.

    With ``env.count_calls`` (SQS), also the API calls per task of the producer's enqueues and
    of the worker's whole life (start-up and its last idle receive included).
    """
    found: Measurements = {}
    calls = getattr(system.app, "API_CALLS", [0])
    before = calls[0]
    rate, queued = send(system, n, budget_s, batched=False)
    _counted(found, "enqueue_one", rate, queued, n)
    if env.count_calls:
        found["calls_producer"] = (calls[0] - before) / queued
    rate, done, found["rss_mb"] = drain_with(system, env, queued, budget_s, 1)
    _counted(found, "drain_1_results", rate, done, n)
    if env.count_calls:
        counts = [
            f for f in os.listdir(env.directory) if f.startswith("api-calls-") and f != f"api-calls-{os.getpid()}.txt"
        ]
        if not counts:
            msg = "the worker wrote no api-calls-<pid>.txt at exit"
            raise RuntimeError(msg)
        worker_calls = 0
        for name in counts:
            with open(env.path(name)) as handle:
                worker_calls += int(handle.read())
        found["calls_worker"] = worker_calls / env.counter().value()
    return found


def scenario_batched(system: System, env: BenchEnv, n: int, budget_s: float) -> Measurements:
    """Results on: N enqueues through the batch API, no worker."""
    found: Measurements = {}
    rate, queued = send(system, n, budget_s, batched=True)
    _counted(found, "enqueue_batched", rate, queued, n)
    return found


def scenario_two(system: System, env: BenchEnv, n: int, budget_s: float) -> Measurements:
    """Results on: N enqueues through the batch API, then two worker processes drain them."""
    found: Measurements = {}
    rate, queued = send(system, n, budget_s, batched=system.batch_api is not None)
    if system.batch_api:
        _counted(found, "enqueue_batched", rate, queued, n)
    rate, done, _rss = drain_with(system, env, queued, budget_s, 2)
    _counted(found, "drain_2", rate, done, n)
    return found


def scenario_latency(system: System, env: BenchEnv, n: int, budget_s: float) -> Measurements:
    """Results on: one idle worker; ROUND_TRIPS sequential send-then-wait calls."""
    workers = Workers(system, env, 1)
    try:
        for _ in range(WARM_UP_TRIPS):  # the first one also waits for the worker to start
            system.round_trip()
        samples = []
        for _ in range(ROUND_TRIPS):
            started = time.perf_counter()
            value = system.round_trip()
            samples.append((time.perf_counter() - started) * 1000)
            if value != 3:
                msg = f"round trip returned {value!r}, expected 3"
                raise RuntimeError(msg)
        workers.check_alive()
    finally:
        workers.stop()
    percentiles = statistics.quantiles(samples, n=100)
    return {"rtt_p50_ms": statistics.median(samples), "rtt_p99_ms": percentiles[98]}


SCENARIOS: dict[str, tuple[Callable[[System, BenchEnv, int, float], Measurements], bool]] = {
    # name: (function, results on)
    "plain": (scenario_plain, False),
    "results": (scenario_results, True),
    "two": (scenario_two, True),
    "latency": (scenario_latency, True),
    "batched": (scenario_batched, True),
}
#: The scenarios of the default runs (sqlite, redis); the others are picked by their runs.
DEFAULT_SCENARIOS = ("plain", "results", "two", "latency")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.driver")
    parser.add_argument("system", choices=sorted(all_systems()))
    parser.add_argument("scenario", choices=list(SCENARIOS))
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--budget", type=float, required=True, help="seconds one enqueue or drain phase may take")
    args = parser.parse_args(argv)
    env = BenchEnv.from_environ()
    system = all_systems()[args.system]
    env.counter().reset()
    system.setup()
    function, _results = SCENARIOS[args.scenario]
    found: dict[str, Any] = function(system, env, args.tasks, args.budget)
    print(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
