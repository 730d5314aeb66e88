"""The markdown the harness prints: the machine, then per broker a table of medians (min–max)
and a table of ratios taskframe ÷ peer."""

from __future__ import annotations

import datetime
import os
import platform
import sqlite3
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

#: (key, column title); the key is what the driver's scenarios return.
METRICS: list[tuple[str, str]] = [
    ("enqueue_one", "enqueue/s, one call"),
    ("enqueue_batched", "enqueue/s, batched"),
    ("drain_1", "drain/s, 1 proc, no results"),
    ("drain_1_results", "drain/s, 1 proc, results"),
    ("drain_2", "drain/s, 2 procs, results"),
    ("rtt_p50_ms", "round trip p50 ms"),
    ("rtt_p99_ms", "round trip p99 ms"),
    ("rss_mb", "worker peak RSS MB"),
]
#: Metrics only some runs measure.
EXTRA_METRICS: list[tuple[str, str]] = [
    ("calls_producer", "SQS calls/task, producer (one call)"),
    ("calls_worker", "SQS calls/task, worker"),
]
TITLES = dict(METRICS + EXTRA_METRICS)


@dataclass
class Row:
    """One system's measurements on one broker: each metric's value per repetition."""

    system: str
    values: dict[str, list[float]] = field(default_factory=dict)
    #: Metric -> task counts of the repetitions whose phase stopped at the time budget.
    capped: dict[str, list[int]] = field(default_factory=dict)
    not_applicable: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    skipped: str | None = None

    def add(self, found: dict[str, float]) -> None:
        """Add one repetition's measurements of a scenario (see benchmarks.driver)."""
        for key, value in found.items():
            if key.endswith("_tasks"):
                self.capped.setdefault(key.removesuffix("_tasks"), []).append(int(value))
            else:
                self.values.setdefault(key, []).append(value)

    def median(self, key: str) -> float | None:
        found = self.values.get(key)
        return statistics.median(found) if found else None


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def cell(row: Row, key: str) -> str:
    if row.skipped:
        return "—"
    if key in row.not_applicable:
        return "n/a"
    found = row.values.get(key)
    if not found:
        return "error" if row.errors else "—"
    text = _number(statistics.median(found))
    if len(found) > 1:
        text += f" ({_number(min(found))}–{_number(max(found))})"
    if key in row.capped:
        text += f" † [{min(row.capped[key]):,}]"
    return text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["--:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def broker_section(title: str, rows: Sequence[Row], notes: Sequence[str]) -> str:
    header = ["system", *(t for _k, t in METRICS)]
    lines = [f"### {title}", ""]
    lines += _table(header, [[r.system, *(cell(r, k) for k, _t in METRICS)] for r in rows])
    ours = next((r for r in rows if r.system == "taskframe" and not r.skipped), None)
    peers = [r for r in rows if r.system != "taskframe" and not r.skipped]
    if ours is not None and peers:
        lines += ["", "taskframe ÷ peer, medians (rates: above 1 is taskframe ahead; latency and RSS: below 1 is):", ""]
        lines += _table(["peer", *(t for _k, t in METRICS)], [[p.system, *_ratios(ours, p)] for p in peers])
    lines.append("")
    for row in rows:
        if row.skipped:
            lines.append(f"- {row.system}: skipped: {row.skipped}")
        lines += [f"- {row.system}: error: {error}" for error in row.errors]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plain_section(
    title: str,
    rows: Sequence[Row],
    notes: Sequence[str],
    keys: Sequence[str],
    baseline: str | None = None,
    first: str = "system",
) -> str:
    """One table of ``keys``; with ``baseline``, a column row ÷ that row per key."""
    header = [first, *(TITLES[k] for k in keys)]
    base = next((r for r in rows if r.system == baseline and not r.skipped), None)
    if base is not None:
        header += [f"{TITLES[k]} ÷ {baseline}" for k in keys]
    body = []
    for row in rows:
        cells = [row.system, *(cell(row, k) for k in keys)]
        if base is not None:
            for key in keys:
                a, b = row.median(key), base.median(key)
                cells.append(f"{a / b:.2f}×" if a is not None and b and not row.skipped else "—")
        body.append(cells)
    lines = [f"### {title}", "", *_table(header, body), ""]
    for row in rows:
        if row.skipped:
            lines.append(f"- {row.system}: skipped: {row.skipped}")
        lines += [f"- {row.system}: error: {error}" for error in row.errors]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _ratios(ours: Row, peer: Row) -> list[str]:
    out = []
    for key, _title in METRICS:
        a, b = ours.median(key), peer.median(key)
        out.append(f"{a / b:.2f}×" if a is not None and b else "—")
    return out


def machine(versions: Sequence[str], redis_version: str | None) -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"
        + (f", Redis server {redis_version}" if redis_version else ""),
        f"- {'; '.join(versions)}",
    ]
    return "\n".join(lines) + "\n"
