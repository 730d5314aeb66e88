"""The task message: Celery's protocol v2, defined once and validated on receipt.

On the wire a message is an :class:`~taskframe.broker.Envelope` whose headers are
:class:`TaskHeaders`, whose properties are :class:`TaskProperties` and whose body is the
serialized triple ``[args, kwargs, embed]``. Keeping Celery's layout lets a Celery worker run
a taskframe message and the other way round, and lets producers in other languages join.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import inspect
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from json import encoder as json_encoder
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from .broker import DEFAULT_PRIORITY, Envelope
from .exceptions import MessageError
from .serialization import Serializer, _json_default, get_serializer, json_dumps, serializer_for_content_type

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
    triple = [args, kwargs, embed]
    # JSON through the encoder json_dumps's output is checked against (see _json_text_encoder).
    body = _json_text(triple).encode() if serializer.dumps is json_dumps else serializer.dumps(triple)
    return Envelope(
        body=body,
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


# -- the template of plain calls -------------------------------------------------------------
#
# Most calls of a task differ only in their id, their arguments and the two reprs of those:
# every other header, the properties and the embed are the same for each. A MessageTemplate
# holds them encoded once, cut out of the general path's own output (so it cannot drift from
# it), and a message is then a few string joins instead of two JSON encodings of every header.

#: Placeholders the template is cut around: plain ASCII, so JSON writes them as they are.
TEMPLATE_TASK_ID = "taskframe-template-hole-id"
_ARGSREPR_HOLE = "taskframe-template-hole-argsrepr"
_KWARGSREPR_HOLE = "taskframe-template-hole-kwargsrepr"
_BODY_HOLE = "taskframe-template-hole-body"
#: The holes in the order Envelope.to_bytes writes them: the body, then the headers id,
#: root_id, argsrepr and kwargsrepr, then the property correlation_id.
_FRAME_HOLES = (_BODY_HOLE, TEMPLATE_TASK_ID, TEMPLATE_TASK_ID, _ARGSREPR_HOLE, _KWARGSREPR_HOLE, TEMPLATE_TASK_ID)
#: How the general path's body for no arguments begins: the args and kwargs, then the embed.
_EMPTY_ARGUMENTS = "[[],{},"


#: A random hex digit -> the digit with the RFC 4122 variant bits (10xx) set.
_VARIANT_DIGIT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def new_task_id() -> str:
    """A random RFC 4122 version-4 UUID, as ``str(uuid.uuid4())`` writes it, at a third of the
    cost: the same 16 random bytes from ``os.urandom``, with the version and variant bits set."""
    return _v4(os.urandom(16).hex())


def new_task_ids(count: int) -> list[str]:
    """``count`` :func:`new_task_id` values from one ``os.urandom`` call (a batch's ids)."""
    h = os.urandom(16 * count).hex()
    return [_v4(h[i : i + 32]) for i in range(0, 32 * count, 32)]


def _v4(h: str) -> str:
    # Version nibble 4; variant bits 10, so the 17th digit becomes one of 8, 9, a, b.
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT_DIGIT[h[16]]}{h[17:20]}-{h[20:]}"


def _json_text_encoder() -> Callable[[Any], str]:
    """What :func:`~taskframe.serialization.json_dumps` writes, as text.

    json.dumps builds a JSONEncoder and a C encoder for every call; here one C encoder, made
    once with the arguments JSONEncoder.iterencode gives it, serves every call. It keeps no
    circular-reference markers (a dict per call, and state threads would share): a cycle
    recurses until Python stops it, and the checked JSONEncoder then raises what json.dumps
    raises. Where the C accelerator is missing, or writes anything else, the JSONEncoder is
    used as json.dumps would.
    """
    checked = json.JSONEncoder(default=_json_default, separators=(",", ":"), ensure_ascii=False)
    make: Any = getattr(json_encoder, "c_make_encoder", None)
    if make is None:
        return checked.encode
    unchecked = make(None, _json_default, json_encoder.encode_basestring, None, ":", ",", False, False, True)

    def encode(value: Any) -> str:
        try:
            return "".join(unchecked(value, 0))
        except RecursionError:
            return checked.encode(value)

    sample = [[1, -2.5, float("nan"), 'é"\\', None, True, (3,), b"\x00"], {"k": {"n": [1e300, 2**70]}}]
    try:
        same = encode(sample) == checked.encode(sample)
    except (TypeError, ValueError):
        same = False
    return encode if same else checked.encode


_json_text = _json_text_encoder()
#: The JSON string literal of a text, as json.dumps writes it by default (ASCII only).
_ascii_literal = json_encoder.encode_basestring_ascii


@dataclass(frozen=True, eq=False, init=False)
class FramedEnvelope(Envelope):
    """An :class:`Envelope` that also holds the bytes :meth:`Envelope.to_bytes` writes for it,
    assembled by :class:`MessageTemplate`, so brokers that store blobs skip encoding it again.

    Its headers, properties and body are those of any envelope (AMQP, SQS and kombu read
    them), and it equals a plain Envelope with the same fields. ``dataclasses.replace`` on
    it raises (it is not given ``frame``), so a changed copy never keeps stale bytes.
    """

    _frame: bytes = dataclasses.field(init=False, repr=False, compare=False)

    def __init__(
        self,
        body: bytes,
        headers: Mapping[str, Any],
        properties: Mapping[str, Any],
        content_type: str,
        content_encoding: str,
        *,
        frame: bytes,
    ) -> None:
        # One dict update instead of the frozen dataclass's object.__setattr__ per field:
        # this runs once per message sent.
        self.__dict__.update(
            body=body,
            headers=headers,
            properties=properties,
            content_type=content_type,
            content_encoding=content_encoding,
            _frame=frame,
        )

    def to_bytes(self) -> bytes:
        return self._frame

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Envelope):
            return NotImplemented
        return _envelope_fields(self) == _envelope_fields(other)


def _envelope_fields(envelope: Envelope) -> tuple[Any, ...]:
    return (envelope.body, envelope.headers, envelope.properties, envelope.content_type, envelope.content_encoding)


@dataclass(frozen=True, slots=True)
class MessageTemplate:
    """The parts every plain call of one task shares, made by :func:`message_template`."""

    #: The headers, with the per-message ones (id, root_id, argsrepr, kwargsrepr) as holes.
    headers: dict[str, Any]
    #: Headers whose value is an empty dict or list: each message gets its own.
    fresh: tuple[tuple[str, type[dict[Any, Any]] | type[list[Any]]], ...]
    properties: dict[str, Any]
    #: The embed as the body's JSON writes it.
    embed_json: str
    #: ``Envelope.to_bytes()`` as text, cut where the JSON literals of the _FRAME_HOLES go.
    frame_pieces: tuple[str, str, str, str, str, str, str]
    content_type: str
    content_encoding: str
    priority: int

    def envelope(
        self, task_id: str, args: list[Any], kwargs: dict[str, Any], argsrepr: str, kwargsrepr: str
    ) -> FramedEnvelope:
        """The envelope the general path would build for this call, byte for byte."""
        body = self._body(args, kwargs)
        headers = self.headers.copy()
        headers["id"] = headers["root_id"] = task_id
        headers["argsrepr"], headers["kwargsrepr"] = argsrepr, kwargsrepr
        for name, make in self.fresh:
            headers[name] = make()
        properties = self.properties.copy()
        properties["correlation_id"] = task_id
        return FramedEnvelope(
            body.encode(),
            headers,
            properties,
            self.content_type,
            self.content_encoding,
            frame=self._frame(task_id, body, argsrepr, kwargsrepr),
        )

    def frame(
        self, task_id: str, args: Sequence[Any], kwargs: Mapping[str, Any], argsrepr: str, kwargsrepr: str
    ) -> bytes:
        """Only the bytes ``envelope(...).to_bytes()`` returns, for a broker that takes frames
        (taskframe.broker.FramePublisher): no dicts, no envelope."""
        return self._frame(task_id, self._body(args, kwargs), argsrepr, kwargsrepr)

    def _body(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        # [args, kwargs, embed] is written as [args, kwargs] with the embed put before "]".
        return f"{_json_text([args, kwargs])[:-1]},{self.embed_json}]"

    def _frame(self, task_id: str, body: str, argsrepr: str, kwargsrepr: str) -> bytes:
        # One join of literal pieces (str.format would parse the whole frame for each message).
        p0, p1, p2, p3, p4, p5, p6 = self.frame_pieces
        literal_id = _ascii_literal(task_id)
        return "".join(
            (
                p0,
                _ascii_literal(body),
                p1,
                literal_id,
                p2,
                literal_id,
                p3,
                _ascii_literal(argsrepr),
                p4,
                _ascii_literal(kwargsrepr),
                p5,
                literal_id,
                p6,
            )
        ).encode()


def message_template(
    headers: dict[str, Any],
    properties: dict[str, Any],
    embed: dict[str, Any],
    serializer: Serializer,
    priority: int,
) -> MessageTemplate | None:
    """The template cut from the general path's parts for a call with no arguments and the
    task id :data:`TEMPLATE_TASK_ID`; None where a message cannot be made from one (another
    serializer than JSON, a header that is not the same for every call)."""
    if serializer.dumps is not json_dumps:
        return None
    ids = (headers.get("id"), headers.get("root_id"), properties.get("correlation_id"))
    if ids != (TEMPLATE_TASK_ID,) * 3:
        return None
    holed = {**headers, "argsrepr": _ARGSREPR_HOLE, "kwargsrepr": _KWARGSREPR_HOLE}
    fresh = tuple((name, type(value)) for name, value in holed.items() if type(value) in (dict, list))
    if any(holed[name] for name, _ in fresh):
        return None  # a non-empty mutable default: copying it per message is not worth a template
    shared = [value for name, value in holed.items() if name not in dict(fresh)] + list(properties.values())
    if not all(_shareable(value) for value in shared):
        return None  # a value a message's reader could change under the other messages
    body = serializer.dumps([[], {}, embed]).decode()
    if not (body.startswith(_EMPTY_ARGUMENTS) and body.endswith("]")):
        return None
    frame_pieces = _frame_pieces(holed, properties, serializer)
    if frame_pieces is None:
        return None
    return MessageTemplate(
        headers=holed,
        fresh=fresh,
        properties=dict(properties),
        embed_json=body[len(_EMPTY_ARGUMENTS) : -1],
        frame_pieces=frame_pieces,
        content_type=serializer.content_type,
        content_encoding=serializer.content_encoding,
        priority=priority,
    )


def _shareable(value: Any) -> bool:
    """Whether every message may hold this very value: nothing in it can be changed."""
    if type(value) is tuple:
        return all(_shareable(item) for item in value)
    return isinstance(value, str | int | float | None)


def _frame_pieces(
    headers: dict[str, Any], properties: dict[str, Any], serializer: Serializer
) -> tuple[str, str, str, str, str, str, str] | None:
    # The general frame of an envelope whose per-message values are holes, cut at each hole's
    # JSON literal; None unless the holes come exactly as _FRAME_HOLES says.
    envelope = Envelope(
        body=_BODY_HOLE.encode(serializer.content_encoding),
        headers=headers,
        properties=properties,
        content_type=serializer.content_type,
        content_encoding=serializer.content_encoding,
    )
    try:
        text = envelope.to_bytes().decode()
    except (TypeError, ValueError):
        return None  # a header JSON cannot write: the general path says so when publishing
    names = dict.fromkeys(_FRAME_HOLES)
    cut = re.split(f'"({"|".join(map(re.escape, names))})"', text)  # [piece, hole, piece, ...]
    pieces = tuple(cut[0::2])
    if tuple(cut[1::2]) != _FRAME_HOLES or len(pieces) != 7:
        return None
    if any(name in piece for name in names for piece in pieces):
        return None  # a hole outside its own literal: a value derived from it, no template
    return pieces


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
