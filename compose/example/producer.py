"""Sends a batch of work, waits for every result, and prints a summary."""

import sys

from tasks import add, build_report, tsum

from taskframe import chord, group

#: Seconds to wait for each result (the workers may still be starting).
TIMEOUT_S = 60


def main() -> int:
    sums = [add.delay(i, i) for i in range(100)]
    total = chord(group(add.s(i, i) for i in range(10)), tsum.s()).delay()
    chained = (add.s(4, 4) | add.s(8) | add.s(16)).delay()
    report = build_report.delay("monthly")

    values = [result.get(timeout=TIMEOUT_S) for result in sums]
    if values != [2 * i for i in range(100)]:
        print(f"unexpected results: {values}", file=sys.stderr)
        return 1
    print("100 additions: done")
    print(f"chord: {total.get(timeout=TIMEOUT_S)}")
    print(f"chain: {chained.get(timeout=TIMEOUT_S)}")
    print(f"low-priority queue: {report.get(timeout=TIMEOUT_S)}")
    print("all results arrived")
    return 0


if __name__ == "__main__":
    sys.exit(main())
