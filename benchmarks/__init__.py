"""Benchmarks: taskframe beside Huey, Celery, Dramatiq and RQ on the same brokers.

Run ``make bench`` (or ``python -m benchmarks --help``). The peers are benchmark-only
dependencies (``benchmarks/requirements.txt``); the taskframe package never needs them.

Layout: ``__main__`` runs the repetitions and prints the report (``report``); ``driver``
runs one scenario of one system in its own process; ``systems/`` says how to drive each
system; ``apps/`` holds the task module each system's workers import; ``common`` has the
run's settings and the end-marker counter. Opt-in runs (``--broker backends``, ``sqs``,
``amqp``): taskframe with each result backend, taskframe on SQS (moto), taskframe and Celery
on RabbitMQ.
"""
