"""Checked by mypy in `make test`, never run: a wrong call must be a type error.

Each `type: ignore[...]` below is needed only if mypy sees the mistake; with
warn_unused_ignores (part of --strict) an ignore that is not needed fails the check, so a
lost ParamSpec on delay() breaks the build.
"""

from taskframe import App, AsyncResult

app = App("typing", broker="memory://", backend="memory://")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(bind=True, queue="low")
def fetch(self: object, url: str) -> str:
    return url


ok: AsyncResult[int] = add.delay(1, 2)
total: int = add(1, 2)
add.delay(1, "x")  # type: ignore[arg-type]
add.delay(1)  # type: ignore[call-arg]
fetched: AsyncResult[str] = fetch.delay("https://example.org")
fetch.delay(3)  # type: ignore[arg-type]
