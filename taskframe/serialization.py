"""Serializers for message bodies: json (default), msgpack (extra), pickle (opt-in only)."""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .exceptions import ConfigurationError, MessageError


@dataclass(frozen=True)
class Serializer:
    name: str
    content_type: str
    content_encoding: str  # "utf-8" for text formats, "binary" otherwise
    dumps: Callable[[Any], bytes]
    loads: Callable[[bytes], Any]


def _json_default(value: Any) -> Any:
    # The same conversions Celery's JSON encoder makes, so either side reads the other's args.
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID | decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return {"__type__": "bytes", "__value__": base64.b64encode(value).decode("ascii")}
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if hasattr(value, "model_dump"):  # pydantic models travel as their JSON form
        return value.model_dump(mode="json")
    msg = f"Object of type {type(value).__name__} is not JSON serializable"
    raise TypeError(msg)


def _json_object_hook(obj: dict[str, Any]) -> Any:
    if obj.get("__type__") == "bytes" and "__value__" in obj:
        return base64.b64decode(obj["__value__"])
    return obj


def json_dumps(value: Any) -> bytes:
    return json.dumps(value, default=_json_default, separators=(",", ":"), ensure_ascii=False).encode()


def json_loads(raw: bytes) -> Any:
    return json.loads(raw, object_hook=_json_object_hook)


def _msgpack() -> Serializer:
    try:
        import msgpack
    except ImportError:
        msg = "the msgpack serializer needs msgpack: pip install 'taskframe[msgpack]'"
        raise ConfigurationError(msg) from None

    def dumps(value: Any) -> bytes:
        packed: bytes = msgpack.packb(value, default=_json_default, use_bin_type=True)
        return packed

    def loads(raw: bytes) -> Any:
        return msgpack.unpackb(raw, raw=False)

    return Serializer("msgpack", "application/x-msgpack", "binary", dumps, loads)


def _pickle() -> Serializer:
    import pickle

    return Serializer("pickle", "application/x-python-serialize", "binary", pickle.dumps, pickle.loads)


_JSON = Serializer("json", "application/json", "utf-8", json_dumps, json_loads)
_FACTORIES: dict[str, Callable[[], Serializer]] = {
    "json": lambda: _JSON,
    "msgpack": _msgpack,
    "pickle": _pickle,
}
_CONTENT_TYPES = {
    "application/json": "json",
    "application/x-msgpack": "msgpack",
    "application/x-python-serialize": "pickle",
}


def get_serializer(name: str) -> Serializer:
    try:
        factory = _FACTORIES[name]
    except KeyError:
        msg = f"unknown serializer {name!r}; known: {', '.join(_FACTORIES)}"
        raise ConfigurationError(msg) from None
    return factory()


def serializer_for_content_type(content_type: str, accept: Iterable[str]) -> Serializer:
    """The serializer for a received body, if ``accept`` (names or content types) allows it.

    Refusing unlisted content types is what keeps pickle off unless a user opts in.
    """
    name = _CONTENT_TYPES.get(content_type)
    accepted = set(accept)
    if name is None or not (name in accepted or content_type in accepted):
        msg = (
            f"refusing content type {content_type!r}: accept_content is {sorted(accepted)}; "
            "add it to accept_content if this producer is trusted"
        )
        raise MessageError(msg)
    return get_serializer(name)
