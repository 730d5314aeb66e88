"""The seed's third example: send a task to the `low-priority` queue.

Only workers started with `-Q celery,low-priority` (or `-Q low-priority`) run it.
"""

from tasks import add

if __name__ == "__main__":
    result = add.apply_async(args=[4, 6], queue="low-priority")
    print(f"Task state: {result.state}")
    print(f"Result: {result.get(timeout=30)}")
    print(f"Task state: {result.state}")
