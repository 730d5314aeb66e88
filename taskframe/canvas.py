"""Signatures and the canvas: chain, group, chord.

Everything travels in the message protocol's ``embed`` (Celery protocol v2): a chain is the
list of signatures still to run, last first; a chord is a group whose tasks carry the body's
signature in ``embed.chord`` (with ``chord_size``), their group in the ``group`` and
``group_index`` headers, as Celery sends them, and report their results to the result backend,
which tells the one that completes the header to send the body. No task polls.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .backend import chord_joiner
from .message import SEND_OPTIONS
from .result import AsyncResult, GroupResult

if TYPE_CHECKING:
    from .app import App
    from .task import Request

#: Options a signature keeps in its dict form: apply_async's, less those a worker sets on each
#: message it sends (the retry count, parent and root ids, shadow name).
_SIGNATURE_OPTION_KEYS = SEND_OPTIONS - {"retries", "parent_id", "root_id", "shadow"}

#: Options Celery writes into a signature's dict form that have no meaning here (``reply_to``
#: names Celery's RPC result queue; stamps are Celery's) and that apply_async would refuse.
#: Dropped on receipt, so a chain or callback sent by Celery runs on a taskframe worker.
_CELERY_ONLY_OPTION_KEYS = frozenset(
    {"reply_to", "stamped_headers", "stamps", "replaced_task_nesting", "exchange", "routing_key"}
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
        """Rebuild a signature (or chain, group, chord) from its dict form."""
        kind = data.get("subtask_type")
        kwargs = data.get("kwargs") or {}
        options = {k: v for k, v in (data.get("options") or {}).items() if k not in _CELERY_ONLY_OPTION_KEYS}
        if kind == "chain":
            built: Signature = chain(*(Signature.from_dict(t, app) for t in kwargs["tasks"]), app=app)
        elif kind == "group":
            built = group(*(Signature.from_dict(t, app) for t in kwargs["tasks"]), app=app)
        elif kind == "chord":
            body = Signature.from_dict(kwargs["body"], app) if kwargs.get("body") else None
            built = chord(group(*(Signature.from_dict(t, app) for t in kwargs["header"]), app=app), body, app=app)
        else:
            return cls(
                str(data["task"]),
                data.get("args") or (),
                data.get("kwargs") or {},
                options,
                immutable=bool(data.get("immutable")),
                app=app,
            )
        built.options.update(options)
        return built

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


#: Options that make a task a member of a group or chord; on a chain they go to its last step.
_MEMBERSHIP_KEYS = ("group_id", "group_index", "chord")


def _split_membership(options: dict[str, Any]) -> dict[str, Any]:
    return {key: options.pop(key) for key in _MEMBERSHIP_KEYS if key in options}


class chain(Signature):
    """Tasks run one after the other, each result prepended to the next task's args
    (unless the next one is immutable, ``.si()``): ``add.s(4, 4) | add.s(8)``.

    A group followed by another step becomes a chord, as in Celery:
    ``chain(add.s(1, 1), group(add.s(1), add.s(2)), tsum.s())`` gives 7.
    """

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
        self.tasks: list[Signature] = _chords_from_groups(flat)
        super().__init__("celery.chain", app=app or flat[0]._app)

    def __repr__(self) -> str:
        return " | ".join(repr(t) for t in self.tasks)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calling a chain sends it, as in Celery: ``(add.s(1, 1) | add.s(2))()``."""
        return self.apply_async(args, kwargs)

    def __or__(self, other: Signature) -> chain:
        if isinstance(other, Signature):
            return chain(*self.tasks, other, app=self._app)
        return NotImplemented

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "subtask_type": "chain", "kwargs": {"tasks": [t.to_dict() for t in self.tasks]}}

    def freeze(self) -> str:
        ids = [step.freeze() for step in self.tasks]
        return ids[-1]

    def clone(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any) -> chain:
        first, *rest = self.tasks
        cloned = chain(first.clone(args, kwargs, **options), *(t.clone() for t in rest), app=self._app)
        return cloned

    def apply_async(  # type: ignore[override]  # a chain ending in a group returns a GroupResult
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> AsyncResult[Any] | GroupResult:
        """Send the first step, carrying the rest in ``embed.chain``; return the last
        step's result, whose ``.parent`` leads back along the chain."""
        options = dict(options)
        membership = _split_membership(options)
        steps = [step.clone() for step in self.tasks]
        for step in steps:
            step.freeze()
        if membership:
            steps[-1] = _with_membership(steps[-1], membership)
        first, rest = steps[0], steps[1:]
        remaining = [step.to_dict() for step in reversed(rest)]  # the worker pops from the end
        extra = {"chain": remaining} if remaining else {}
        first_result = first.apply_async(args, kwargs, **options, **extra)
        result: AsyncResult[Any] | GroupResult = first_result
        for step in rest:
            result = _result_of(step, parent=result)
        return result


class group(Signature):
    """Tasks run in parallel; ``.get()`` on the result is the list of results in order."""

    def __init__(self, *tasks: Signature | Iterable[Signature], app: App | None = None) -> None:
        flat: list[Signature] = []
        for item in tasks:
            if isinstance(item, group):
                flat.extend(item.tasks)
            elif isinstance(item, Signature):
                flat.append(item)
            else:
                flat.extend(item)
        self.tasks: list[Signature] = flat
        super().__init__("celery.group", app=app or (flat[0]._app if flat else None))

    def __repr__(self) -> str:
        return f"group({', '.join(repr(t) for t in self.tasks)})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calling a group sends it, as in Celery."""
        return self.apply_async(args, kwargs)

    def __len__(self) -> int:
        return len(self.tasks)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "subtask_type": "group", "kwargs": {"tasks": [t.to_dict() for t in self.tasks]}}

    def freeze(self) -> str:
        for member in self.tasks:
            member.freeze()
        return super().freeze()

    def clone(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any) -> group:
        cloned = group(*(t.clone(args, kwargs) for t in self.tasks), app=self._app)
        cloned.options = {**self.options, **options}
        return cloned

    def apply_async(  # type: ignore[override]  # Celery's group returns a GroupResult
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> GroupResult:
        options = {**self.options, **options}
        group_id = str(options.pop("group_id", None) or options.pop("task_id", None) or uuid.uuid4())
        chord_spec = options.pop("chord", None)
        options.pop("group_index", None)
        return self._send(group_id, args, kwargs, options, chord=chord_spec)

    def _send(
        self,
        group_id: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
        chord: dict[str, Any] | None,
    ) -> GroupResult:
        app = self.app
        members = [member.clone(args, kwargs) for member in self.tasks]
        results = [_result_of(member, freeze=True) for member in members]
        group_result = GroupResult(group_id, results, app=app)
        # Saved before sending: a chord's last header task reads the member ids from it.
        group_result.save()
        simple = []
        for index, member in enumerate(members):
            membership: dict[str, Any] = {"group_id": group_id, "group_index": index}
            if chord is not None:
                membership["chord"] = chord
            if type(member) is Signature:
                member.options.update(options, **membership)
                task = app.tasks.get(member.task)
                call_args, call_kwargs = (
                    task.bind_arguments(member.args, member.kwargs)
                    if task
                    else (list(member.args), dict(member.kwargs))
                )
                simple.append((member.task, call_args, call_kwargs, member.options))
            else:  # a chain or chord inside the group: its last step carries the membership
                member.apply_async(**options, **membership)
        if simple:
            app.send_many(simple)
        return group_result


class chord(Signature):
    """A group (the header) whose results, in order, are passed to one task (the body)
    when the last header task finishes: ``chord(group(...), tsum.s())`` or
    ``chord(header)(body)``. A header failure fails the chord with ChordError."""

    def __init__(
        self, header: group | Iterable[Signature], body: Signature | None = None, app: App | None = None
    ) -> None:
        self.header = header if isinstance(header, group) else group(*header)
        self.body = body
        super().__init__("celery.chord", app=app or self.header._app)

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.body!r})"

    def __call__(self, body: Signature | None = None, **options: Any) -> AsyncResult[Any]:
        if body is not None:
            return chord(self.header, body, app=self._app).apply_async(**options)
        return self.apply_async(**options)

    def to_dict(self) -> dict[str, Any]:
        body = self.body.to_dict() if self.body is not None else None
        kwargs = {"header": [t.to_dict() for t in self.header.tasks], "body": body, "kwargs": {}}
        return {**super().to_dict(), "subtask_type": "chord", "kwargs": kwargs}

    def freeze(self) -> str:
        self.header.freeze()
        if self.body is None:
            return super().freeze()
        return self.body.freeze()

    def clone(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any) -> chord:
        header = self.header.clone(args, kwargs)
        header.options = dict(self.header.options)
        cloned = chord(header, self.body.clone() if self.body is not None else None, app=self._app)
        cloned.options = {**self.options, **options}
        return cloned

    def apply_async(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> AsyncResult[Any]:
        if self.body is None:
            msg = "chord() needs a body: chord(header, body) or chord(header)(body)"
            raise ValueError(msg)
        options = {**self.options, **options}
        membership = _split_membership(options)
        body = self.body.clone()
        body_id = body.freeze()
        # What follows the chord in a chain, and the chord's own membership of an outer group,
        # belong to the body: it is the step whose result stands for the chord.
        if "chain" in options:
            body = _with_options(body, {"chain": options.pop("chain")})
        if membership:
            body = _with_membership(body, membership)
        group_id = str(self.header.options.get("task_id") or uuid.uuid4())
        if type(body) is Signature:
            body.options.setdefault("group_id", group_id)  # as Celery freezes a chord's body
        if not self.header.tasks:
            body.apply_async(([],))
            return AsyncResult(body_id, self.app, task_name=body.task)
        # Celery's form: the body's signature, with the header's size on it.
        spec = {**body.to_dict(), "chord_size": len(self.header.tasks)}
        app = self.app
        chord_joiner(app.backend).chord_start(group_id, len(self.header.tasks), ttl_s=app.conf.result_expires)
        header_result = self.header._send(group_id, args, kwargs, options, chord=spec)
        return AsyncResult(body_id, self.app, parent=header_result.as_parent(), task_name=body.task)


def _chords_from_groups(steps: list[Signature]) -> list[Signature]:
    """In a chain, a group followed by a step becomes a chord with that step as its body."""
    out: list[Signature] = []
    for step in steps:
        if out and isinstance(out[-1], group) and not isinstance(step, group):
            out[-1] = chord(out[-1], step, app=step._app)
        else:
            out.append(step)
    return out


def _with_options(sig: Signature, options: Mapping[str, Any]) -> Signature:
    if isinstance(sig, chain):
        *head, last = sig.tasks
        return chain(*head, _with_options(last, options), app=sig._app)
    sig.options.update(options)
    return sig


def _with_membership(sig: Signature, membership: Mapping[str, Any]) -> Signature:
    """Put group/chord membership on the step whose result stands for ``sig``."""
    if isinstance(sig, chain):
        *head, last = sig.tasks
        return chain(*head, _with_membership(last, membership), app=sig._app)
    if isinstance(sig, chord) and sig.body is not None:
        sig.body = _with_membership(sig.body, membership)
        return sig
    sig.options.update(membership)
    return sig


def _result_of(sig: Signature, *, parent: Any = None, freeze: bool = False) -> Any:
    """The result handle of a frozen signature, before (or without) sending it."""
    if freeze:
        sig.freeze()
    app = sig.app
    if isinstance(sig, chain):
        result = parent
        for step in sig.tasks:
            result = _result_of(step, parent=result)
        return result
    if isinstance(sig, group):
        return GroupResult(str(sig.options["task_id"]), [_result_of(m) for m in sig.tasks], app=app)
    if isinstance(sig, chord):
        assert sig.body is not None
        return _result_of(sig.body, parent=parent)
    return AsyncResult(str(sig.options["task_id"]), app, parent=parent, task_name=sig.task)


class chunks(Signature):
    """Split ``items`` into parts of ``n`` argument tuples, each part one ``starmap`` task:
    ``add.chunks(zip(range(100), range(100)), 10)``; ``.get()`` is a list of lists."""

    def __init__(self, task: Signature, items: Iterable[Sequence[Any]], n: int) -> None:
        if n < 1:
            msg = f"chunks() needs a chunk size of at least 1; got {n}"
            raise ValueError(msg)
        self.task_sig = task
        self.items = [list(item) for item in items]
        self.n = n
        super().__init__("celery.chunks", (), {"task": task.to_dict(), "it": self.items, "n": n}, app=task._app)

    def group(self) -> group:
        parts = [self.items[i : i + self.n] for i in range(0, len(self.items), self.n)]
        return group(
            (
                Signature("celery.starmap", (), {"task": self.task_sig.to_dict(), "it": part}, app=self._app)
                for part in parts
            ),
            app=self._app,
        )

    def apply_async(  # type: ignore[override]  # like Celery: a group of starmap tasks
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> GroupResult:
        return self.group().apply_async(args, kwargs, **options)


def register_builtins(app: App) -> None:
    """The tasks behind ``task.map``, ``task.starmap`` and ``task.chunks`` (Celery's names)."""

    def xmap(task: dict[str, Any], it: list[Any]) -> list[Any]:
        run = app.get_task(str(task["task"]))
        return [run(item) for item in it]

    def xstarmap(task: dict[str, Any], it: list[Sequence[Any]]) -> list[Any]:
        run = app.get_task(str(task["task"]))
        return [run(*item) for item in it]

    app.task(name="celery.map")(xmap)
    app.task(name="celery.starmap")(xstarmap)


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
        "group_index": (request.headers or {}).get("group_index"),
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
