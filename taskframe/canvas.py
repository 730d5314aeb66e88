"""Signatures and the canvas: chain, group, chord.

Everything travels in the message protocol's ``embed`` (Celery protocol v2): a chain is the
list of signatures still to run, last first; a chord is a group whose tasks carry the body
and count their completions with an atomic counter in the result backend. No task polls.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .result import AsyncResult, GroupResult

if TYPE_CHECKING:
    from .app import App
    from .task import Request

#: Options a signature keeps in its dict form; the rest of apply_async's are per call.
_SIGNATURE_OPTION_KEYS = frozenset(
    {
        "queue",
        "countdown",
        "eta",
        "expires",
        "priority",
        "task_id",
        "link",
        "link_error",
        "headers",
        "ignore_result",
        "time_limit",
        "soft_time_limit",
        "serializer",
    }
)


class Signature:
    """A task name with arguments and options, to be called later: ``add.s(2, 2)``."""

    def __init__(
        self,
        task: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        immutable: bool = False,
        app: App | None = None,
    ) -> None:
        self.task = task
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.options = dict(options or {})
        self.immutable = immutable
        self._app = app

    @property
    def app(self) -> App:
        from .app import current_app

        return self._app or current_app()

    def __repr__(self) -> str:
        args = ", ".join([*map(repr, self.args), *(f"{k}={v!r}" for k, v in self.kwargs.items())])
        return f"{self.task}({args}){'!' if self.immutable else ''}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Signature) and other.to_dict() == self.to_dict()

    def __or__(self, other: Signature) -> chain:
        if isinstance(other, chain):
            return chain(self, *other.tasks)
        if isinstance(other, Signature):
            return chain(self, other)
        return NotImplemented

    def to_dict(self) -> dict[str, Any]:
        """Celery's dict form of a signature, as it travels in ``embed``."""
        return {
            "task": self.task,
            "args": list(self.args),
            "kwargs": dict(self.kwargs),
            "options": {
                k: (_as_dicts(v) if k in ("link", "link_error") else v)
                for k, v in self.options.items()
                if k in _SIGNATURE_OPTION_KEYS
            },
            "subtask_type": None,
            "immutable": self.immutable,
            "chord_size": None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], app: App | None = None) -> Signature:
        return cls(
            str(data["task"]),
            data.get("args") or (),
            data.get("kwargs") or {},
            data.get("options") or {},
            immutable=bool(data.get("immutable")),
            app=app,
        )

    def clone(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any) -> Signature:
        """A copy with ``args`` appended (prepended to nothing: Celery's partial), ``kwargs``
        merged and options updated; an immutable signature ignores new arguments."""
        new_args = self.args if self.immutable else (*args, *self.args)
        new_kwargs = self.kwargs if self.immutable else {**self.kwargs, **(kwargs or {})}
        return Signature(
            self.task,
            new_args,
            new_kwargs,
            {**self.options, **options},
            immutable=self.immutable,
            app=self._app,
        )

    def set(self, **options: Any) -> Signature:
        self.options.update(options)
        return self

    def freeze(self) -> str:
        """Fix the task id now (so a result handle exists before sending); return it."""
        self.options.setdefault("task_id", str(uuid.uuid4()))
        return str(self.options["task_id"])

    def apply_async(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> AsyncResult[Any]:
        sig = self.clone(args, kwargs, **options)
        task = sig.app.tasks.get(sig.task)
        if task is not None:
            call_args, call_kwargs = task.bind_arguments(sig.args, sig.kwargs)
        else:
            call_args, call_kwargs = list(sig.args), dict(sig.kwargs)
        return sig.app._send(sig.task, call_args, call_kwargs, sig.options)

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult[Any]:
        return self.apply_async(args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run here and now, like calling the task itself."""
        sig = self.clone(args, kwargs)
        return sig.app.get_task(sig.task)(*sig.args, **sig.kwargs)


class chain(Signature):
    """Tasks run one after the other, each result prepended to the next task's args
    (unless the next one is immutable, ``.si()``): ``add.s(4, 4) | add.s(8)``."""

    def __init__(self, *tasks: Signature | Iterable[Signature], app: App | None = None) -> None:
        flat: list[Signature] = []
        for item in tasks:
            if isinstance(item, chain):
                flat.extend(item.tasks)
            elif isinstance(item, Signature):
                flat.append(item)
            else:
                flat.extend(item)
        if not flat:
            msg = "chain() needs at least one signature"
            raise ValueError(msg)
        self.tasks: list[Signature] = flat
        super().__init__("taskframe.chain", app=app or flat[0]._app)

    def __repr__(self) -> str:
        return " | ".join(repr(t) for t in self.tasks)

    def __or__(self, other: Signature) -> chain:
        if isinstance(other, Signature):
            return chain(*self.tasks, other)
        return NotImplemented

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "subtask_type": "chain",
            "kwargs": {"tasks": [t.to_dict() for t in self.tasks]},
        }

    def apply_async(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> AsyncResult[Any]:
        """Send the first task, carrying the rest in ``embed.chain``; return the last
        task's result, whose ``.parent`` leads back along the chain."""
        first, *rest = self.tasks
        ids = [t.options.get("task_id") or str(uuid.uuid4()) for t in self.tasks]
        remaining = []
        for sig, task_id in zip(rest, ids[1:], strict=True):
            remaining.append(sig.clone(task_id=task_id).to_dict())
        remaining.reverse()  # the worker pops from the end
        head = first.clone(args, kwargs, task_id=ids[0], **options)
        if remaining:
            head.options["chain"] = remaining
        head.apply_async()
        result: AsyncResult[Any] | None = None
        for sig, task_id in zip(self.tasks, ids, strict=True):
            result = AsyncResult(task_id, self.app, parent=result, task_name=sig.task)
        assert result is not None
        return result


class group(Signature):
    """Tasks run in parallel; ``.get()`` on the result is the list of results in order."""

    def __init__(self, *tasks: Signature | Iterable[Signature], app: App | None = None) -> None:
        flat: list[Signature] = []
        for item in tasks:
            if isinstance(item, Signature) and not isinstance(item, group):
                flat.append(item)
            elif isinstance(item, group):
                flat.extend(item.tasks)
            else:
                flat.extend(item)
        self.tasks: list[Signature] = flat
        super().__init__("taskframe.group", app=app or (flat[0]._app if flat else None))

    def __repr__(self) -> str:
        return f"group({', '.join(repr(t) for t in self.tasks)})"

    def __len__(self) -> int:
        return len(self.tasks)

    def apply_async(  # type: ignore[override]  # Celery's group returns a GroupResult
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> GroupResult:
        group_id = str(options.pop("group_id", None) or uuid.uuid4())
        return self._send(group_id, args, kwargs, options, chord=None)

    def _send(
        self,
        group_id: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
        chord: dict[str, Any] | None,
    ) -> GroupResult:
        app = self.app
        calls = []
        for index, sig in enumerate(self.tasks):
            clone = sig.clone(args, kwargs, **options)
            clone.options.update(group_id=group_id, group_index=index)
            clone.freeze()
            if chord is not None:
                clone.options["chord"] = chord
            task = app.tasks.get(clone.task)
            call_args, call_kwargs = (
                task.bind_arguments(clone.args, clone.kwargs) if task else (list(clone.args), dict(clone.kwargs))
            )
            calls.append((clone.task, call_args, call_kwargs, clone.options))
        ids = [str(c[3]["task_id"]) for c in calls]
        result = GroupResult(group_id, [AsyncResult(i, app) for i in ids], app=app)
        # Saved before sending: a chord's last header task reads the member ids from it.
        result.save()
        app.send_many(calls)
        return result


class chord(Signature):
    """A group (the header) whose results, in order, are passed to one task (the body)
    when the last header task finishes: ``chord(group(...), tsum.s())`` or
    ``chord(header)(body)``. A header failure fails the chord with ChordError."""

    def __init__(
        self,
        header: group | Iterable[Signature],
        body: Signature | None = None,
        app: App | None = None,
    ) -> None:
        self.header = header if isinstance(header, group) else group(*header)
        self.body = body
        super().__init__("taskframe.chord", app=app or self.header._app)

    def __call__(self, body: Signature | None = None, **options: Any) -> AsyncResult[Any]:
        if body is not None:
            return chord(self.header, body, app=self._app).apply_async(**options)
        return self.apply_async(**options)

    def apply_async(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> AsyncResult[Any]:
        if self.body is None:
            msg = "chord() needs a body: chord(header, body) or chord(header)(body)"
            raise ValueError(msg)
        body = self.body.clone()
        body_id = body.freeze()
        group_id = str(options.pop("group_id", None) or uuid.uuid4())
        if not self.header.tasks:
            return body.apply_async(([],))
        spec = {"body": body.to_dict(), "group_id": group_id, "chord_size": len(self.header.tasks)}
        header_result = self.header._send(group_id, args, kwargs, options, chord=spec)
        return AsyncResult(body_id, self.app, parent=header_result.as_parent(), task_name=body.task)


def _as_dicts(value: Any) -> list[dict[str, Any]]:
    items = value if isinstance(value, list | tuple) else [value]
    return [item.to_dict() if isinstance(item, Signature) else dict(item) for item in items]


def signature(
    name: str | Signature,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    app: App | None = None,
    **options: Any,
) -> Signature:
    """A signature by task name; ``app`` defaults to the most recently created App."""
    if isinstance(name, Signature):
        return name
    return Signature(name, args, kwargs, options, app=app)


def resend_options(request: Request) -> dict[str, Any]:
    """Options that send a running task's message again as the same task (a retry)."""
    embed = request.embed or {}
    options: dict[str, Any] = {
        "task_id": request.id,
        "root_id": request.root_id,
        "parent_id": request.parent_id,
        "group_id": request.group,
        "queue": request.delivery_info.get("queue"),
        "link": embed.get("callbacks"),
        "link_error": embed.get("errbacks"),
        "chain": embed.get("chain"),
        "chord": embed.get("chord"),
        "countdown": None,
        "eta": None,
    }
    if request.expires:
        from .message import parse_isoformat

        options["expires"] = parse_isoformat(request.expires)
    hard, soft = request.timelimit
    if hard is not None:
        options["time_limit"] = hard
    if soft is not None:
        options["soft_time_limit"] = soft
    return options
