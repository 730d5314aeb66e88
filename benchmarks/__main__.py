"""``python -m benchmarks``: run taskframe and its peers on the same brokers, print markdown.

Examples::

    python -m benchmarks                                   # the full workload, every broker here
    python -m benchmarks --broker sqlite --tasks 2000 --reps 1
    python -m benchmarks --broker redis --systems taskframe,celery
    python -m benchmarks --broker backends --tasks 2000 --reps 1   # taskframe, one result backend a row
    python -m benchmarks --broker sqs --tasks 2000 --reps 1        # taskframe on SQS (moto)

Each (repetition, system, scenario) runs in a fresh directory (and a flushed Redis DB
14) through :mod:`benchmarks.driver`; the systems take turns within each repetition, so
that the machine's noise falls on all of them alike. Progress goes to stderr, the
report to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from benchmarks.common import AMQP_URL, REDIS_URL, BenchEnv
from benchmarks.driver import BATCH_SIZE, DEFAULT_SCENARIOS, ROUND_TRIPS, SCENARIOS
from benchmarks.report import Row, broker_section, machine, plain_section
from benchmarks.systems import all_systems

#: The project's root: put on the workers' PYTHONPATH so they can import benchmarks.apps.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Seconds one scenario may take in all before it is abandoned.
SCENARIO_TIMEOUT_S = 1800.0
#: The broker's title in the report.
TITLES = {
    "sqlite": "Embedded: SQLite (taskframe sqlite://, Huey SqliteHuey, Celery sqla+sqlite:// and db+sqlite results)",
    "redis": "Redis (DB 14 on 127.0.0.1:6379, results in the same Redis)",
    "amqp": "RabbitMQ (127.0.0.1:5672, vhost /, a fresh queue per scenario; results in Redis DB 14)",
}


def redis_version() -> str | None:
    """The Redis server's version if it answers, else None."""
    try:
        import redis

        info = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1.0).info("server")
        return str(info["redis_version"])
    except Exception:
        return None


@dataclass
class Variant:
    """One row of the runs that are not a system per row: taskframe with other settings."""

    label: str
    system: str = "taskframe"
    #: The result backend's URL; ``{dir}`` is the run's directory.
    backend_url: str = ""
    #: SQS: extra broker options in the URL (the broker URL is made per scenario, fresh queues).
    sqs_options: dict[str, str] = field(default_factory=dict)
    #: Called before each scenario (empties the backend's tables), or None.
    reset: Callable[[], None] | None = None
    #: Why the row cannot run here, or None.
    skipped: str | None = None


def run_scenario(
    system: str,
    broker: str,
    scenario: str,
    tasks: int,
    budget_s: float,
    variant: Variant | None = None,
) -> dict[str, float]:
    """Run one scenario in a driver process; its measurements. Raises RuntimeError."""
    directory = tempfile.mkdtemp(prefix=f"tf-bench-{system}-")
    try:
        backend_url = variant.backend_url.format(dir=directory) if variant else ""
        broker_url, queue = "", ""
        if broker == "amqp":
            broker_url, queue = AMQP_URL, f"bench-{uuid.uuid4().hex[:12]}"
        if broker == "sqs":
            from tests.conformance import sqs_server

            broker_url = sqs_server.make_url(**(variant.sqs_options if variant else {}))
        env = BenchEnv(
            broker,
            directory,
            results=SCENARIOS[scenario][1],
            broker_url=broker_url,
            backend_url=backend_url,
            count_calls=broker == "sqs",
            queue=queue,
        )
        if broker == "redis" or backend_url.startswith("redis") or (broker in ("sqs", "amqp") and not backend_url):
            import redis

            redis.Redis.from_url(env.redis_url).flushdb()  # our own DB only
        if variant is not None and variant.reset is not None:
            variant.reset()
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
        if queue:
            delete_amqp_queue(queue)


#: The queue names of the AMQP runs (``bench-<hex>``, with ``.dead``), as a RabbitMQ policy pattern.
BENCH_QUEUES = "^bench-"


@contextlib.contextmanager
def queue_version_policy(version: int | None) -> Iterator[None]:
    """With ``version``: a policy ``queue-version`` on the benchmark's queues of vhost "/" for
    the duration (rabbitmqctl), so every system's queues are classic queues of that version
    without a queue argument (which would change their declarations)."""
    if version is None:
        yield
        return
    name = "taskframe-benchmark-queue-version"
    definition = json.dumps({"queue-version": version})
    command = ["rabbitmqctl", "set_policy", "-p", "/", "--apply-to", "queues", "--priority", "100"]
    done = subprocess.run([*command, name, BENCH_QUEUES, definition], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        msg = f"could not set the RabbitMQ policy {name}: {done.stderr.strip() or done.stdout.strip()}"
        raise Unavailable(msg)
    try:
        yield
    finally:
        subprocess.run(["rabbitmqctl", "clear_policy", "-p", "/", name], capture_output=True, check=False)


def amqp_version() -> str | None:
    """RabbitMQ's version if it answers, else None."""
    try:
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL.removesuffix("//") + "/%2F"))
        version = conn._impl.server_properties.get("version", b"?")
        conn.close()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        return None


def delete_amqp_queue(queue: str) -> None:
    """Delete a run's queue, its dead-letter queue and its exchange (pika), quietly."""
    try:
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL.removesuffix("//") + "/%2F"))
    except Exception as exc:
        print(f"could not delete the AMQP queue {queue}: {exc}", file=sys.stderr)
        return
    with conn:
        for name in (queue, f"{queue}.dead"):
            try:
                conn.channel().queue_delete(name)
            except Exception as exc:  # a closed channel: the next gets a new one
                print(f"queue_delete {name}: {exc}", file=sys.stderr)
        try:
            conn.channel().exchange_delete(queue)
        except Exception as exc:
            print(f"exchange_delete {queue}: {exc}", file=sys.stderr)


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
            for scenario in DEFAULT_SCENARIOS:
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


def run_variants(
    broker: str, variants: Sequence[Variant], scenarios: Sequence[str], tasks: int, reps: int, budget_s: float
) -> list[Row]:
    """Like run_broker, one row per variant (of taskframe) instead of per system."""
    rows = [Row(v.label, skipped=v.skipped) for v in variants]
    for rep in range(1, reps + 1):
        for row, variant in zip(rows, variants, strict=True):
            if row.skipped:
                continue
            for scenario in scenarios:
                started = time.monotonic()
                label = f"[{broker} {rep}/{reps}] {row.system} {scenario}"
                try:
                    found = run_scenario(variant.system, broker, scenario, tasks, budget_s, variant)
                except RuntimeError as exc:
                    print(f"{label}: FAILED: {exc}", file=sys.stderr, flush=True)
                    row.errors.append(str(exc).splitlines()[0])
                    continue
                row.add(found)
                shown = ", ".join(f"{k} {v:,.1f}" for k, v in found.items())
                print(f"{label}: {shown} ({time.monotonic() - started:.0f}s)", file=sys.stderr, flush=True)
    return rows


# -- the per-backend run --------------------------------------------------------------------

#: The SQL and MongoDB backends' database.
BENCH_DATABASE = "taskframe_bench"
#: The SQL backend's tables, dropped before each scenario.
SQL_TABLES = ("taskframe_results", "taskframe_kv", "taskframe_counters")
POSTGRES = f"db+postgresql+psycopg://postgres@127.0.0.1:5432/{BENCH_DATABASE}"
MYSQL = f"db+mysql+pymysql://root@127.0.0.1:3306/{BENCH_DATABASE}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _postgres() -> Variant:
    variant = Variant("db+postgresql+psycopg", backend_url=POSTGRES)
    try:
        import psycopg

        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True, connect_timeout=3) as c:
            if c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (BENCH_DATABASE,)).fetchone() is None:
                c.execute(f'CREATE DATABASE "{BENCH_DATABASE}"')
    except Exception as exc:
        variant.skipped = f"PostgreSQL on 127.0.0.1:5432: {_first_line(exc)}"
        return variant

    def reset() -> None:
        with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={BENCH_DATABASE}", autocommit=True) as c:
            for table in SQL_TABLES:
                c.execute(f'DROP TABLE IF EXISTS "{table}"')

    variant.reset = reset
    return variant


def _mysql() -> Variant:
    variant = Variant("db+mysql+pymysql", backend_url=MYSQL)
    try:
        import pymysql

        conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", connect_timeout=3, autocommit=True)
        with conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS `{BENCH_DATABASE}`")
    except Exception as exc:
        variant.skipped = f"MySQL on 127.0.0.1:3306: {_first_line(exc)}"
        return variant

    def reset() -> None:
        conn = pymysql.connect(host="127.0.0.1", user="root", database=BENCH_DATABASE, autocommit=True)
        with conn, conn.cursor() as cur:
            for table in SQL_TABLES:
                cur.execute(f"DROP TABLE IF EXISTS `{table}`")

    variant.reset = reset
    return variant


def _mongodb() -> Variant:
    """nx-27017 (or TASKFRAME_TEST_MONGODB_URL's server), started by the tests' helper."""
    variant = Variant("mongodb")
    try:
        from tests import db_services

        server = db_services.mongodb_server()
    except Exception as exc:
        variant.skipped = f"MongoDB (nx-27017 via tests/db_services.py): {_first_line(exc)}"
        return variant
    variant.backend_url = f"{server}/{BENCH_DATABASE}"

    def reset() -> None:
        import pymongo

        client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(server)
        with client:
            client.drop_database(BENCH_DATABASE)

    variant.reset = reset
    return variant


def backend_variants(redis_up: bool) -> list[Variant]:
    return [
        Variant("sqlite", backend_url="sqlite:///{dir}/results.sqlite3"),
        Variant("file", backend_url="file:///{dir}/results"),
        Variant("redis", backend_url=REDIS_URL, skipped=None if redis_up else f"nothing answers at {REDIS_URL}"),
        _postgres(),
        _mysql(),
        _mongodb(),
    ]


def sqs_variants() -> list[Variant]:
    from tests.conformance import sqs_server

    why = sqs_server.unavailable()
    return [
        Variant("taskframe (ack_batch_s=0)", skipped=why),
        Variant("taskframe (ack_batch_s=0.1)", sqs_options={"ack_batch_s": "0.1"}, skipped=why),
    ]


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
    if broker == "amqp":
        found.append(
            "RabbitMQ: taskframe's adapter through pika, Celery through py-amqp (kombu's `amqp://`), both "
            "with Celery's topology (a durable direct exchange and queue per queue); Celery's default "
            "prefetch (4 per process) and remote control off (its exclusive pidbox queue would stop a second "
            "worker on this host); results off: Celery without a backend, taskframe ignore_result; the "
            "queue, its .dead queue and exchange are deleted with pika after each scenario; taskframe waits for "
            "RabbitMQ's publisher confirm of each persistent message (written to disk) before a publish returns, "
            "Celery (kombu's default) publishes without confirms; celery-confirmed is Celery with taskframe's "
            "guarantees (kombu's confirm_publish=True, task_acks_late=True): the like-for-like row"
        )
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
        choices=["auto", "sqlite", "redis", "backends", "sqs", "amqp", "all"],
        default="auto",
        help="auto (default): sqlite, plus redis if it answers on 127.0.0.1:6379; backends: taskframe on the "
        "SQLite broker with each result backend; sqs: taskframe on SQS (moto); amqp: taskframe and Celery on "
        "RabbitMQ; all: every one of them",
    )
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks per drain (default 20000)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument(
        "--budget", type=float, default=6.0, metavar="SECONDS", help="longest enqueue or drain phase (default 6)"
    )
    names = ",".join(all_systems())
    parser.add_argument("--systems", default=names, help=f"comma-separated, from {names} (default: all)")
    parser.add_argument(
        "--amqp-queue-version",
        type=int,
        choices=[1, 2],
        help="RabbitMQ 3.10-3.12: run every system's queues as classic queues of this version, set by a "
        "policy on the run's queue names (the server's default otherwise; RabbitMQ 4 has only version 2)",
    )
    args = parser.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(args.systems) - set(all_systems()))
    if unknown:
        parser.error(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(all_systems())}")
    if args.tasks < 2 or args.reps < 1:
        parser.error("--tasks must be at least 2 and --reps at least 1")
    return args


def backends_section(tasks: int, reps: int, budget_s: float, redis_up: bool) -> str:
    rows = run_variants("sqlite", backend_variants(redis_up), ("results", "latency"), tasks, reps, budget_s)
    title = "taskframe per result backend (broker: the embedded SQLite one)"
    found = [
        *notes("backends", tasks, reps, budget_s)[:2],
        "drain/s: one `taskframe worker -P solo` on N queued tasks (one-call enqueues), from the first "
        "completion to the last, each return value stored in the backend; round trip: "
        f"`noop.delay(1, 2).get()`, {ROUND_TRIPS} in sequence on an idle worker",
        "÷ redis: the row's median over the Redis backend's in the same run (rates: above 1 is faster; "
        "latency: below 1 is)",
        "backends: sqlite and file in the run's directory; redis DB 14 on 127.0.0.1:6379 (flushed); "
        f"PostgreSQL and MySQL on 127.0.0.1 (database {BENCH_DATABASE}, tables dropped before each scenario); "
        "MongoDB: nx-27017 (a MongoDB wire-protocol server on SQLite) started by tests/db_services.py, "
        f"database {BENCH_DATABASE} dropped before each scenario — not a real mongod",
    ]
    return plain_section(
        title, rows, found, ("drain_1_results", "rtt_p50_ms", "rtt_p99_ms"), baseline="redis", first="backend"
    )


def sqs_section(tasks: int, reps: int, budget_s: float) -> str:
    scenarios = ("results", "batched", "latency")
    rows = run_variants("sqs", sqs_variants(), scenarios, tasks, reps, budget_s)
    keys: tuple[str, ...] = ("enqueue_one", "enqueue_batched", "drain_1_results", "rtt_p50_ms", "rtt_p99_ms")
    keys += ("calls_producer", "calls_worker")
    title = "SQS, emulator: moto 5 server (tests/conformance/sqs_server.py), taskframe only, results in Redis DB 14"
    found = [
        *notes("sqs", tasks, reps, budget_s)[:2],
        "emulator: moto's server (with the test suite's fixes for a receive race and per-message costs) on "
        "127.0.0.1 — its rates and latencies are not AWS's; the API calls per task are what SQS would bill",
        "rows: the worker's `ack_batch_s` broker option (in the broker URL): 0 (default) deletes each "
        "message as it is acked, 0.1 shares DeleteMessageBatch requests among up to 10 acks",
        f"enqueue/s: one producer, `noop.delay` one call each, or `app.send_many` {BATCH_SIZE} a call; "
        f"drain/s: one `taskframe worker -P solo`, results on; round trip: {ROUND_TRIPS} in sequence",
        "SQS calls/task: counted with a botocore `before-call` hook on each SQS client (an env-activated "
        "hook in benchmarks/apps/taskframe_app.py); producer: the one-call enqueue of N tasks ÷ N; worker: "
        "every call of the worker process (start-up, receives, deletes, its last idle long poll) ÷ the "
        "tasks it ran, written by the worker at exit",
        "Celery: skipped: kombu's SQS transport needs pycurl, not installed here",
    ]
    return plain_section(title, rows, found, keys)


class Unavailable(Exception):
    """A broker asked for by name cannot run here."""


def pick_brokers(choice: str, redis_at: str | None, rabbit_at: str | None) -> tuple[list[str], list[str]]:
    """The runs ``--broker choice`` asks for that can run here, and notes on those skipped."""
    if choice == "all":
        brokers = ["sqlite", "redis", "backends", "sqs", "amqp"]
    elif choice == "auto":
        brokers = ["sqlite", "redis"]
    else:
        brokers = [choice]
    down = {
        "redis": f"nothing answers at {REDIS_URL}" if redis_at is None else None,
        "sqs": f"its results go to Redis, which does not answer at {REDIS_URL}" if redis_at is None else None,
        "amqp": (
            f"RabbitMQ does not answer at {AMQP_URL}"
            if rabbit_at is None
            else (f"its results go to Redis, which does not answer at {REDIS_URL}" if redis_at is None else None)
        ),
    }
    skipped = []
    for broker in list(brokers):
        why = down.get(broker)
        if why is None:
            continue
        if choice == broker or (choice == "all" and broker == "redis"):  # as before: all needs Redis
            msg = f"{broker}: {why}"
            raise Unavailable(msg)
        brokers.remove(broker)
        skipped.append(f"{broker}: skipped: {why}")
    return brokers, skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)  # tests.db_services, tests.conformance.sqs_server
    redis_at = redis_version()
    rabbit_at = amqp_version() if args.broker in ("amqp", "all") else None
    try:
        brokers, skipped_brokers = pick_brokers(args.broker, redis_at, rabbit_at)
    except Unavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    systems = all_systems()
    names = args.systems if any(b in ("sqlite", "redis", "amqp") for b in brokers) else ["taskframe"]
    versions = list(dict.fromkeys(systems[name].versions() for name in names))
    sections = []
    for b in brokers:
        if b == "backends":
            sections.append(backends_section(args.tasks, args.reps, args.budget, redis_at is not None))
        elif b == "sqs":
            sections.append(sqs_section(args.tasks, args.reps, args.budget))
        else:
            try:
                with queue_version_policy(args.amqp_queue_version if b == "amqp" else None):
                    rows = run_broker(b, args.systems, args.tasks, args.reps, args.budget)
            except Unavailable as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            found = notes(b, args.tasks, args.reps, args.budget)
            if b == "amqp" and args.amqp_queue_version:
                found.append(
                    f"classic queues version {args.amqp_queue_version} for every system (a RabbitMQ policy "
                    f"`queue-version: {args.amqp_queue_version}` on the run's queues, `{BENCH_QUEUES}`; "
                    "queue declarations unchanged)"
                )
            sections.append(broker_section(TITLES[b], rows, found))
    print("## taskframe benchmarks\n")
    uses_redis = any(b in ("redis", "backends", "sqs", "amqp") for b in brokers)
    about = machine(versions, redis_at if uses_redis else None)
    if rabbit_at and "amqp" in brokers:
        about = about.rstrip("\n") + f"\n- RabbitMQ server {rabbit_at}\n"
    print(about)
    command = " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)])
    print(f"Command: `{command}`\n")
    for section in sections:
        print(section)
    for line in skipped_brokers:
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
