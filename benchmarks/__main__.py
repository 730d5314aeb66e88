"""``python -m benchmarks``: run taskframe and its peers on the same brokers, print markdown.

Examples::

    python -m benchmarks                                   # the full workload, every broker here
    python -m benchmarks --broker sqlite --tasks 2000 --reps 1
    python -m benchmarks --broker redis --systems taskframe,celery

Each (repetition, system, scenario) runs in a fresh directory (and a flushed Redis DB
14) through :mod:`benchmarks.driver`; the systems take turns within each repetition, so
that the machine's noise falls on all of them alike. Progress goes to stderr, the
report to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.common import REDIS_URL, BenchEnv
from benchmarks.driver import BATCH_SIZE, ROUND_TRIPS, SCENARIOS
from benchmarks.report import Row, broker_section, machine
from benchmarks.systems import all_systems

#: The project's root: put on the workers' PYTHONPATH so they can import benchmarks.apps.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Seconds one scenario may take in all before it is abandoned.
SCENARIO_TIMEOUT_S = 1800.0
#: The broker's title in the report.
TITLES = {
    "sqlite": "Embedded: SQLite (taskframe sqlite://, Huey SqliteHuey, Celery sqla+sqlite:// and db+sqlite results)",
    "redis": "Redis (DB 14 on 127.0.0.1:6379, results in the same Redis)",
}


def redis_version() -> str | None:
    """The Redis server's version if it answers, else None."""
    try:
        import redis

        info = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1.0).info("server")
        return str(info["redis_version"])
    except Exception:
        return None


def run_scenario(system: str, broker: str, scenario: str, tasks: int, budget_s: float) -> dict[str, float]:
    """Run one scenario in a driver process; its measurements. Raises RuntimeError."""
    directory = tempfile.mkdtemp(prefix=f"tf-bench-{system}-")
    try:
        env = BenchEnv(broker, directory, results=SCENARIOS[scenario][1])
        if broker == "redis":
            import redis

            redis.Redis.from_url(env.redis_url).flushdb()  # our own DB only
        child_env = {**os.environ, **env.to_environ(), "PYTHONPATH": ROOT}
        command = [sys.executable, "-m", "benchmarks.driver", system, scenario]
        command += ["--tasks", str(tasks), "--budget", str(budget_s)]
        proc = subprocess.run(
            command,
            cwd=directory,
            env=child_env,
            capture_output=True,
            text=True,
            timeout=SCENARIO_TIMEOUT_S,
            check=False,
        )
        if proc.returncode != 0:
            # The last line first (it names the error), then the end of the traceback.
            lines = proc.stderr.strip().splitlines() or ["(no output)"]
            msg = f"{scenario}: exit {proc.returncode}: {lines[-1]}\n" + "\n".join(lines[-30:])
            raise RuntimeError(msg)
        found: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
        return found
    except subprocess.TimeoutExpired:
        msg = f"{scenario}: gave up after {SCENARIO_TIMEOUT_S:.0f}s"
        raise RuntimeError(msg) from None
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run_broker(broker: str, names: list[str], tasks: int, reps: int, budget_s: float) -> list[Row]:
    systems = all_systems()
    rows = [Row(name) for name in names if broker in systems[name].brokers]
    for row in rows:
        row.skipped = systems[row.system].unavailable(broker)
        if systems[row.system].batch_api is None:
            row.not_applicable.add("enqueue_batched")
    for rep in range(1, reps + 1):
        for row in rows:
            if row.skipped:
                continue
            for scenario in SCENARIOS:
                started = time.monotonic()
                label = f"[{broker} {rep}/{reps}] {row.system} {scenario}"
                try:
                    found = run_scenario(row.system, broker, scenario, tasks, budget_s)
                except RuntimeError as exc:
                    print(f"{label}: FAILED: {exc}", file=sys.stderr, flush=True)
                    row.errors.append(str(exc).splitlines()[0])
                    continue
                row.add(found)
                shown = ", ".join(f"{k} {v:,.1f}" for k, v in found.items())
                print(f"{label}: {shown} ({time.monotonic() - started:.0f}s)", file=sys.stderr, flush=True)
    return rows


def notes(broker: str, tasks: int, reps: int, budget_s: float) -> list[str]:
    found = [
        f"workload: {tasks:,} tasks `noop(i, i)` (adds one to a counter, returns x + y); {reps} repetition(s), "
        "median (min–max)",
        f"†: the phase reached its {budget_s:g} s budget before {tasks:,} tasks; the rate is over the tasks "
        "done by then (fewest in brackets)",
        "drain/s: from the first task's completion to the last one's (worker start-up left out), "
        "each worker process with a single slot; 'results': each task's return value is stored",
        f"enqueue/s: one producer, results on; batched = the system's many-at-once API, {BATCH_SIZE} tasks a call",
        f"round trip: send then wait for the result, {ROUND_TRIPS} in sequence on an idle worker",
        "workers: taskframe `-P solo`, Huey `-w 1 -k thread`, Celery `-P solo -c 1` without gossip, mingle and "
        "heartbeat, Dramatiq `--processes 1 --threads 1`, RQ `SimpleWorker`; all log at WARNING; Huey's and "
        "kombu's idle polling set to taskframe's (at most 20 ms); see benchmarks/systems/",
        "delivery: taskframe and Dramatiq ack after the task ran (at-least-once); Huey, Celery (default "
        "acks_late=False) and RQ remove a message when it is taken (at-most-once)",
    ]
    if broker == "sqlite":
        found.append(
            "durability: taskframe runs SQLite in WAL mode with synchronous=NORMAL (a crashed process loses "
            "nothing, a power loss may drop the last commits); SqliteHuey and Celery keep SQLite's default "
            "synchronous=FULL, an fsync per commit; huey-normal is SqliteHuey set to NORMAL: the like-for-like row"
        )
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run taskframe and its peers on the same brokers; print markdown tables of rates and ratios.",
    )
    parser.add_argument(
        "--broker",
        choices=["auto", "sqlite", "redis", "all"],
        default="auto",
        help="auto (default): sqlite, plus redis if it answers on 127.0.0.1:6379",
    )
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks per drain (default 20000)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument(
        "--budget", type=float, default=6.0, metavar="SECONDS", help="longest enqueue or drain phase (default 6)"
    )
    names = ",".join(all_systems())
    parser.add_argument("--systems", default=names, help=f"comma-separated, from {names} (default: all)")
    args = parser.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(args.systems) - set(all_systems()))
    if unknown:
        parser.error(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(all_systems())}")
    if args.tasks < 2 or args.reps < 1:
        parser.error("--tasks must be at least 2 and --reps at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    redis_at = redis_version()
    brokers = ["sqlite", "redis"] if args.broker in ("all", "auto") else [args.broker]
    skipped_brokers = []
    if "redis" in brokers and redis_at is None:
        if args.broker in ("redis", "all"):
            print(f"error: Redis does not answer at {REDIS_URL}", file=sys.stderr)
            return 1
        brokers.remove("redis")
        skipped_brokers.append(f"Redis: skipped: nothing answers at {REDIS_URL}")
    systems = all_systems()
    versions = list(dict.fromkeys(systems[name].versions() for name in args.systems))
    sections = [
        broker_section(
            TITLES[b],
            run_broker(b, args.systems, args.tasks, args.reps, args.budget),
            notes(b, args.tasks, args.reps, args.budget),
        )
        for b in brokers
    ]
    print("## taskframe benchmarks\n")
    print(machine(versions, redis_at if "redis" in brokers else None))
    command = " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)])
    print(f"Command: `{command}`\n")
    for section in sections:
        print(section)
    for line in skipped_brokers:
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
