"""AsyncResult: a handle on a task's state and result, read from the result backend."""

from __future__ import annotations

import datetime
import importlib
import time
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from . import states
from .backend import ResultRecord, poll_until_ready
from .exceptions import TaskError, TaskRevokedError, TimeoutError

if TYPE_CHECKING:
    from .app import App

R = TypeVar("R")


def encode_exception(exc: BaseException) -> dict[str, Any]:
    """Celery's stored form of an exception."""
    cls = type(exc)
    return {
        "exc_type": cls.__qualname__,
        "exc_module": cls.__module__,
        "exc_message": list(_jsonable_args(exc)),
    }


def _jsonable_args(exc: BaseException) -> list[Any]:
    out: list[Any] = []
    for arg in exc.args:
        out.append(arg if isinstance(arg, str | int | float | bool | type(None)) else repr(arg))
    return out


def decode_exception(payload: Any, traceback: str | None = None) -> Exception:
    """Rebuild the task's own exception when its class is importable, else a TaskError."""
    if not isinstance(payload, dict) or "exc_type" not in payload:
        return TaskError("Exception", str(payload), traceback)
    exc_type = str(payload["exc_type"])
    exc_module = str(payload.get("exc_module") or "builtins")
    message = payload.get("exc_message")
    args = tuple(message) if isinstance(message, list | tuple) else (message,)
    text = ", ".join(str(a) for a in args)
    qualified = exc_type if exc_module == "builtins" else f"{exc_module}.{exc_type}"
    cls = _import_exception_class(exc_module, exc_type)
    if cls is not None:
        try:
            exc = cls(*args)
        except Exception:  # a class whose __init__ wants other arguments
            return TaskError(qualified, text, traceback)
        if traceback:
            # PEP 678 notes (shown under the traceback); set directly to work on Python 3.10 too.
            vars(exc)["__notes__"] = [f"remote traceback:\n{traceback}"]
        return exc
    return TaskError(qualified, text, traceback)


def _import_exception_class(module: str, qualname: str) -> type[Exception] | None:
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError):
        return None
    if isinstance(obj, type) and issubclass(obj, Exception):
        return obj
    return None


class AsyncResult(Generic[R]):
    """The state and result of one task. Every read asks the backend (nothing is cached
    but a ready record, which cannot change)."""

    def __init__(
        self,
        id: str,
        app: App | None = None,
        *,
        parent: AsyncResult[Any] | None = None,
        task_name: str | None = None,
    ) -> None:
        if app is None:
            from .app import current_app  # here: app imports this module

            app = current_app()
        self.id = id
        self.app = app
        self.parent = parent
        self.task_name = task_name
        self._ready_record: ResultRecord | None = None

    def __repr__(self) -> str:
        return f"<AsyncResult: {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def _record(self) -> ResultRecord | None:
        if self._ready_record is not None:
            return self._ready_record
        record = self.app.backend.fetch(self.id)
        if record is not None and record.get("status") in states.READY_STATES:
            self._ready_record = record
        return record

    @property
    def state(self) -> str:
        record = self._record()
        return str(record["status"]) if record else states.PENDING

    status = state

    @property
    def info(self) -> Any:
        """The result, the exception of a failure, or a custom state's meta; None while pending."""
        record = self._record()
        if record is None:
            return None
        if record.get("status") in states.EXCEPTION_STATES:
            return decode_exception(record.get("result"), record.get("traceback"))
        return record.get("result")

    result = info

    @property
    def traceback(self) -> str | None:
        record = self._record()
        return record.get("traceback") if record else None

    @property
    def date_done(self) -> datetime.datetime | None:
        record = self._record()
        if not record or not record.get("date_done"):
            return None
        return datetime.datetime.fromisoformat(str(record["date_done"]))

    @property
    def children(self) -> list[AsyncResult[Any] | GroupResult]:
        """The tasks this one sent while it ran, as stored (Celery's result tuples)."""
        record = self._record()
        return [result_from_tuple(c, self.app) for c in (record or {}).get("children") or []]

    def ready(self) -> bool:
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        return self.state == states.FAILURE

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.1) -> R:
        """Wait for the task to finish and return its result.

        Raises the task's own exception (or :class:`TaskError`) when it failed and
        ``propagate`` is true, :class:`TaskRevokedError` when it was revoked or expired, and
        :class:`taskframe.exceptions.TimeoutError` after ``timeout`` seconds.
        """
        record = self._wait(timeout, interval)
        status = record.get("status")
        if status == states.SUCCESS:
            return cast(R, record.get("result"))
        if not propagate:
            return self.info  # type: ignore[no-any-return]
        if status == states.REVOKED:
            msg = f"task {self.id} was revoked: {self.info}"
            raise TaskRevokedError(msg)
        raise decode_exception(record.get("result"), record.get("traceback"))

    wait = get

    def _wait(self, timeout: float | None, interval: float) -> ResultRecord:
        if self._ready_record is not None:
            return self._ready_record
        backend = self.app.backend
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # Wait in slices so that an unbounded get() still notices a backend it must reopen.
            slice_s = 5.0 if deadline is None else max(0.0, deadline - time.monotonic())
            if backend.supports_wait:
                record = backend.wait(self.id, min(slice_s, 5.0))
            else:
                record = poll_until_ready(backend, self.id, min(slice_s, 5.0), max_interval_s=interval)
            if record is not None:
                self._ready_record = record
                return record
            if deadline is not None and time.monotonic() >= deadline:
                msg = f"task {self.id} did not finish within {timeout}s (state {self.state})"
                raise TimeoutError(msg)

    def forget(self) -> None:
        self._ready_record = None
        self.app.backend.forget(self.id)

    def revoke(self, terminate: bool = False) -> None:
        self.app.control_revoke(self.id, terminate=terminate)

    def as_tuple(self) -> tuple[tuple[str, Any], None]:
        """Celery's serialized handle, ``((id, parent tuple), None)``: see :func:`result_from_tuple`."""
        return (self.id, self.parent.as_tuple() if self.parent else None), None


class GroupResult:
    """The results of a group, in the group's order."""

    def __init__(self, id: str, results: list[AsyncResult[Any]], app: App | None = None) -> None:
        from .app import current_app

        self.id = id
        self.results = results
        self.app = app or current_app()

    def __repr__(self) -> str:
        return f"<GroupResult: {self.id} [{', '.join(r.id for r in self.results)}]>"

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Any:
        return iter(self.results)

    def __getitem__(self, index: int) -> AsyncResult[Any]:
        return self.results[index]

    def ready(self) -> bool:
        return all(r.ready() for r in self.results)

    def successful(self) -> bool:
        return all(r.successful() for r in self.results)

    def failed(self) -> bool:
        return any(r.failed() for r in self.results)

    def completed_count(self) -> int:
        return sum(1 for r in self.results if r.successful())

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.1) -> list[Any]:
        """Every result in order; waits at most ``timeout`` seconds in all."""
        deadline = None if timeout is None else time.monotonic() + timeout
        values = []
        for result in self.results:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            values.append(result.get(timeout=remaining, propagate=propagate, interval=interval))
        return values

    join = get

    def revoke(self, terminate: bool = False) -> None:
        for result in self.results:
            result.revoke(terminate=terminate)

    def forget(self) -> None:
        for result in self.results:
            result.forget()
        self.app.backend.delete(f"group-meta-{self.id}")

    def as_tuple(self) -> tuple[tuple[str, None], list[Any]]:
        """Celery's serialized handle, ``((id, None), [member tuples])``."""
        return (self.id, None), [r.as_tuple() for r in self.results]

    def save(self) -> None:
        """Store the members, so ``app.GroupResult.restore(id)`` works anywhere.

        ``result`` is Celery's layout (its ``GroupResult.restore`` reads it from the Redis
        backend's ``celery-taskset-meta-<id>``); ``results``, the plain ids, is what a
        chord's last header task reads.
        """
        self.app.backend.put(
            f"group-meta-{self.id}",
            {"result": self.as_tuple(), "group_id": self.id, "results": [r.id for r in self.results]},
            ttl_s=self.app.conf.result_expires,
        )

    @classmethod
    def restore(cls, group_id: str, app: App | None = None) -> GroupResult | None:
        """The group saved under ``group_id`` by taskframe or by Celery, or None."""
        from .app import current_app

        app = app or current_app()
        meta = app.backend.get(f"group-meta-{group_id}")
        if meta is None:
            return None
        if "results" in meta:
            return cls(group_id, [AsyncResult(str(i), app) for i in meta["results"]], app=app)
        restored = result_from_tuple(meta.get("result"), app)
        if not isinstance(restored, GroupResult):
            msg = f"group {group_id}: the stored metadata is not a group's ({meta.get('result')!r})"
            raise ValueError(msg)
        return restored

    def as_parent(self) -> AsyncResult[Any]:
        """An AsyncResult standing for the group, for ``.parent`` links of a chord."""
        return AsyncResult(self.id, self.app)


def result_from_tuple(value: Any, app: App) -> AsyncResult[Any] | GroupResult:
    """A result handle from Celery's serialized form (``children``, group metadata): a task id,
    ``[[id, parent], None]`` for a task, or ``[[id, parent], [members]]`` for a group."""
    if isinstance(value, str):
        return AsyncResult(value, app)
    try:
        head, members = value
        task_id, parent = head if isinstance(head, list | tuple) else (head, None)
    except (TypeError, ValueError):
        msg = f"not a result tuple as Celery writes one: {value!r}"
        raise ValueError(msg) from None
    if members is not None:
        # A member may be a nested group, as in Celery: it answers ready(), get() and the rest too.
        nested = cast(list[AsyncResult[Any]], [result_from_tuple(m, app) for m in members])
        return GroupResult(str(task_id), nested, app=app)
    parent_result = result_from_tuple(parent, app) if parent else None
    return AsyncResult(str(task_id), app, parent=parent_result if isinstance(parent_result, AsyncResult) else None)
