"""The benchmark's task modules, one per system, written as a user of that system would.

Workers import them by name (``taskframe worker -A benchmarks.apps.taskframe_app``, ...);
they read the run's settings from ``BENCH_*`` variables at import, so import them only in a
process that the harness started. Every one defines the same task: add one to the end
marker, return ``x + y``.
"""
