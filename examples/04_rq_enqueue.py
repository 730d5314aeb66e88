"""The seed's RQ example: enqueue a plain function, then poll until the result is set."""

import time

from tasks import app

if __name__ == "__main__":
    job = app.enqueue(sum, [42, 43])
    deadline = time.monotonic() + 30
    while job.result is None:  # stays None until a worker has run it, as with RQ
        if time.monotonic() > deadline:
            raise SystemExit("no result after 30 s: is a worker running?")
        time.sleep(0.1)
    print(f"Result: {job.result}")
