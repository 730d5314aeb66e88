"""The demo's tasks: the seed's `add`, on the embedded SQLite default (no server needed).

Start a worker for them with:  taskframe worker -A tasks -Q celery,low-priority
"""

from taskframe import App

# No URLs: the broker and the results live in ./taskframe.sqlite3.
# enqueue_allow lets workers run the plain function builtins.sum for the RQ-style example.
app = App("tasks", enqueue_allow=["builtins.sum"])


@app.task
def add(x: int, y: int) -> int:
    return x + y
