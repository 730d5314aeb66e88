"""A taskframe worker's memory on Redis, idle and then with a deep queue: ``python -m benchmarks.memory_redis``.

The question (issue #5): does a worker's memory grow with what waits in Redis? A real
``taskframe worker -P solo`` starts on an empty queue; its RSS once settled is "idle". Then
this process queues ``--tasks`` tasks, half of them delayed by an hour, while the worker
drains the ready half; RSS is sampled every 50 ms until the ready half is done. The
delayed half stays in Redis to the end (a worker that loaded it would show it).

Runs in Redis database 15 on 127.0.0.1:6379 with a queue and key prefix of its own, and
deletes its keys at the end: it never flushes a database, so it can run beside the other
benchmarks (which use database 14). Prints a markdown table to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import redis

from benchmarks.common import REDIS_URL  # the benchmarks' own database; the tests keep to others
from taskframe import App

#: Tasks per ``send_many`` call.
BATCH = 1000
#: Seconds the worker gets to settle before "idle" is read, and between two RSS samples.
SETTLE_S, SAMPLE_S = 3.0, 0.05
#: The delayed half waits this long: well past the run.
DELAY_S = 3600

APP_MODULE = """
from taskframe import App

app = App("memory", broker={url!r}, backend=None, default_queue={queue!r},
          broker_options={{"key_prefix": {prefix!r}}})


@app.task(name="memory.noop", ignore_result=True)
def noop(a, b):
    return a + b
"""


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid``, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    msg = f"no VmRSS in /proc/{pid}/status"
    raise RuntimeError(msg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_redis", description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks queued, half delayed (default 100000)")
    args = parser.parse_args(argv)
    ready_n = args.tasks - args.tasks // 2
    queue, prefix = f"mem-{uuid.uuid4().hex[:8]}", f"tfmem{uuid.uuid4().hex[:6]}"
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    with tempfile.TemporaryDirectory(prefix="tf-memory-") as directory:
        with open(os.path.join(directory, "memapp.py"), "w") as out:
            out.write(APP_MODULE.format(url=REDIS_URL, queue=queue, prefix=prefix))
        app = App("memory", broker=REDIS_URL, backend=None, default_queue=queue, broker_options={"key_prefix": prefix})
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([directory, os.environ.get("PYTHONPATH", "")])}
        command = [os.path.join(os.path.dirname(sys.executable), "taskframe"), "worker", "-A", "memapp:app"]
        worker = subprocess.Popen([*command, "-P", "solo", "-l", "warning"], cwd=directory, env=env)
        try:
            time.sleep(SETTLE_S)
            idle = rss_mb(worker.pid)
            print(f"idle worker: {idle:.1f} MB; queueing {args.tasks:,} tasks", file=sys.stderr)
            peak = idle
            started = time.monotonic()
            for low in range(0, args.tasks, BATCH):
                batch = range(low, min(low + BATCH, args.tasks))
                # Delayed first: they are in Redis for the whole drain.
                options = {"countdown": DELAY_S} if low < args.tasks // 2 else {}
                app.send_many([("memory.noop", (i, i), {}, options) for i in batch])
                peak = max(peak, rss_mb(worker.pid))
            queued_s = time.monotonic() - started
            stats = app.broker.stats(queue)
            print(f"queued in {queued_s:.1f}s: {stats}", file=sys.stderr)
            while True:
                peak = max(peak, rss_mb(worker.pid))
                stats = app.broker.stats(queue)
                if stats.ready == 0 and stats.reserved == 0:
                    break
                if worker.poll() is not None:
                    msg = f"the worker exited with {worker.returncode} during the drain"
                    raise RuntimeError(msg)
                time.sleep(SAMPLE_S)
            drained_s = time.monotonic() - started
            after = rss_mb(worker.pid)
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            app.close()
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            for i in range(0, len(keys), 1000):
                client.delete(*keys[i : i + 1000])
    print(f"## Worker memory on Redis ({args.tasks:,} tasks queued, {args.tasks // 2:,} of them delayed {DELAY_S} s)")
    print()
    print("| worker | idle RSS MB | peak RSS MB, queue deep | RSS MB after the drain | peak - idle MB | drained |")
    print("|---|---|---|---|---|---|")
    print(
        f"| taskframe -P solo | {idle:.1f} | {peak:.1f} | {after:.1f} | {peak - idle:+.1f} |"
        f" {ready_n:,} ready in {drained_s:.1f}s; {stats.delayed:,} still delayed |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
