"""Task: a registered function and the ways to call it (locally, ``delay``, ``apply_async``)."""

from __future__ import annotations

import contextvars
import datetime
import inspect
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from typing_extensions import ParamSpec

from .exceptions import MaxRetriesExceededError, Retry
from .result import AsyncResult

if TYPE_CHECKING:
    from .app import App
    from .canvas import Signature, chunks

P = ParamSpec("P")
R = TypeVar("R")

#: How many argument shapes a task remembers as binding to themselves (a bound on memory).
MAX_SHAPES = 64


@dataclass(frozen=True)
class TaskOptions:
    """The options of ``@app.task(...)``; see DESIGN §2."""

    name: str | None = None
    queue: str | None = None
    bind: bool = False
    max_retries: int | None = 3
    default_retry_delay: float = 180.0
    autoretry_for: tuple[type[BaseException], ...] = ()
    retry_backoff: bool | float = False
    retry_backoff_max: float = 600.0
    retry_jitter: bool = True
    time_limit: float | None = None
    soft_time_limit: float | None = None
    acks_late: bool | None = None  # None: the task_acks_late setting
    ignore_result: bool = False
    priority: int | None = None
    rate_limit: str | None = None
    expires: float | datetime.datetime | None = None
    serializer: str | None = None
    validate: bool = False
    track_started: bool | None = None

    @classmethod
    def from_decorator(cls, options: Mapping[str, Any]) -> TaskOptions:
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known
        if unknown:
            msg = f"unknown @app.task option(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
            raise TypeError(msg)
        values = dict(options)
        if "autoretry_for" in values:
            values["autoretry_for"] = tuple(values["autoretry_for"])
        if values.get("rate_limit") is not None:
            from .ratelimit import parse_rate

            parse_rate(values["rate_limit"])  # fail at decoration, not in the worker
        if values.get("priority") is not None:
            from .broker import check_priority

            check_priority(values["priority"])
        return cls(**values)


@dataclass
class Request:
    """What a running task knows about its own call (``self.request`` with ``bind=True``)."""

    id: str
    task: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    retries: int = 0
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    eta: str | None = None
    expires: str | None = None
    delivery_info: dict[str, Any] = field(default_factory=dict)
    hostname: str | None = None
    is_eager: bool = False
    timelimit: tuple[float | None, float | None] = (None, None)
    headers: dict[str, Any] = field(default_factory=dict)
    embed: dict[str, Any] = field(default_factory=dict)
    #: Ids of the tasks sent while this one runs: its record's ``children``, as in Celery.
    children: list[str] = field(default_factory=list)


#: The request of the task running in this thread (or context), None outside a task.
current_request: contextvars.ContextVar[Request | None] = contextvars.ContextVar(
    "taskframe_current_request", default=None
)


def note_child(task_id: str) -> None:
    """Count a task sent from inside a running task among that task's children."""
    request = current_request.get()
    if request is not None and not request.is_eager and task_id != request.id:  # a retry is no child
        request.children.append(task_id)


class Task(Generic[P, R]):
    """A function registered with ``@app.task``. Calling it runs it here and now;
    ``delay``/``apply_async`` send it to a worker and return an :class:`AsyncResult`."""

    def __init__(self, app: App, fn: Callable[..., R], name: str, options: TaskOptions) -> None:
        self.app = app
        self.fn = fn
        self.name = name
        self.options = options
        self.__name__ = getattr(fn, "__name__", name)
        self.__qualname__ = getattr(fn, "__qualname__", name)
        self.__module__ = getattr(fn, "__module__", "")
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn
        self._signature = _call_signature(fn, bound=options.bind)
        self._validator = _build_validator(fn, self._signature) if options.validate else None
        #: Argument shapes (positional count, keyword names) that bind to themselves: whether
        #: a call binds depends only on its shape, so a known one skips Signature.bind.
        self._plain_shapes: set[tuple[int, tuple[str, ...]]] = set()

    def __repr__(self) -> str:
        return f"<@task: {self.name}>"

    # -- calling -----------------------------------------------------------------------------

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.options.bind:
            return self.fn(self, *args, **kwargs)
        return self.fn(*args, **kwargs)

    def run_with(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> R:
        """How the worker calls the function: validated first when ``validate=True``."""
        args, kwargs = self.bind_arguments(args, kwargs, for_wire=False)
        return self(*args, **kwargs)

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult[R]:
        """Send the task; options are DESIGN §2's (queue, countdown, eta, expires, priority,
        task_id, link, link_error, headers, ignore_result). Wrong arguments raise TypeError
        here, before anything is sent."""
        bound_args, bound_kwargs = self.bind_arguments(args or (), kwargs or {})
        return self.app._send(self.name, bound_args, bound_kwargs, options)

    def bind_arguments(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], *, for_wire: bool = True
    ) -> tuple[list[Any], dict[str, Any]]:
        """Check the arguments against the function's signature (TypeError if they do not
        fit) and, with ``validate=True``, validate and coerce them through pydantic."""
        if self._signature is None:
            return list(args), dict(kwargs)
        shape = (len(args), tuple(kwargs))
        if self._validator is None and shape in self._plain_shapes:
            return list(args), dict(kwargs)
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            msg = f"{self.name}() {exc}"
            raise TypeError(msg) from None
        if self._validator is not None:
            self._validator(bound, for_wire)
            return list(bound.args), dict(bound.kwargs)
        bound_args, bound_kwargs = list(bound.args), dict(bound.kwargs)
        if len(bound_args) == shape[0] and tuple(bound_kwargs) == shape[1] and len(self._plain_shapes) < MAX_SHAPES:
            self._plain_shapes.add(shape)
        return bound_args, bound_kwargs

    # -- canvas ------------------------------------------------------------------------------

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature: this task with some arguments, to chain, group or call later."""
        return self.signature(args, kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable signature: a parent's result is not prepended to its args."""
        return self.signature(args, kwargs, immutable=True)

    def signature(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        immutable: bool = False,
        **options: Any,
    ) -> Signature:
        from .canvas import Signature

        return Signature(self.name, args, kwargs, options, immutable=immutable, app=self.app)

    subtask = signature

    def map(self, items: Iterable[Any]) -> Signature:
        """One task that calls this task on each item in turn: ``add.map([(1, 2)])``."""
        from .canvas import Signature

        return Signature("celery.map", (), {"task": self.s().to_dict(), "it": list(items)}, app=self.app)

    def starmap(self, items: Iterable[Sequence[Any]]) -> Signature:
        """One task that calls this task with each item as its arguments."""
        from .canvas import Signature

        it = [list(item) for item in items]
        return Signature("celery.starmap", (), {"task": self.s().to_dict(), "it": it}, app=self.app)

    def chunks(self, items: Iterable[Sequence[Any]], n: int) -> chunks:
        """A group of ``starmap`` tasks of ``n`` argument tuples each."""
        from .canvas import chunks

        return chunks(self.s(), items, n)

    # -- inside a running task ---------------------------------------------------------------

    @property
    def request(self) -> Request:
        request = current_request.get()
        if request is None:
            return Request(id="", task=self.name, is_eager=True)
        return request

    def retry(
        self,
        exc: BaseException | None = None,
        countdown: float | None = None,
        eta: datetime.datetime | None = None,
        max_retries: int | None = None,
        throw: bool = True,
        **options: Any,
    ) -> Retry:
        """Schedule this task again (same id, retries + 1) and end this attempt.

        Raises :class:`Retry` (write ``raise self.retry(exc=exc, countdown=5)`` so readers and
        type checkers see the exit; ``throw=False`` returns it instead). Once ``max_retries``
        is reached the original exception is raised instead (or MaxRetriesExceededError).
        """
        request = current_request.get()
        if request is None or request.is_eager:
            if exc is not None:
                raise exc
            msg = f"{self.name}.retry() called outside a worker"
            raise MaxRetriesExceededError(msg)
        limit = self.options.max_retries if max_retries is None else max_retries
        if limit is not None and request.retries >= limit:
            if exc is not None:
                raise exc
            msg = f"{self.name}[{request.id}] exceeded max_retries={limit}"
            raise MaxRetriesExceededError(msg)
        if countdown is None and eta is None:
            countdown = self.retry_delay_s(request.retries)
        from .canvas import resend_options

        retry_options = resend_options(request)
        retry_options.update(options)
        retry_options.update(retries=request.retries + 1, countdown=countdown, eta=eta)
        if eta is not None:
            retry_options.pop("countdown")
        else:
            retry_options.pop("eta")
        self.app._send(self.name, list(request.args), dict(request.kwargs), retry_options)
        retry = Retry(f"Retry in {countdown}s" if eta is None else f"Retry at {eta}", exc=exc, when=countdown)
        if throw:
            raise retry
        return retry

    def retry_delay_s(self, retries: int) -> float:
        """The countdown before retry number ``retries + 1``: the fixed default delay, or
        exponential backoff (``retry_backoff``) capped at ``retry_backoff_max``, with full
        jitter when ``retry_jitter`` (so retrying workers do not stampede together)."""
        backoff = self.options.retry_backoff
        if not backoff:
            return float(self.options.default_retry_delay)
        base = 1.0 if backoff is True else float(backoff)
        delay = min(base * (2.0**retries), self.options.retry_backoff_max)
        if self.options.retry_jitter:
            delay = random.uniform(0, delay)
        return delay

    def update_state(
        self,
        task_id: str | None = None,
        state: str = "PROGRESS",
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Store a custom state (``.result`` of it is ``meta``), e.g. progress."""
        from .execution import store_state

        request = current_request.get()
        task_id = task_id or (request.id if request else None)
        if not task_id:
            msg = "update_state() needs a task_id outside a running task"
            raise ValueError(msg)
        store_state(self.app, task_id, state, dict(meta or {}), request=request)


def _call_signature(fn: Callable[..., Any], *, bound: bool) -> inspect.Signature | None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: send as given
        return None
    if bound:
        params = list(signature.parameters.values())[1:]
        signature = signature.replace(parameters=params)
    return signature


def _build_validator(
    fn: Callable[..., Any], signature: inspect.Signature | None
) -> Callable[[inspect.BoundArguments, bool], None]:
    """A pydantic model of the parameters. Validating replaces each argument by its coerced
    value: in JSON form before sending (what the worker will validate again), as Python
    objects in the worker."""
    from pydantic import ConfigDict, ValidationError, create_model

    if signature is None:
        msg = f"validate=True needs a function with a signature; {fn!r} has none"
        raise TypeError(msg)
    hints = inspect.get_annotations(fn, eval_str=True)
    definitions: dict[str, Any] = {}
    for name, param in signature.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        annotation = hints.get(name, Any)
        default = ... if param.default is param.empty else param.default
        definitions[name] = (annotation, default)
    model = create_model(
        f"{fn.__qualname__}Arguments",
        __config__=ConfigDict(arbitrary_types_allowed=True),
        **definitions,
    )

    def validate(bound: inspect.BoundArguments, for_wire: bool) -> None:
        named = {k: v for k, v in bound.arguments.items() if k in definitions}
        try:
            validated = model.model_validate(named)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors()
            )
            msg = f"{fn.__qualname__}() arguments do not validate: {problems}"
            raise TypeError(msg) from None
        values = validated.model_dump(mode="json") if for_wire else dict(validated)
        for key in named:
            bound.arguments[key] = values[key]

    return validate
