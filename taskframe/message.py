"""The task message: Celery's protocol v2, defined once and validated on receipt.

On the wire a message is an :class:`~taskframe.broker.Envelope` whose headers are
:class:`TaskHeaders`, whose properties are :class:`TaskProperties` and whose body is the
serialized triple ``[args, kwargs, embed]``. Keeping Celery's layout lets a Celery worker run
a taskframe message and the other way round, and lets producers in other languages join.
"""

from __future__ import annotations

import copy
import datetime
import functools
import inspect
from collections.abc import Callable
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from .broker import DEFAULT_PRIORITY, Envelope
from .exceptions import MessageError
from .serialization import Serializer, get_serializer, serializer_for_content_type

#: Version of taskframe's reading of the protocol; Celery's own headers carry none.
PROTOCOL_VERSION = 2

#: The options of apply_async / send_task (DESIGN §2).
SEND_OPTIONS = frozenset(
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
        "retries",
        "parent_id",
        "root_id",
        "group_id",
        "group_index",
        "chain",
        "chord",
        "shadow",
    }
)


class TaskHeaders(BaseModel):
    """Protocol v2 headers. Unknown headers (Celery's stamps, user ``headers=``) are kept."""

    model_config = ConfigDict(extra="allow", frozen=True)

    lang: str = "py"
    task: str
    id: str
    shadow: str | None = None
    eta: str | None = None
    expires: str | None = None
    group: str | None = None
    group_index: int | None = None
    retries: int = 0
    #: ``[hard, soft]`` seconds, as Celery writes it.
    timelimit: tuple[int | float | None, int | float | None] = (None, None)  # int stays int, as in Celery
    root_id: str | None = None
    parent_id: str | None = None
    argsrepr: str | None = None
    kwargsrepr: str | None = None
    origin: str | None = None
    #: Celery's send_task() writes None here; None means False.
    ignore_result: bool | None = False
    #: Celery 5's replace() depth and stamping headers: written as Celery writes them, unused here.
    replaced_task_nesting: int = 0
    stamped_headers: list[str] | None = None
    stamps: dict[str, Any] = Field(default_factory=dict)


class TaskProperties(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    correlation_id: str
    reply_to: str | None = None
    priority: int = Field(default=DEFAULT_PRIORITY, ge=0, le=255)
    delivery_mode: int = 2  # persistent


class Embed(BaseModel):
    """The third element of the body: what runs after this task (Celery's ``embed``)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    callbacks: list[dict[str, Any]] | None = None
    errbacks: list[dict[str, Any]] | None = None
    #: Signatures still to run, last first: the worker pops the end (Celery's order).
    chain: list[dict[str, Any]] | None = None
    chord: dict[str, Any] | None = None


class Message(BaseModel):
    """One task invocation, as it travels."""

    model_config = ConfigDict(frozen=True)

    headers: TaskHeaders
    properties: TaskProperties
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    embed: Embed = Field(default_factory=Embed)

    @property
    def id(self) -> str:
        return self.headers.id

    @property
    def task(self) -> str:
        return self.headers.task

    @property
    def priority(self) -> int:
        return self.properties.priority

    def to_envelope(self, serializer: Serializer | str = "json") -> Envelope:
        return wire_envelope(
            self.headers.model_dump(),
            self.properties.model_dump(),
            self.args,
            self.kwargs,
            self.embed.model_dump(exclude_none=False),
            serializer,
        )

    @classmethod
    def from_envelope(cls, envelope: Envelope, accept: list[str]) -> Message:
        """Decode and validate; any problem is a :class:`MessageError` saying what is wrong."""
        serializer = serializer_for_content_type(envelope.content_type, accept)
        try:
            body = serializer.loads(envelope.body)
        except Exception as exc:
            msg = f"cannot decode the {serializer.name} body: {type(exc).__name__}: {exc}"
            raise MessageError(msg) from exc
        if not isinstance(body, list | tuple) or len(body) != 3:
            msg = f"the body must be [args, kwargs, embed] (protocol v2); got {type(body).__name__}"
            raise MessageError(msg)
        args, kwargs, embed = body
        try:
            # One validation of the whole message (pydantic walks the nested models in one go).
            return cls.model_validate(
                {
                    "headers": dict(envelope.headers),
                    "properties": {"correlation_id": envelope.headers.get("id"), **envelope.properties},
                    "args": args,
                    "kwargs": kwargs,
                    "embed": embed or {},
                }
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            msg = f"invalid protocol v2 message: {where}: {first['msg']}"
            raise MessageError(msg) from None


def wire_envelope(
    headers: dict[str, Any],
    properties: dict[str, Any],
    args: list[Any],
    kwargs: dict[str, Any],
    embed: dict[str, Any],
    serializer: Serializer | str = "json",
) -> Envelope:
    """The envelope of a message given as plain, already checked parts (see
    :func:`checked_for_sending`): the one place that lays a message out for the wire."""
    if isinstance(serializer, str):
        serializer = get_serializer(serializer)
    return Envelope(
        body=serializer.dumps([args, kwargs, embed]),
        headers=headers,
        properties=properties,
        content_type=serializer.content_type,
        content_encoding=serializer.content_encoding,
    )


def field_defaults(model: type[BaseModel]) -> dict[str, Any]:
    """A fresh dict of ``model``'s fields in declaration order (the layout ``model_dump``
    writes): optional ones at their defaults, required ones None until the caller fills them."""
    fixed, fresh = _default_template(model)
    values = dict(fixed)
    for name, make in fresh:
        values[name] = make()
    return values


@functools.cache
def _default_template(model: type[BaseModel]) -> tuple[dict[str, Any], list[tuple[str, Callable[[], Any]]]]:
    # Immutable defaults are shared; mutable ones and factories are made anew for each copy.
    fixed: dict[str, Any] = {}
    fresh: list[tuple[str, Callable[[], Any]]] = []
    for name, field in model.model_fields.items():
        fixed[name] = None  # keeps the declaration order
        if field.is_required():
            continue
        if field.default_factory is not None:
            # Called directly: pydantic's get_default inspects the factory on every call.
            fresh.append((name, _zero_argument_factory(field)))
        elif isinstance(field.default, list | dict | set):
            fresh.append((name, functools.partial(copy.deepcopy, field.default)))
        else:
            fixed[name] = field.default
    return fixed, fresh


def _zero_argument_factory(field: FieldInfo) -> Callable[[], Any]:
    factory = field.default_factory
    assert factory is not None
    try:
        inspect.signature(factory).bind()
    except TypeError:  # a factory of the validated data: let pydantic call it
        return functools.partial(field.get_default, call_default_factory=True)
    except ValueError:  # a builtin without a signature (dict, list): takes no argument
        pass
    return cast("Callable[[], Any]", factory)  # it binds with no argument: checked above


#: Headers the App fills that must be text or None; the others are checked one by one.
_TEXT_OR_NONE_HEADERS = (
    "shadow",
    "eta",
    "expires",
    "group",
    "root_id",
    "parent_id",
    "argsrepr",
    "kwargsrepr",
    "origin",
)


def checked_for_sending(
    headers: dict[str, Any],
    properties: dict[str, Any],
    args: list[Any],
    kwargs: dict[str, Any],
    embed: dict[str, Any],
    *,
    user_headers: bool,
) -> tuple[dict[str, Any], dict[str, Any], list[Any], dict[str, Any], dict[str, Any]]:
    """The parts of a message the App built, ready for :func:`wire_envelope`.

    When every value has its plain type (the common case: the App produced them), they pass
    as they are, saving four model validations and dumps per message. Anything else, and
    any user ``headers=``, goes through full validation, which coerces what it can or raises
    pydantic's ValidationError naming the field, as building the models did.
    """
    if not user_headers and _plain(headers, properties, kwargs, embed):
        return headers, properties, args, kwargs, embed
    message = Message.model_validate(
        {"headers": headers, "properties": properties, "args": args, "kwargs": kwargs, "embed": embed}
    )
    return (
        message.headers.model_dump(),
        message.properties.model_dump(),
        message.args,
        message.kwargs,
        message.embed.model_dump(exclude_none=False),
    )


def _plain(headers: dict[str, Any], properties: dict[str, Any], kwargs: dict[str, Any], embed: dict[str, Any]) -> bool:
    if type(headers["task"]) is not str or type(headers["id"]) is not str:
        return False
    if any(headers[name] is not None and type(headers[name]) is not str for name in _TEXT_OR_NONE_HEADERS):
        return False
    group_index, limits = headers["group_index"], headers["timelimit"]
    if (group_index is not None and type(group_index) is not int) or type(headers["retries"]) is not int:
        return False
    if type(limits) is not tuple or len(limits) != 2:
        return False
    if any(limit is not None and type(limit) not in (int, float) for limit in limits):
        return False
    if type(headers["ignore_result"]) is not bool or type(properties["correlation_id"]) is not str:
        return False
    if any(type(key) is not str for key in kwargs):
        return False
    for name in ("callbacks", "errbacks", "chain"):
        items = embed[name]
        if items is not None and (type(items) is not list or any(type(item) is not dict for item in items)):
            return False
    return embed["chord"] is None or type(embed["chord"]) is dict


def utc_isoformat(moment: datetime.datetime) -> str:
    """ISO-8601 with an offset; a naive datetime is taken as UTC (DESIGN §2)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.isoformat()


def parse_isoformat(text: str) -> datetime.datetime:
    moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment
