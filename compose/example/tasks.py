"""The example's tasks, imported by both workers (-A tasks) and by the producer.

The broker and the result backend come from TASKFRAME_BROKER_URL and
TASKFRAME_RESULT_BACKEND, which docker-compose.yml sets for every container.
"""

import time

from taskframe import App

app = App("tasks")


@app.task
def add(x, y):
    return x + y


@app.task
def tsum(numbers):
    return sum(numbers)


@app.task(queue="low-priority")
def build_report(name):
    time.sleep(0.5)  # stands for slow work that must not hold up the rest
    return f"report {name} ready"
