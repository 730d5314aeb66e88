"""`make demo`: start a worker on the embedded default, run each example, stop the worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLES = ["01_task.py", "02_chain.py", "03_low_priority.py", "04_rq_enqueue.py"]


def main() -> int:
    for stale in HERE.glob("taskframe.sqlite3*"):
        stale.unlink()
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    env.pop("TASKFRAME_BROKER_URL", None)
    env.pop("TASKFRAME_RESULT_BACKEND", None)
    worker_cmd = [
        sys.executable,
        "-m",
        "taskframe",
        "worker",
        "-A",
        "tasks",
        "-Q",
        "celery,low-priority",
        "-c",
        "2",
        "-l",
        "warning",
    ]
    print("$ taskframe worker -A tasks -Q celery,low-priority -c 2", flush=True)
    worker = subprocess.Popen(worker_cmd, cwd=HERE, env=env)
    failed = 0
    try:
        for example in EXAMPLES:
            print(f"\n$ python {example}", flush=True)
            done = subprocess.run([sys.executable, example], cwd=HERE, env=env, timeout=120, check=False)
            failed += done.returncode != 0
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=60)
        print(f"\nworker stopped (exit code {code})")
        for stale in HERE.glob("taskframe.sqlite3*"):
            stale.unlink()
    return 1 if failed or code else 0


if __name__ == "__main__":
    sys.exit(main())
