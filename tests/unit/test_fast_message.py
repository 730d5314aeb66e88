"""The template path that builds plain messages (App._templated_outgoing) writes exactly what
the general path (App._general_outgoing) writes: the same bytes, headers, properties and body."""

from __future__ import annotations

import dataclasses
import datetime
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import taskframe.app as app_module
from taskframe import App
from taskframe.broker import Envelope, OutgoingMessage
from taskframe.message import FramedEnvelope, Message, new_task_id, new_task_ids
from taskframe.serialization import json_dumps

EMPTY_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
TASK_ID = "0f8f5e8e-3c1f-4b7a-9a57-2f6c1d1e4b10"

#: (args, kwargs) of plain calls: every JSON type, and the text JSON and repr must escape.
PLAIN_CALLS: list[tuple[list[Any], dict[str, Any]]] = [
    ([], {}),
    ([1, 2], {}),
    ([0, -1, 2**64, -(2**100)], {}),
    ([1.5, -0.0, 1e300, 5e-324, 0.1 + 0.2], {}),
    ([None, True, False], {}),
    (["plain", "", "é ü ß 日本 😀", 'quote " and \\ backslash', "\n\t\r\x00\x1f\u2028"], {}),
    ([[1, [2, [3, []]]], {"a": {"b": {"c": [None]}}}], {}),
    ([(1, 2), ((3,), [4, (5, 6)])], {}),
    ([], {"x": 1, "y": "two", "z": [3], "é": {"k": None}, 'q"\\': True}),
    ([1, "a"], {"flag": False, "n": None, "t": (1, 2)}),
    ([b"\x00\xffbytes", datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)], {"u": uuid.UUID(int=7)}),
    (["x" * 5000], {"long": "y" * 3000}),  # argsrepr and kwargsrepr cut at 1024
    ([{"callbacks": None}], {"chain": [1]}),  # look like the embed, are arguments
    ([float("nan"), float("inf"), -float("inf")], {}),
]


@pytest.fixture
def app() -> Iterator[App]:
    app = App("fast", broker="memory://", backend="memory://")

    @app.task(name="fast.any")
    def anything(*args: Any, **kwargs: Any) -> None:
        return None

    @app.task(
        name="fast.configured",
        queue="slow",
        priority=8,
        time_limit=30,
        soft_time_limit=25.5,
        ignore_result=True,
    )
    def configured(*args: Any, **kwargs: Any) -> None:
        return None

    yield app
    app.close()


def both_ways(
    app: App, name: str, args: list[Any], kwargs: dict[str, Any], options: dict[str, Any]
) -> tuple[tuple[OutgoingMessage, str], tuple[OutgoingMessage, str]]:
    """The call through App._outgoing (template where it can) and through the general path."""
    fast = app._outgoing(name, list(args), dict(kwargs), options)
    general = app._general_outgoing(name, list(args), dict(kwargs), options)
    return fast, general


def assert_same_message(fast: tuple[OutgoingMessage, str], general: tuple[OutgoingMessage, str]) -> None:
    (out, task_id), (ref, ref_id) = fast, general
    assert task_id == ref_id
    assert (out.queue, out.priority) == (ref.queue, ref.priority)
    assert out.delay_s == pytest.approx(ref.delay_s, abs=1.0)  # an eta's delay counts from now
    envelope, expected = out.envelope, ref.envelope
    assert envelope.to_bytes() == expected.to_bytes()
    # The bytes are those of the envelope's own fields, as the general framing writes them.
    assert envelope.to_bytes() == Envelope.to_bytes(envelope)
    assert list(envelope.headers.items()) == list(expected.headers.items())  # order too
    assert list(envelope.properties.items()) == list(expected.properties.items())
    assert envelope.body == expected.body
    assert (envelope.content_type, envelope.content_encoding) == (expected.content_type, expected.content_encoding)
    assert envelope == expected and expected == envelope
    assert {type(v) for v in envelope.headers.values()} == {type(v) for v in expected.headers.values()}


@pytest.mark.parametrize(("args", "kwargs"), PLAIN_CALLS)
@pytest.mark.parametrize("name", ["fast.any", "fast.configured", "not.registered.here"])
def test_a_plain_call_is_templated_and_writes_what_the_general_path_writes(
    app: App, name: str, args: list[Any], kwargs: dict[str, Any]
) -> None:
    fast, general = both_ways(app, name, args, kwargs, {"task_id": TASK_ID})
    assert isinstance(fast[0].envelope, FramedEnvelope)
    assert not isinstance(general[0].envelope, FramedEnvelope)
    assert_same_message(fast, general)
    # And both write what the serializer itself writes (the general path shares the encoder).
    assert fast[0].envelope.body == json_dumps([args, kwargs, EMPTY_EMBED])


@pytest.mark.parametrize(("args", "kwargs"), PLAIN_CALLS)
def test_without_options_the_new_task_id_is_the_only_difference(
    app: App, monkeypatch: pytest.MonkeyPatch, args: list[Any], kwargs: dict[str, Any]
) -> None:
    monkeypatch.setattr(app_module, "new_task_id", lambda: TASK_ID)
    fast, general = both_ways(app, "fast.any", args, kwargs, {})
    assert isinstance(fast[0].envelope, FramedEnvelope)
    assert fast[1] == TASK_ID
    assert_same_message(fast, general)


def test_a_templated_message_reads_back_as_the_message_sent(app: App) -> None:
    (out, task_id), _ = both_ways(app, "fast.configured", [1, "é"], {"k": [2.5]}, {})
    message = Message.from_envelope(Envelope.from_bytes(out.envelope.to_bytes()), ["json"])
    assert (message.id, message.task, message.args, message.kwargs) == (
        task_id,
        "fast.configured",
        [1, "é"],
        {"k": [2.5]},
    )
    assert message.headers.timelimit == (30, 25.5) and message.headers.ignore_result is True
    assert message.priority == 8 and out.queue == "slow"
    assert message.headers.root_id == task_id and message.properties.correlation_id == task_id


def test_send_many_stores_the_general_path_s_bytes(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = iter([f"id-{n}" for n in range(3)] + [f"id-{n}" for n in range(3)])
    monkeypatch.setattr(app_module, "new_task_id", lambda: next(ids))
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any], dict[str, Any]]]
    calls = [("fast.any", (n, "ü"), {"n": n}, {}) for n in range(3)]
    results = app.send_many(calls)
    expected = [app._general_outgoing(name, list(a), dict(k), o)[0] for name, a, k, o in calls]
    consumer = app.broker.consumer(["celery"], prefetch=10)
    deliveries = consumer.receive(1.0, max_messages=10)
    assert [r.id for r in results] == ["id-0", "id-1", "id-2"]
    assert [d.envelope.to_bytes() for d in deliveries] == [e.envelope.to_bytes() for e in expected]
    assert [d.envelope for d in deliveries] == [Envelope.from_bytes(e.envelope.to_bytes()) for e in expected]


def test_delay_publishes_the_general_path_s_bytes(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "new_task_id", lambda: TASK_ID)
    result = app.tasks["fast.any"].delay(1, "ü", k=[2])
    expected, _ = app._general_outgoing("fast.any", [1, "ü"], {"k": [2]}, {})
    [delivery] = app.broker.consumer(["celery"], prefetch=1).receive(1.0)
    assert result.id == TASK_ID
    assert delivery.envelope.to_bytes() == expected.envelope.to_bytes()


def test_messages_share_no_mutable_header_state(app: App) -> None:
    first, _ = app._outgoing("fast.any", [1], {}, {})
    second, _ = app._outgoing("fast.any", [2], {}, {})
    one, two = first.envelope.headers, second.envelope.headers
    assert one is not two and one["stamps"] is not two["stamps"]
    assert first.envelope.properties is not second.envelope.properties
    one["stamps"]["mine"] = ["x"]
    third, _ = app._outgoing("fast.any", [3], {}, {})
    assert third.envelope.headers["stamps"] == {} and two["stamps"] == {}
    assert one["id"] != two["id"] != third.envelope.headers["id"]


#: Options that change headers, properties or the body: each must take the general path.
BYPASSING_OPTIONS: list[dict[str, Any]] = [
    {"eta": datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)},
    {"expires": datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)},
    {"priority": 9},
    {"priority": 0},
    {"headers": {"x-trace": "abc", "stamps": {"s": 1}}},
    {"link_error": {"task": "fast.any", "args": [], "kwargs": {}, "options": {}}},
    {"time_limit": 10},
    {"soft_time_limit": 5},
    {"time_limit": 10, "soft_time_limit": 5.5},
    {"ignore_result": True},
    {"retries": 2},
    {"parent_id": "p", "root_id": "r"},
    {"group_id": "g", "group_index": 3},
    {"shadow": "other.name"},
    {"chain": [{"task": "fast.any", "args": [], "kwargs": {}, "options": {}}]},
    {"serializer": "json"},
    {"serializer": "msgpack"},
    {"queue": "elsewhere", "priority": 2},
]


@pytest.mark.parametrize("options", BYPASSING_OPTIONS, ids=lambda o: ",".join(o))
def test_options_that_change_headers_take_the_general_path(app: App, options: dict[str, Any]) -> None:
    if options.get("serializer") == "msgpack":
        pytest.importorskip("msgpack")
    fast, general = both_ways(app, "fast.any", [1, "é"], {"k": 2}, {**options, "task_id": TASK_ID})
    assert not isinstance(fast[0].envelope, FramedEnvelope)
    assert_same_message(fast, general)


def test_a_link_takes_the_general_path_with_its_callbacks(app: App) -> None:
    link = app.signature("fast.any", (1,))
    (out, _), (ref, _) = both_ways(app, "fast.any", [1], {}, {"link": link, "task_id": TASK_ID})
    assert not isinstance(out.envelope, FramedEnvelope)
    assert out.envelope.to_bytes() == ref.envelope.to_bytes()
    assert json.loads(out.envelope.body)[2]["callbacks"][0]["task"] == "fast.any"


def test_timed_options_take_the_general_path_and_write_their_headers(app: App) -> None:
    (out, _), _ = both_ways(app, "fast.any", [1], {}, {"countdown": 30})
    assert not isinstance(out.envelope, FramedEnvelope)
    assert out.envelope.headers["eta"] is not None and 29 < out.delay_s <= 30
    (out, _), _ = both_ways(app, "fast.any", [1], {}, {"expires": 60})
    assert not isinstance(out.envelope, FramedEnvelope)
    assert out.envelope.headers["expires"] is not None


def test_a_task_whose_own_options_vary_per_message_is_not_templated(app: App) -> None:
    @app.task(name="fast.expiring", expires=60)
    def expiring() -> None:
        return None

    @app.task(name="fast.packed", serializer="msgpack")
    def packed() -> None:
        return None

    (out, _), _ = both_ways(app, "fast.expiring", [], {}, {})
    assert not isinstance(out.envelope, FramedEnvelope) and out.envelope.headers["expires"] is not None
    (out, _), _ = both_ways(app, "fast.packed", [], {}, {})
    assert not isinstance(out.envelope, FramedEnvelope) and out.envelope.content_type == "application/x-msgpack"


def test_non_text_keyword_names_take_the_general_path(app: App) -> None:
    with pytest.raises(Exception) as fast_error:
        app._outgoing("fast.any", [], {1: "x"}, {})  # type: ignore[dict-item]
    with pytest.raises(Exception) as general_error:
        app._general_outgoing("fast.any", [], {1: "x"}, {})  # type: ignore[dict-item]
    assert type(fast_error.value) is type(general_error.value)


def test_the_template_follows_changed_settings_and_task_options(app: App) -> None:
    first, _ = app._outgoing("fast.any", [], {}, {})
    assert first.priority == 4
    app.conf.task_default_priority = 6
    second, _ = app._outgoing("fast.any", [], {}, {})
    assert second.priority == 6 and second.envelope.properties["priority"] == 6

    @app.task(name="fast.any", time_limit=7)
    def replaced() -> None:
        return None

    fast, general = both_ways(app, "fast.any", [], {}, {"task_id": TASK_ID})
    assert isinstance(fast[0].envelope, FramedEnvelope)
    assert fast[0].envelope.headers["timelimit"] == (7, None)
    assert_same_message(fast, general)


def test_routes_and_the_queue_option_still_route(app: App) -> None:
    app.conf.task_routes = {"fast.*": "routed"}
    (out, _), (ref, _) = both_ways(app, "fast.any", [], {}, {})
    assert out.queue == ref.queue == "routed"
    (out, _), _ = both_ways(app, "fast.any", [], {}, {"queue": "explicit"})
    assert isinstance(out.envelope, FramedEnvelope) and out.queue == "explicit"


def test_arguments_json_cannot_write_fail_as_in_the_general_path(app: App) -> None:
    circular: list[Any] = [1]
    circular.append(circular)
    for build in (app._outgoing, app._general_outgoing):
        with pytest.raises(ValueError, match="Circular reference"):
            build("fast.any", [circular], {}, {})
        with pytest.raises(TypeError, match="not JSON serializable"):
            build("fast.any", [object()], {}, {})


def test_the_body_encoder_writes_what_json_dumps_writes() -> None:
    from taskframe.message import _json_text

    for args, kwargs in PLAIN_CALLS:
        assert _json_text([args, kwargs]).encode() == json_dumps([args, kwargs])


def test_a_framed_envelope_cannot_be_copied_with_stale_bytes(app: App) -> None:
    (out, _), _ = both_ways(app, "fast.any", [1], {}, {})
    with pytest.raises(TypeError):
        dataclasses.replace(out.envelope, body=b"[[2],{},{}]")


@pytest.mark.parametrize("make", ["one at a time", "a batch"])
def test_new_task_ids_are_random_version_4_uuids(make: str) -> None:
    ids = [new_task_id() for _ in range(20_000)] if make == "one at a time" else new_task_ids(20_000)
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    # Every other digit is random: each of the 16 values shows up at a free position.
    assert {text[0] for text in ids} == set("0123456789abcdef")
    assert {text[19] for text in ids} == set("89ab")


def test_send_many_of_plain_calls_on_sqlite_stores_what_the_general_path_would(tmp_path: Path) -> None:
    # The SQLite broker takes a send_many of plain calls already framed (FramePublisher):
    # each row must hold the bytes and task id the general path's envelope would give.
    import sqlite3

    app = App("frames", broker=f"sqlite:///{tmp_path / 'broker.sqlite3'}", backend="memory://")

    @app.task(name="frames.add")
    def add(x: Any, y: Any = 0) -> Any:
        return x

    calls: list[tuple[str, Any, Any, Any]] = [
        ("frames.add", (1, 2), {}, {}),
        ("frames.add", ('é"\\', [1.5, None]), {"y": {"k": True}}, {"queue": "other"}),
        ("frames.add", (3,), {}, {"task_id": "given-id"}),
    ]
    framed: list[Any] = []
    publish_frames = app.broker.publish_frames  # type: ignore[attr-defined]
    app.broker.publish_frames = lambda batches: (framed.append(batches), publish_frames(batches))  # type: ignore[attr-defined]
    results = app.send_many(calls)

    assert len(framed) == 1  # the framed path, one transaction
    with sqlite3.connect(tmp_path / "broker.sqlite3") as conn:
        rows = conn.execute("SELECT queue, priority, task_id, body FROM tf_messages ORDER BY id").fetchall()
    conn.close()
    expected = []
    for (name, args, kwargs, options), result in zip(calls, results, strict=True):
        out, _ = app._general_outgoing(name, list(args), dict(kwargs), {**options, "task_id": result.id})
        expected.append((out.queue, out.priority, result.id, out.envelope.to_bytes()))
    assert sorted(rows) == sorted(expected)
    assert results[2].id == "given-id"
    app.close()
