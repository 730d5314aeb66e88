"""The message model: Celery protocol v2 on the wire, validated on receipt."""

from __future__ import annotations

import json
from typing import Any

import pytest

from taskframe import App
from taskframe.broker import Envelope
from taskframe.exceptions import MessageError
from taskframe.message import Message

#: A message as Celery 5 writes it for add.apply_async((2, 3), countdown=10), headers abridged.
CELERY_HEADERS = {
    "lang": "py",
    "task": "tasks.add",
    "id": "5c2ed0a8-1d17-4c1c-8a0f-7a3c2e9c1f11",
    "shadow": None,
    "eta": "2026-11-25T15:00:10.000000+00:00",
    "expires": None,
    "group": None,
    "group_index": None,
    "retries": 0,
    "timelimit": [None, None],
    "root_id": "5c2ed0a8-1d17-4c1c-8a0f-7a3c2e9c1f11",
    "parent_id": None,
    "argsrepr": "(2, 3)",
    "kwargsrepr": "{}",
    "origin": "gen42@host",
    "ignore_result": False,
    "replaced_task_nesting": 0,
    "stamped_headers": None,
    "stamps": {},
}
CELERY_BODY = [[2, 3], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]


def test_a_celery_message_decodes() -> None:
    envelope = Envelope(
        body=json.dumps(CELERY_BODY).encode(),
        headers=CELERY_HEADERS,
        properties={
            "correlation_id": CELERY_HEADERS["id"],
            "reply_to": "abc",
            "delivery_mode": 2,
            "priority": 0,
        },
    )
    message = Message.from_envelope(envelope, ["json"])
    assert message.task == "tasks.add"
    assert message.args == [2, 3]
    assert message.headers.eta == "2026-11-25T15:00:10.000000+00:00"
    assert message.headers.timelimit == (None, None)
    # Celery's extra headers are kept, so a message passed on keeps them.
    assert message.headers.model_dump()["replaced_task_nesting"] == 0


def test_messages_taskframe_sends_have_every_protocol_v2_field(memory_app: App) -> None:
    queue, message, delay_s = memory_app.build_message(
        "tasks.add",
        [2, 3],
        {},
        {"countdown": 10, "priority": 7, "time_limit": 30, "soft_time_limit": 25},
    )
    envelope = message.to_envelope()
    for field in (
        "lang",
        "task",
        "id",
        "root_id",
        "parent_id",
        "group",
        "retries",
        "eta",
        "expires",
        "timelimit",
        "argsrepr",
        "kwargsrepr",
        "origin",
        "ignore_result",
    ):
        assert field in envelope.headers
    assert envelope.headers["timelimit"] == (30, 25)
    assert envelope.properties["correlation_id"] == message.id
    assert envelope.properties["priority"] == 7
    assert envelope.properties["delivery_mode"] == 2
    assert json.loads(envelope.body) == [
        [2, 3],
        {},
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    ]
    assert queue == "celery" and delay_s == 10


def test_envelope_bytes_round_trip() -> None:
    envelope = Envelope(body=b"[[1], {}, {}]", headers={"id": "x", "task": "t"}, properties={"priority": 3})
    assert Envelope.from_bytes(envelope.to_bytes()) == envelope
    binary = Envelope(
        body=b"\x00\xff",
        headers={},
        content_type="application/x-msgpack",
        content_encoding="binary",
    )
    assert Envelope.from_bytes(binary.to_bytes()) == binary


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (b"not json", "application/json", "cannot decode the json body"),
        (b'{"a": 1}', "application/json", "must be \\[args, kwargs, embed\\]"),
        (b"[[1], {}, {}]", "application/x-python-serialize", "refusing content type"),
    ],
)
def test_bad_messages_raise_message_error(body: bytes, content_type: str, expected: str) -> None:
    envelope = Envelope(body=body, headers={"id": "x", "task": "t"}, content_type=content_type)
    with pytest.raises(MessageError, match=expected):
        Message.from_envelope(envelope, ["json"])


def test_missing_task_header_is_a_message_error() -> None:
    envelope = Envelope(body=b"[[], {}, {}]", headers={"id": "x"})
    with pytest.raises(MessageError, match="task"):
        Message.from_envelope(envelope, ["json"])


def test_garbage_bytes_are_not_an_envelope() -> None:
    with pytest.raises(MessageError, match="not a taskframe envelope"):
        Envelope.from_bytes(b"\x00garbage")


def test_msgpack_round_trip() -> None:
    app = App(
        "t",
        broker="memory://",
        backend="memory://",
        task_serializer="msgpack",
        accept_content=["msgpack"],
    )
    _, message, _ = app.build_message("tasks.add", [1, b"\x01"], {"k": "v"}, {})
    envelope = message.to_envelope("msgpack")
    assert envelope.content_type == "application/x-msgpack"
    decoded = Message.from_envelope(Envelope.from_bytes(envelope.to_bytes()), ["msgpack"])
    assert decoded.args == [1, b"\x01"] and decoded.kwargs == {"k": "v"}


def test_pickle_only_when_accepted() -> None:
    app = App("t", broker="memory://", backend="memory://")
    _, message, _ = app.build_message("tasks.add", [1, 2], {}, {})
    envelope = message.to_envelope("pickle")
    with pytest.raises(MessageError, match="refusing"):
        Message.from_envelope(envelope, ["json"])
    assert Message.from_envelope(envelope, ["json", "pickle"]).args == [1, 2]


def test_celery_send_task_headers_with_nulls_decode() -> None:
    # Celery's app.send_task() writes ignore_result as null.
    headers = {**CELERY_HEADERS, "ignore_result": None, "eta": None}
    envelope = Envelope(
        body=json.dumps(CELERY_BODY).encode(), headers=headers, properties={"correlation_id": headers["id"]}
    )
    message = Message.from_envelope(envelope, ["json"])
    assert not message.headers.ignore_result


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"countdown": 5, "priority": 9, "time_limit": 30, "soft_time_limit": 2.5, "expires": 60},
        {"link": {"task": "t.cb", "args": [], "kwargs": {}, "options": {}}, "chain": [{"task": "t.next"}]},
        {"group_id": "g", "group_index": 1, "parent_id": "p", "root_id": "r", "retries": 2, "shadow": "nick"},
        {"headers": {"custom": [1, 2]}, "ignore_result": True},
        {"group_index": 1.0, "time_limit": "30"},  # not plain: validated and coerced on the slow path
    ],
)
def test_a_sent_message_is_what_validating_it_would_give(memory_app: App, options: dict[str, Any]) -> None:
    sent: list[Envelope] = []
    memory_app.broker.publish = lambda queue, envelope, **kw: sent.append(envelope)  # type: ignore[method-assign]
    memory_app.send_task("tasks.add", [2, 3], {"z": 1}, task_id="fixed-id", **options)
    _, message, _ = memory_app.build_message("tasks.add", [2, 3], {"z": 1}, {"task_id": "fixed-id", **options})
    expected = message.to_envelope()
    (envelope,) = sent
    assert _without_dates(envelope.headers) == _without_dates(expected.headers)
    assert list(envelope.headers) == list(expected.headers)  # the same layout, key for key
    assert list(envelope.properties.items()) == list(expected.properties.items())
    assert json.loads(envelope.body) == json.loads(expected.body)


def _without_dates(headers: Any) -> dict[str, Any]:
    return {k: v for k, v in headers.items() if k not in ("eta", "expires")}


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"time_limit": "soon"}, "timelimit"),
        ({"group_index": "first"}, "group_index"),
        ({"headers": {"lang": 5}}, "lang"),
        ({"chain": "not a list"}, "chain"),
    ],
)
def test_bad_option_values_fail_at_send_naming_the_field(memory_app: App, options: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        memory_app.send_task("tasks.add", [1, 2], **options)
    assert memory_app.broker.stats("celery").ready == 0


def test_headers_cannot_overwrite_what_taskframe_writes(memory_app: App) -> None:
    with pytest.raises(TypeError, match="headers= cannot set id"):
        memory_app.send_task("tasks.add", [1, 2], headers={"id": "mine"})
