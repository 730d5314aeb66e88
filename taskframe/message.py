"""The task message: Celery's protocol v2, defined once and validated on receipt.

On the wire a message is an :class:`~taskframe.broker.Envelope` whose headers are
:class:`TaskHeaders`, whose properties are :class:`TaskProperties` and whose body is the
serialized triple ``[args, kwargs, embed]``. Keeping Celery's layout lets a Celery worker run
a taskframe message and the other way round, and lets producers in other languages join.
"""

from __future__ import annotations

import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .broker import DEFAULT_PRIORITY, Envelope
from .exceptions import MessageError
from .serialization import Serializer, get_serializer, serializer_for_content_type

#: Version of taskframe's reading of the protocol; Celery's own headers carry none.
PROTOCOL_VERSION = 2


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
    timelimit: tuple[float | None, float | None] = (None, None)
    root_id: str | None = None
    parent_id: str | None = None
    argsrepr: str | None = None
    kwargsrepr: str | None = None
    origin: str | None = None
    #: Celery's send_task() writes None here; None means False.
    ignore_result: bool | None = False


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
        if isinstance(serializer, str):
            serializer = get_serializer(serializer)
        body = serializer.dumps([self.args, self.kwargs, self.embed.model_dump(exclude_none=False)])
        return Envelope(
            body=body,
            headers=self.headers.model_dump(),
            properties=self.properties.model_dump(),
            content_type=serializer.content_type,
            content_encoding=serializer.content_encoding,
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
            return cls(
                headers=TaskHeaders.model_validate(dict(envelope.headers)),
                properties=TaskProperties.model_validate(
                    {"correlation_id": envelope.headers.get("id"), **envelope.properties}
                ),
                args=args,
                kwargs=kwargs,
                embed=Embed.model_validate(embed or {}),
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            msg = f"invalid protocol v2 message: {where}: {first['msg']}"
            raise MessageError(msg) from None


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
