"""MongoDB result backend (pymongo).

URL: ``mongodb://[user:password@]host[:port][,host2:port2...]/[database][?options]``, or
``mongodb+srv://...``; pymongo reads the options. The database comes from the path, default
``taskframe``.

Layout: three collections, one document per task id or key, each with a TTL index
(``expireAfterSeconds=0``) on its ``expires_at`` date::

    taskframe_results   {_id: task id, status: "SUCCESS", record: "<JSON text>", expires_at, expires_at_s}
    taskframe_kv        {_id: key, value: "<JSON text>", expires_at, expires_at_s}
    taskframe_counters  {_id: key, value: 3, expires_at, expires_at_s}

``expires_at`` (a date, for MongoDB's TTL monitor) and ``expires_at_s`` (the same instant in
Unix seconds, which reads compare) are both absent when the entry never expires.

Records and documents are kept as JSON text, not as BSON sub-documents, so that what comes
back is exactly what a SQL or Redis backend gives back (any key is allowed, integers of any
size round-trip), and ``status`` is repeated beside it for the atomic writes below.

Features: task records, small JSON documents and counters, each with an optional TTL.
``wait()`` polls with backoff (``supports_wait = False``): change streams would need a
replica set.

Guarantees:

- A ready state (SUCCESS, FAILURE, REVOKED) is written with one unconditional
  ``replace_one(upsert=True)``. Any other state is written with ``replace_one`` filtered on
  ``{_id, status: {$nin: ready states}}`` with ``upsert=True``: a stored ready state does
  not match, so the upsert tries to insert a second document with the same ``_id`` and fails
  with a duplicate key error, which is how "a late STARTED never replaces SUCCESS" is
  decided atomically by the server. After that error the write is retried on the documents
  that may legitimately be replaced: a non-ready one a racing writer inserted, or an expired
  one.
- ``incr()`` is one ``find_one_and_update`` with ``$inc`` and ``upsert=True``, returning
  the document after the update, so each value is handed out once across processes. An
  expired counter is deleted first (by a filter on its expiry), so it starts again at one.
- Fork-safe: a child process builds its own ``MongoClient`` on first use; the parent's is
  never used or closed there (pymongo warns about clients used across fork).

Expiry: the TTL indexes make MongoDB delete expired documents, but its TTL monitor runs only
once a minute, so every read also filters on ``expires_at_s``: an expired entry reads as
missing at once. Reads compare the number rather than the date because nx-27017 compares dates
to the whole second only (and a date written by ``$set`` not at all); on MongoDB either would do.

Options (``backend_options``): ``server_selection_timeout_s`` (10): how long an operation
waits for a reachable server before it fails with :class:`BackendError`.

Tested with pymongo 4.20 against nx-27017 0.8.1 (a MongoDB wire-protocol server on SQLite,
which the test suite starts), not against a real MongoDB server. Only operations that both
support are used, and the code steps around the gaps of nx-27017 it met: a ``replace_one``
upsert always carries ``_id`` in the replacement (nx-27017 would insert under a new ObjectId
otherwise); no ``$setOnInsert`` (``find_one_and_update`` ignores it there), no ``$not`` (not
implemented) and no ``$nor``; ``_id`` is combined with ``$or`` only inside ``$and`` (a
top-level ``{_id: x, $or: [...]}`` ignores the ``_id`` there); expiry is compared as a number
(above); a missing field stands for "no expiry", never a stored null (``{field: null}``
matches only a missing field there).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, ClassVar, TypeVar
from urllib.parse import unquote

import pymongo
from pymongo import MongoClient, ReturnDocument
from pymongo.collection import Collection
from pymongo.errors import ConfigurationError as MongoConfigurationError
from pymongo.errors import ConnectionFailure, DuplicateKeyError, InvalidURI, PyMongoError

from taskframe.backend import READY_STATES, ResultRecord, dump_json, poll_until_ready
from taskframe.exceptions import BackendError, ConfigurationError
from taskframe.settings import Settings, mask_url

#: Database used when the URL names none.
DEFAULT_DATABASE = "taskframe"
#: Seconds an operation waits for a reachable server.
DEFAULT_SERVER_SELECTION_TIMEOUT_S = 10.0

RESULTS = "taskframe_results"
KV = "taskframe_kv"
COUNTERS = "taskframe_counters"

_READY = sorted(READY_STATES)
_OPTIONS = frozenset({"server_selection_timeout_s"})

Document = dict[str, Any]
_T = TypeVar("_T")

#: Clients inherited through fork(). Kept referenced, never closed: closing one in the child
#: would act on sessions and sockets that belong to the parent.
_INHERITED_CLIENTS: list[object] = []


class _ProcessState:
    """What a backend object keeps per process; a forked child starts with a fresh one."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.client: MongoClient[Document] | None = None
        self.indexes_ready = False


class MongoDBBackend:
    """Results in MongoDB collections; see the module docstring for layout and guarantees."""

    supports_wait: ClassVar[bool] = False

    def __init__(self, url: str, conf: Settings) -> None:
        self._url = url
        self._shown = mask_url(url)
        self._timeout_s = _server_selection_timeout_s(conf.backend_options)
        self._state = _ProcessState()
        self._database = _database_of(url)

    def __repr__(self) -> str:
        return f"MongoDBBackend({self._shown!r})"

    # -- task records -------------------------------------------------------------------------

    def store(self, task_id: str, record: ResultRecord, *, ttl_s: float | None) -> None:
        status = record.get("status")
        if not isinstance(status, str):
            msg = f"result record of task {task_id!r} has no 'status' string (got {status!r})"
            raise BackendError(msg)
        doc: Document = {"_id": task_id, "status": status, "record": dump_json(record, f"result of task {task_id!r}")}
        now = time.time()
        doc.update(_expiry(now, ttl_s))
        self._run("store the result", lambda: self._replace(task_id, doc, ready=status in READY_STATES, now=now))

    def _replace(self, task_id: str, doc: Document, *, ready: bool, now: float) -> None:
        collection = self._collection(RESULTS)
        if ready:
            _replace_upsert(collection, {"_id": task_id}, doc)
            return
        not_ready = {"_id": task_id, "status": {"$nin": _READY}}
        try:
            collection.replace_one(not_ready, doc, upsert=True)
            return
        except DuplicateKeyError:
            pass  # a document with this id exists and did not match: it is (or just was) ready
        if collection.replace_one(not_ready, doc).matched_count:
            return  # it was a racing writer's non-ready insert, which this write may replace
        # An expired final state no longer counts, so a reused task id may start over.
        collection.replace_one({"_id": task_id, "expires_at_s": {"$lte": now}}, doc)

    def fetch(self, task_id: str) -> ResultRecord | None:
        text = self._read_live(RESULTS, task_id, "record")
        if text is None:
            return None
        record: ResultRecord = json.loads(text)
        return record

    def wait(self, task_id: str, timeout_s: float) -> ResultRecord | None:
        return poll_until_ready(self, task_id, timeout_s)

    def forget(self, task_id: str) -> None:
        self._run("forget the result", lambda: self._collection(RESULTS).delete_one({"_id": task_id}))

    # -- counters and documents ---------------------------------------------------------------

    def incr(self, key: str, *, ttl_s: float | None) -> int:
        def increment() -> int:
            collection = self._collection(COUNTERS)
            now = time.time()
            # An expired counter starts again at one (the TTL monitor may not have run yet).
            collection.delete_one({"_id": key, "expires_at_s": {"$lte": now}})
            update: Document = {"$inc": {"value": 1}}
            if ttl_s is None:
                update["$unset"] = {"expires_at": "", "expires_at_s": ""}
            else:
                update["$set"] = _expiry(now, ttl_s)
            doc = _upsert_retry(
                lambda: collection.find_one_and_update(
                    {"_id": key}, update, upsert=True, return_document=ReturnDocument.AFTER
                )
            )
            if doc is None:  # cannot happen with upsert=True and ReturnDocument.AFTER
                msg = f"the server returned no counter document for {key!r}"
                raise BackendError(msg)
            return int(doc["value"])

        return self._run("increment the counter", increment)

    def put(self, key: str, value: dict[str, Any], *, ttl_s: float | None) -> None:
        doc: Document = {"_id": key, "value": dump_json(value, f"document {key!r}")}
        doc.update(_expiry(time.time(), ttl_s))
        self._run("store the document", lambda: _replace_upsert(self._collection(KV), {"_id": key}, doc))

    def get(self, key: str) -> dict[str, Any] | None:
        text = self._read_live(KV, key, "value")
        if text is None:
            return None
        doc: dict[str, Any] = json.loads(text)
        return doc

    def scan(self, prefix: str) -> list[dict[str, Any]]:
        """Every unexpired document whose key starts with ``prefix``, in key order."""
        bounds: Document = {"$gte": prefix}
        upper = _prefix_upper_bound(prefix)
        if upper is not None:
            bounds["$lt"] = upper

        def read() -> list[Document]:
            query = {"$and": [{"_id": bounds}, _live(time.time())]}
            return list(self._collection(KV).find(query).sort("_id", pymongo.ASCENDING))

        docs = self._run("scan documents", read)
        return [json.loads(doc["value"]) for doc in docs if str(doc["_id"]).startswith(prefix)]

    def delete(self, key: str) -> None:
        """Delete the document and the counter stored under ``key``. Idempotent."""

        def remove() -> None:
            self._collection(KV).delete_one({"_id": key})
            self._collection(COUNTERS).delete_one({"_id": key})

        self._run("delete the key", remove)

    # -- connections --------------------------------------------------------------------------

    def close(self) -> None:
        """Close this process's client; a later call opens a new one."""
        state = self._process_state()
        with state.lock:
            client, state.client = state.client, None
            state.indexes_ready = False
        if client is not None:
            client.close()

    def _process_state(self) -> _ProcessState:
        state = self._state
        if state.pid != os.getpid():
            _INHERITED_CLIENTS.append(state)
            state = self._state = _ProcessState()
        return state

    def _client(self) -> MongoClient[Document]:
        state = self._process_state()
        with state.lock:
            if state.client is None:
                state.client = self._connect()
            return state.client

    def _connect(self) -> MongoClient[Document]:
        try:
            return MongoClient(
                self._url,
                tz_aware=True,
                connect=False,  # connect on first use: building a backend does no IO
                serverSelectionTimeoutMS=int(self._timeout_s * 1000),
                appname="taskframe",
            )
        except (InvalidURI, MongoConfigurationError, ValueError, TypeError) as exc:
            msg = f"cannot use the MongoDB result backend URL {self._shown!r}: {exc}"
            raise ConfigurationError(msg) from None

    def _collection(self, name: str) -> Collection[Document]:
        client = self._client()
        database = client[self._database]
        state = self._process_state()
        if not state.indexes_ready:
            for each in (RESULTS, KV, COUNTERS):
                # Idempotent; MongoDB deletes a document once its expires_at date has passed.
                database[each].create_index("expires_at", expireAfterSeconds=0, name="taskframe_expires_at")
            state.indexes_ready = True
        return database[name]

    def _read_live(self, collection: str, key: str, field: str) -> str | None:
        def read() -> Document | None:
            query = {"$and": [{"_id": key}, _live(time.time())]}
            return self._collection(collection).find_one(query, projection={field: True})

        doc = self._run("read", read)
        return None if doc is None else str(doc[field])

    def _run(self, action: str, operation: Callable[[], _T]) -> _T:
        try:
            return operation()
        except PyMongoError as exc:
            hint = (
                "check that MongoDB is running and reachable"
                if isinstance(exc, ConnectionFailure)
                else "check the server and the backend URL"
            )
            reason = str(exc).split(", full error:")[0]
            msg = f"mongodb result backend {self._shown!r} could not {action}: {reason}; {hint}"
            raise BackendError(msg) from exc


def _database_of(url: str) -> str:
    """The database named by the URL's path, else :data:`DEFAULT_DATABASE`.

    Read without pymongo, which would resolve a ``mongodb+srv`` name (network IO) to parse.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("mongodb", "mongodb+srv"):
        msg = f"not a MongoDB URL: {mask_url(url)!r}; expected 'mongodb://host:27017/database'"
        raise ConfigurationError(msg)
    _hosts, slash, path = rest.partition("/")
    database = unquote(path.split("?", 1)[0]) if slash else ""
    if any(char in database for char in '/\\. "$'):
        msg = f"MongoDB database name {database!r} in {mask_url(url)!r} has a character MongoDB forbids"
        raise ConfigurationError(msg)
    return database or DEFAULT_DATABASE


def _replace_upsert(collection: Collection[Document], query: Mapping[str, Any], doc: Document) -> None:
    _upsert_retry(lambda: collection.replace_one(query, doc, upsert=True))


def _upsert_retry(operation: Callable[[], _T]) -> _T:
    """Run an upsert on ``_id``; once more if a racing upsert inserted that ``_id`` first.

    MongoDB 4.2+ retries such upserts itself; older servers (and nx-27017) report the race
    as a duplicate key, and the second try then finds the document and updates it.
    """
    try:
        return operation()
    except DuplicateKeyError:
        return operation()


def _live(now: float) -> Document:
    # {field: None} matches a missing field (the field is never stored as null).
    return {"$or": [{"expires_at_s": None}, {"expires_at_s": {"$gt": now}}]}


def _expiry(now: float, ttl_s: float | None) -> Document:
    """The expiry fields of an entry written at ``now`` (Unix seconds); none without a TTL."""
    if ttl_s is None:
        return {}
    expires_at_s = now + ttl_s
    return {"expires_at": datetime.fromtimestamp(expires_at_s, timezone.utc), "expires_at_s": expires_at_s}


def _server_selection_timeout_s(options: dict[str, Any]) -> float:
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        msg = f"unknown backend_options {unknown} for the MongoDB result backend; known: {sorted(_OPTIONS)}"
        raise ConfigurationError(msg)
    value = options.get("server_selection_timeout_s", DEFAULT_SERVER_SELECTION_TIMEOUT_S)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        msg = f"backend_options server_selection_timeout_s must be a number of seconds > 0, got {value!r}"
        raise ConfigurationError(msg)
    return float(value)


def _prefix_upper_bound(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix``; None if unbounded.

    MongoDB compares strings by their UTF-8 bytes (no collation), which orders like code
    points, so a prefix is a range of ``_id``.
    """
    for index in range(len(prefix) - 1, -1, -1):
        code = ord(prefix[index]) + 1
        if 0xD800 <= code <= 0xDFFF:
            code = 0xE000  # surrogates cannot be encoded
        if code <= 0x10FFFF:
            return prefix[:index] + chr(code)
    return None
