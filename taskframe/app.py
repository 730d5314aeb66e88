"""App: settings, the task registry, and the one place messages are built and sent."""

from __future__ import annotations

import datetime
import fnmatch
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, Literal, TypeVar, overload

from typing_extensions import ParamSpec

from .broker import Broker, FramePublisher, OutgoingMessage, check_priority
from .exceptions import ConfigurationError, NotRegistered
from .message import (
    SEND_OPTIONS,
    TEMPLATE_TASK_ID,
    Embed,
    Message,
    MessageTemplate,
    TaskHeaders,
    TaskProperties,
    checked_for_sending,
    field_defaults,
    message_template,
    new_task_id,
    new_task_ids,
    utc_isoformat,
    wire_envelope,
)
from .registry import create_backend, create_broker
from .result import AsyncResult, GroupResult
from .revocations import REVOKED_PREFIX, record_revoke
from .serialization import get_serializer
from .settings import Settings, load_settings
from .task import current_request, note_child

if TYPE_CHECKING:
    from .backend import ResultBackend
    from .canvas import Signature
    from .task import Task

P = ParamSpec("P")
R = TypeVar("R")

#: How long a durable revocation is kept, in seconds, when results never expire.
REVOKE_TTL_S = 7 * 86400.0
#: The origin header: who sent a message, as Celery writes it (``gen<pid>@<host>``).
ORIGIN = f"gen{os.getpid()}@{os.uname().nodename}"

_current: weakref.ReferenceType[App] | None = None

#: A message as plain parts: headers, properties, args, kwargs, embed.
_Parts = tuple[dict[str, Any], dict[str, Any], list[Any], dict[str, Any], dict[str, Any]]

#: The apply_async options that leave every header as the task's template has it: the queue
#: only routes, and a given task id takes the place of a new one.
_TEMPLATE_OPTIONS = frozenset({"queue", "task_id"})

#: AsyncResult under a second name, for annotations inside App (whose method of that name shadows it).
_Result = AsyncResult


def current_app() -> App:
    """The most recently created App (what ``signature()`` and ``AsyncResult(id)`` use)."""
    app = _current() if _current is not None else None
    if app is None:
        msg = "no taskframe App exists yet; create one with App('name') first"
        raise ConfigurationError(msg)
    return app


class App:
    """A taskframe application.

    ``App("proj", broker="redis://...", backend="redis://...")``; with no URLs the settings
    come from ``TASKFRAME_BROKER_URL`` / ``TASKFRAME_RESULT_BACKEND``, else the embedded
    SQLite default in ``./taskframe.sqlite3``. Other keyword arguments are settings
    (:class:`taskframe.settings.Settings`).
    """

    def __init__(
        self,
        main: str | None = None,
        *,
        broker: str | None = None,
        backend: str | None = None,
        **settings: Any,
    ) -> None:
        global _current
        self.main = main
        self.conf: Settings = load_settings({"broker": broker, "backend": backend, **settings})
        self.tasks: dict[str, Task[Any, Any]] = {}
        self._lock = threading.Lock()
        self._broker: Broker | None = None
        self._backend: ResultBackend | None = None
        self._pid = os.getpid()
        #: Task name -> (what its template was made from, the template or None): see _template_for.
        self._templates: dict[str, tuple[tuple[Any, ...], MessageTemplate | None]] = {}
        _current = weakref.ref(self)
        from .canvas import register_builtins

        register_builtins(self)

    def __repr__(self) -> str:
        return f"<App {self.main or '__main__'}: {self.conf!r}>"

    # -- connections -------------------------------------------------------------------------

    def _check_fork(self) -> None:
        # A forked child must not share the parent's sockets or SQLite handles: drop them
        # (without closing: closing would act on the parent's) and reconnect on first use.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._broker = None
            self._backend = None

    @property
    def broker(self) -> Broker:
        self._check_fork()
        if self._broker is None:
            with self._lock:
                if self._broker is None:
                    self._broker = create_broker(self.conf.broker_url, self.conf)
        return self._broker

    @property
    def backend(self) -> ResultBackend:
        self._check_fork()
        if self._backend is None:
            with self._lock:
                if self._backend is None:
                    self._backend = create_backend(self.conf.effective_result_backend, self.conf)
        return self._backend

    def close(self) -> None:
        """Close the broker and backend connections of this process."""
        with self._lock:
            broker, backend = self._broker, self._backend
            self._broker = self._backend = None
        if broker is not None:
            broker.close()
        if backend is not None:
            backend.close()

    # -- tasks -------------------------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self, *, bind: Literal[True], name: str | None = ..., **options: Any
    ) -> Callable[[Callable[Concatenate[Any, P], R]], Task[P, R]]: ...

    @overload
    def task(
        self, *, bind: Literal[False] = ..., name: str | None = ..., **options: Any
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(
        self, fn: Callable[..., Any] | None = None, *, bind: bool = False, name: str | None = None, **options: Any
    ) -> Any:
        """Register a function as a task: ``@app.task`` or ``@app.task(queue="low", ...)``."""
        from .task import Task, TaskOptions

        def register(func: Callable[..., Any]) -> Task[Any, Any]:
            opts = TaskOptions.from_decorator({**options, "bind": bind, "name": name})
            task_name = opts.name or self.task_name_for(func)
            task: Task[Any, Any] = Task(self, func, task_name, opts)
            self.tasks[task_name] = task
            return task

        return register(fn) if fn is not None else register

    def task_name_for(self, func: Callable[..., Any]) -> str:
        module = func.__module__
        if module == "__main__" and self.main:
            module = self.main
        return f"{module}.{func.__qualname__}"

    def route(self, task_name: str, queue: str | None = None) -> str:
        """The queue for a task: explicit, else the first matching ``task_routes`` glob, else
        the task's decorator queue, else ``default_queue``."""
        if queue:
            return queue
        for pattern, routed in self.conf.task_routes.items():
            if fnmatch.fnmatchcase(task_name, pattern):
                return routed
        task = self.tasks.get(task_name)
        if task is not None and task.options.queue:
            return task.options.queue
        return self.conf.default_queue

    def known_queues(self) -> list[str]:
        """Every queue this app names: the default, task decorators and routes."""
        queues = [self.conf.default_queue]
        queues += [t.options.queue for t in self.tasks.values() if t.options.queue]
        queues += list(self.conf.task_routes.values())
        return list(dict.fromkeys(queues))

    def get_task(self, name: str) -> Task[Any, Any]:
        try:
            return self.tasks[name]
        except KeyError:
            msg = f"unknown task {name!r}: no @app.task registered it in this process (is its module imported?)"
            raise NotRegistered(msg) from None

    # -- sending -----------------------------------------------------------------------------

    def send_task(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> _Result[Any]:
        """Send a task by name, without its function: ``app.send_task("tasks.add", [1, 2])``."""
        return self._send(name, list(args or ()), dict(kwargs or {}), options)

    def build_message(
        self, name: str, args: list[Any], kwargs: dict[str, Any], options: Mapping[str, Any]
    ) -> tuple[str, Message, float]:
        """The queue, the message and its delay in seconds for one call of a task."""
        queue, (headers, properties, args, kwargs, embed), delay_s = self._message_parts(name, args, kwargs, options)
        message = Message.model_validate(
            {"headers": headers, "properties": properties, "args": args, "kwargs": kwargs, "embed": embed}
        )
        return queue, message, delay_s

    def _outgoing(
        self, name: str, args: list[Any], kwargs: dict[str, Any], options: Mapping[str, Any]
    ) -> tuple[OutgoingMessage, str]:
        """The message for one call of a task, ready to publish, and its task id."""
        templated = self._templated_outgoing(name, args, kwargs, options)
        return templated if templated is not None else self._general_outgoing(name, args, kwargs, options)

    def _templated_outgoing(
        self, name: str, args: list[Any], kwargs: dict[str, Any], options: Mapping[str, Any]
    ) -> tuple[OutgoingMessage, str] | None:
        # The common call, made from the task's template (message.MessageTemplate): the same
        # bytes, headers and properties as _general_outgoing, at a fraction of the cost. None
        # where the call needs the general path.
        template = self._template_for(name) if _plain_call(kwargs, options) else None
        if template is None:
            return None
        task_id = str(options.get("task_id") or new_task_id()) if options else new_task_id()
        envelope = template.envelope(task_id, args, kwargs, _short_repr(tuple(args)), _short_repr(kwargs))
        queue = self.route(name, options.get("queue") if options else None)
        return OutgoingMessage(queue, envelope, 0.0, template.priority), task_id

    def _template_for(self, name: str) -> MessageTemplate | None:
        # A template depends on the task's options and two settings; it is made again when
        # any of them changes (a task registered anew, a setting assigned).
        task = self.tasks.get(name)
        conf = self.conf
        source = (task.options if task is not None else None, conf.task_default_priority, conf.task_serializer)
        cached = self._templates.get(name)
        if cached is not None and cached[0] == source:
            return cached[1]
        template = self._make_template(name)
        if len(self._templates) < 10_000:  # bounded: send_task takes any name
            self._templates[name] = (source, template)
        return template

    def _make_template(self, name: str) -> MessageTemplate | None:
        # Cut from the general path's own parts, so the two cannot drift apart.
        _, parts, delay_s = self._message_parts(name, [], {}, {"task_id": TEMPLATE_TASK_ID})
        headers, properties, _, _, embed = parts
        if delay_s or headers["eta"] is not None or headers["expires"] is not None:
            return None  # the task's own expires: a time that differs for every message
        serializer = get_serializer(self._serializer_for(name, {}))
        return message_template(headers, properties, embed, serializer, properties["priority"])

    def _general_outgoing(
        self, name: str, args: list[Any], kwargs: dict[str, Any], options: Mapping[str, Any]
    ) -> tuple[OutgoingMessage, str]:
        """The message for any call, built field by field (what the template path equals)."""
        queue, parts, delay_s = self._message_parts(name, args, kwargs, options)
        envelope = wire_envelope(*parts, self._serializer_for(name, options))
        headers, properties = parts[0], parts[1]
        return OutgoingMessage(queue, envelope, delay_s, properties["priority"]), headers["id"]

    def _message_parts(
        self, name: str, args: list[Any], kwargs: dict[str, Any], options: Mapping[str, Any]
    ) -> tuple[str, _Parts, float]:
        # Plain dicts, not models: sending builds no pydantic model in the common case (see
        # message.checked_for_sending), and the dicts go on the wire as they are.
        unknown = options.keys() - SEND_OPTIONS
        if unknown:
            known = ", ".join(sorted(SEND_OPTIONS))
            msg = f"unknown apply_async option(s): {', '.join(sorted(unknown))}; known: {known}"
            raise TypeError(msg)
        task = self.tasks.get(name)
        topts = task.options if task is not None else None
        task_id = str(options.get("task_id") or new_task_id())
        now = datetime.datetime.now(datetime.timezone.utc)
        delay_s, eta = _delay_and_eta(options.get("countdown"), options.get("eta"), now)
        expires = options.get("expires", topts.expires if topts else None)
        if isinstance(expires, int | float):
            expires = now + datetime.timedelta(seconds=float(expires))
        priority = options.get("priority")
        if priority is None:
            priority = topts.priority if topts and topts.priority is not None else self.conf.task_default_priority
        check_priority(priority)
        hard = options.get("time_limit", topts.time_limit if topts else None)
        soft = options.get("soft_time_limit", topts.soft_time_limit if topts else None)
        ignore_result = options.get("ignore_result")
        if ignore_result is None:
            ignore_result = topts.ignore_result if topts else False
        user_headers = dict(options.get("headers") or {})
        ours = {
            "task": name,
            "id": task_id,
            "shadow": options.get("shadow"),
            "eta": utc_isoformat(eta) if eta else None,
            "expires": utc_isoformat(expires) if isinstance(expires, datetime.datetime) else None,
            "group": options.get("group_id"),
            "group_index": options.get("group_index"),
            "retries": int(options.get("retries") or 0),
            "timelimit": (hard, soft),
            "root_id": options.get("root_id") or task_id,
            "parent_id": options.get("parent_id"),
            "argsrepr": _short_repr(tuple(args)),  # Celery shows the args tuple: "(2, 3)"
            "kwargsrepr": _short_repr(kwargs),
            "origin": ORIGIN,
            "ignore_result": bool(ignore_result),
        }
        clash = user_headers.keys() & ours.keys()
        if clash:
            msg = f"headers= cannot set {', '.join(sorted(clash))}: taskframe writes them; use the apply_async options"
            raise TypeError(msg)
        headers = field_defaults(TaskHeaders)
        headers.update(user_headers)
        headers.update(ours)
        properties = field_defaults(TaskProperties)
        properties.update(correlation_id=task_id, priority=int(priority))
        embed = field_defaults(Embed)
        embed.update(
            callbacks=_signature_dicts(options.get("link")),
            errbacks=_signature_dicts(options.get("link_error")),
            chain=options.get("chain"),
            chord=options.get("chord"),
        )
        parts = checked_for_sending(headers, properties, args, kwargs, embed, user_headers=bool(user_headers))
        return self.route(name, options.get("queue")), parts, delay_s

    def _serializer_for(self, name: str, options: Mapping[str, Any]) -> str:
        task = self.tasks.get(name)
        chosen = options.get("serializer") or (task.options.serializer if task else None)
        return str(chosen or self.conf.task_serializer)

    def _send(self, name: str, args: list[Any], kwargs: dict[str, Any], options: Mapping[str, Any]) -> _Result[Any]:
        out, task_id = self._outgoing(name, args, kwargs, options)
        self.broker.publish(out.queue, out.envelope, delay_s=out.delay_s, priority=out.priority)
        note_child(task_id)
        return AsyncResult(task_id, self, task_name=name)

    def send_many(
        self, calls: Iterable[tuple[str, Sequence[Any], Mapping[str, Any], Mapping[str, Any]]]
    ) -> list[_Result[Any]]:
        """Send many tasks in one broker round trip where the broker allows:
        ``app.send_many([("tasks.add", (1, 2), {}, {"queue": "q"}), ...])``."""
        calls = list(calls)
        broker = self.broker
        framed = self._send_framed(broker, calls) if isinstance(broker, FramePublisher) else None
        if framed is not None:
            return framed
        outgoing: list[OutgoingMessage] = []
        results: list[_Result[Any]] = []
        for name, args, kwargs, options in calls:
            out, task_id = self._outgoing(name, list(args), dict(kwargs), options)
            outgoing.append(out)
            results.append(AsyncResult(task_id, self, task_name=name))
        if outgoing:
            broker.publish_many(outgoing)
        for result in results:
            note_child(result.id)
        return results

    def _send_framed(
        self, broker: FramePublisher, calls: list[tuple[str, Sequence[Any], Mapping[str, Any], Mapping[str, Any]]]
    ) -> list[_Result[Any]] | None:
        # A batch of plain calls only (see _templated_outgoing), framed straight from each
        # task's template: the same bytes as publish_many of their envelopes, without building
        # the envelopes. None, having sent nothing, when any call needs the general path.
        batches: dict[tuple[str, int], list[tuple[str, bytes]]] = {}
        results: list[_Result[Any]] = []
        templates: dict[str, MessageTemplate | None] = {}
        routes: dict[tuple[str, str | None], str] = {}
        fresh_ids = iter(new_task_ids(len(calls)))
        for name, args, kwargs, options in calls:
            if not _plain_call(kwargs, options):
                return None
            template = templates[name] if name in templates else templates.setdefault(name, self._template_for(name))
            if template is None:
                return None
            task_id = next(fresh_ids)
            queue_option = None
            if options:
                task_id = str(options.get("task_id") or task_id)
                queue_option = options.get("queue")
            # JSON writes a tuple as a list, and the repr is of the tuple: no copies needed.
            arguments = args if type(args) is tuple else tuple(args)
            keywords = kwargs if type(kwargs) is dict else dict(kwargs)
            frame = template.frame(task_id, arguments, keywords, _short_repr(arguments), _short_repr(keywords))
            queue = routes.get((name, queue_option))
            if queue is None:
                queue = routes[(name, queue_option)] = self.route(name, queue_option)
            batches.setdefault((queue, template.priority), []).append((task_id, frame))
            results.append(AsyncResult(task_id, self, task_name=name))
        if batches:
            broker.publish_frames(batches)
        if current_request.get() is not None:  # sent from inside a task: its children
            for result in results:
                note_child(result.id)
        return results

    # -- results and control -----------------------------------------------------------------

    def AsyncResult(self, task_id: str) -> _Result[Any]:
        return AsyncResult(task_id, self)

    @property
    def GroupResult(self) -> type[GroupResult]:
        """``app.GroupResult.restore(group_id)`` finds a saved group in this app's backend."""
        app = self

        class AppGroupResult(GroupResult):
            @classmethod
            def restore(cls, group_id: str, app: App | None = None) -> GroupResult | None:
                return GroupResult.restore(group_id, app=app or bound_app)

        bound_app = app
        return AppGroupResult

    def control_revoke(self, task_id: str, *, terminate: bool = False) -> None:
        """Revoke durably: stored in the result backend, so any worker, also one started
        later, skips the task; ``terminate=True`` also stops it if it runs."""
        record_revoke(self.backend, task_id, terminate=terminate, ttl_s=self.conf.result_expires or REVOKE_TTL_S)

    def is_revoked(self, task_id: str) -> bool:
        return self.backend.get(f"{REVOKED_PREFIX}{task_id}") is not None

    def signature(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Signature:
        from .canvas import Signature

        return Signature(name, args, kwargs, options, app=self)

    # -- RQ-style calls of plain functions ---------------------------------------------------

    def enqueue(self, func: Callable[..., Any] | str, *args: Any, **kwargs: Any) -> _Result[Any]:
        """Run any module-level function on a worker, RQ style: ``app.enqueue(sum, [42, 43])``.

        The worker runs it only if its dotted path matches the ``enqueue_allow`` setting.
        """
        return self.enqueue_call(func, args=args, kwargs=kwargs)

    def enqueue_call(
        self,
        func: Callable[..., Any] | str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> _Result[Any]:
        from .enqueue import dotted_path

        return self.send_task(dotted_path(func), args, kwargs, **options)


def _delay_and_eta(
    countdown: float | None, eta: object, now: datetime.datetime
) -> tuple[float, datetime.datetime | None]:
    if countdown is not None and eta is not None:
        msg = "give countdown or eta, not both"
        raise TypeError(msg)
    if countdown is not None:
        countdown = float(countdown)
        return max(0.0, countdown), (now + datetime.timedelta(seconds=countdown) if countdown > 0 else None)
    if eta is not None:
        if not isinstance(eta, datetime.datetime):
            msg = f"eta must be a datetime; got {type(eta).__name__}"
            raise TypeError(msg)
        if eta.tzinfo is None:
            eta = eta.replace(tzinfo=datetime.timezone.utc)
        return max(0.0, (eta - now).total_seconds()), eta
    return 0.0, None


def _plain_call(kwargs: Mapping[str, Any], options: Mapping[str, Any]) -> bool:
    """Whether a call may be built from its task's template: no option but those that leave
    the headers alone (_TEMPLATE_OPTIONS), and keyword names that are text."""
    if options and not options.keys() <= _TEMPLATE_OPTIONS:
        return False
    return not kwargs or all(type(key) is str for key in kwargs)


def _short_repr(value: Any, limit: int = 1024) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _signature_dicts(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    from .canvas import Signature

    items = value if isinstance(value, list | tuple) else [value]
    out = []
    for item in items:
        if isinstance(item, Signature):
            out.append(item.to_dict())
        elif isinstance(item, dict):
            out.append(dict(item))
        else:
            msg = f"link/link_error take signatures (task.s(...)); got {type(item).__name__}"
            raise TypeError(msg)
    return out
