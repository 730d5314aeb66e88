"""File result backend: one JSON file per task in a directory, for hosts that share a disk.

URL: ``file:///absolute/dir``; as in Celery, ``file://localhost/absolute/dir`` is the same
directory and ``file://relative/dir`` is relative to the working directory (made absolute
when the backend is built, so a worker that changes directory keeps the same one). The
directory and its subdirectories are created on first write. POSIX only (``fcntl.flock``).

Layout::

    <dir>/<task_id>.json         one task's record
    <dir>/kv/_<key>.json         a document of put(); the key percent-encoded
    <dir>/counters/_<key>.json   a counter of incr()
    <dir>/locks/NN.lock          lock files, one per stripe of names

Each file holds ``{"expires_at": <epoch seconds or null>, "value": ...}``.

Features: task records, documents and counters with TTL; ``wait()`` polls with backoff
(``supports_wait = False``).

Guarantees:

- Writes go to a temporary file in the same directory, then ``os.replace`` renames it over
  the target: a reader sees the old file or the new one, never a partial one.
- The ready-state rule of ``store()`` (read, decide, write) and ``incr()`` run under an
  exclusive ``flock`` of the name's lock file, so they are atomic across threads and
  processes on one host, and across hosts where the filesystem supports ``flock``.
- A task id must be usable as a file name: non-empty, at most 200 bytes, not starting with
  ``.``, without ``/``, ``\\`` or NUL; anything else raises :class:`BackendError`, so an id
  like ``../x`` can never reach outside the directory. Keys of documents and counters are
  percent-encoded instead, so any key works.
- Files are not fsync'ed unless ``backend_options={"fsync": True}``: after a power loss the
  last results may be lost (the rename is still atomic).

Expiry: a file whose ``expires_at`` has passed reads as missing and is removed. Writes sweep
the directories at most once a minute, reading files for about 50 ms per sweep and resuming
where they stopped a second later; temporary files left by a crashed writer are removed
after an hour.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, ClassVar
from urllib.parse import quote, unquote

from taskframe.backend import READY_STATES, ExpirySweeper, ResultRecord, dump_json, poll_until_ready
from taskframe.exceptions import BackendError, ConfigurationError
from taskframe.settings import Settings, mask_url

#: Lock files shared by all names: more stripes, fewer unrelated writers waiting on each other.
LOCK_STRIPES = 32
#: Longest task id, in UTF-8 bytes (file names are limited to 255 bytes).
MAX_TASK_ID_BYTES = 200
#: Longest percent-encoded key, in bytes.
MAX_ENCODED_KEY_BYTES = 240
#: Seconds between two sweeps of expired files.
SWEEP_INTERVAL_S = 60.0
#: Seconds until the next sweep when the last one ran out of time.
SWEEP_RETRY_S = 1.0
#: Seconds a sweep may spend reading files.
SWEEP_BUDGET_S = 0.05
#: Age in seconds after which a temporary file is a crashed writer's leftover.
STALE_TEMP_S = 3600.0

log = logging.getLogger(__name__)

_SUFFIX = ".json"
_TEMP_PREFIX = ".tmp-"
_KEY_PREFIX = "_"  # keeps an encoded key from ever being "." or ".." or starting with "."
_OPTIONS = frozenset({"fsync"})


def directory_of(url: str) -> str:
    """The absolute directory named by a ``file:`` URL (Celery's convention, see above)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "file":
        msg = f"not a file URL: {mask_url(url)!r}; expected 'file:///absolute/dir'"
        raise ConfigurationError(msg)
    path = rest.split("?", 1)[0]
    if path.startswith("localhost/"):
        path = path[len("localhost") :]
    if path in ("", "/"):
        msg = f"file URL {mask_url(url)!r} names no directory; use 'file:///absolute/dir'"
        raise ConfigurationError(msg)
    return os.path.abspath(path)


class FileBackend:
    """Results as JSON files in a directory; see the module docstring."""

    supports_wait: ClassVar[bool] = False

    def __init__(self, url: str, conf: Settings) -> None:
        self._root = directory_of(url)
        self._fsync = _fsync_option(conf.backend_options)
        self._kv_dir = os.path.join(self._root, "kv")
        self._counters_dir = os.path.join(self._root, "counters")
        self._locks_dir = os.path.join(self._root, "locks")
        self._dirs_ready = False
        self._sweeper = ExpirySweeper(
            self._sweep, interval_s=SWEEP_INTERVAL_S, retry_s=SWEEP_RETRY_S, budget_s=SWEEP_BUDGET_S
        )
        self._sweep_offsets: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"FileBackend({self._root!r})"

    # -- task records -------------------------------------------------------------------------

    def store(self, task_id: str, record: ResultRecord, *, ttl_s: float | None) -> None:
        path = self._record_path(task_id)
        status = record.get("status")
        if not isinstance(status, str):
            msg = f"result record of task {task_id!r} has no 'status' string (got {status!r})"
            raise BackendError(msg)
        text = dump_json(_envelope(record, ttl_s), f"result of task {task_id!r}")
        self._ensure_dirs()
        with self._errors("store the result", path), self._locked(path):
            current = self._read_live(path, time.time())
            if _blocks(current, status):
                return  # a late STARTED/RETRY must not hide a final state
            self._write(path, text)
        self._maybe_sweep()

    def fetch(self, task_id: str) -> ResultRecord | None:
        record: ResultRecord | None = self._get_value(self._record_path(task_id))
        return record

    def wait(self, task_id: str, timeout_s: float) -> ResultRecord | None:
        return poll_until_ready(self, task_id, timeout_s)

    def forget(self, task_id: str) -> None:
        self._remove(self._record_path(task_id))

    # -- counters and documents ---------------------------------------------------------------

    def incr(self, key: str, *, ttl_s: float | None) -> int:
        path = self._key_path(self._counters_dir, key)
        self._ensure_dirs()
        with self._errors("increment the counter", path), self._locked(path):
            current = self._read_live(path, time.time())
            value = 1 if current is None else int(current) + 1
            self._write(path, dump_json(_envelope(value, ttl_s), f"counter {key!r}"))
        self._maybe_sweep()
        return value

    def put(self, key: str, value: dict[str, Any], *, ttl_s: float | None) -> None:
        path = self._key_path(self._kv_dir, key)
        text = dump_json(_envelope(value, ttl_s), f"document {key!r}")
        self._ensure_dirs()
        # Locked although a plain overwrite: a concurrent removal of the expired old file
        # must not remove the new one.
        with self._errors("store the document", path), self._locked(path):
            self._write(path, text)
        self._maybe_sweep()

    def get(self, key: str) -> dict[str, Any] | None:
        doc: dict[str, Any] | None = self._get_value(self._key_path(self._kv_dir, key))
        return doc

    def scan(self, prefix: str) -> list[dict[str, Any]]:
        """Every unexpired document whose key starts with ``prefix``, in key order."""
        with self._errors("list documents", self._kv_dir):
            try:
                names = os.listdir(self._kv_dir)
            except FileNotFoundError:
                return []
        keys = sorted(key for key in map(_decode_key, names) if key is not None)
        docs = []
        for key in keys:
            if key.startswith(prefix):
                doc = self.get(key)
                if doc is not None:  # expired or deleted since the listing
                    docs.append(doc)
        return docs

    def delete(self, key: str) -> None:
        """Delete the document and the counter stored under ``key``. Idempotent."""
        self._remove(self._key_path(self._kv_dir, key))
        self._remove(self._key_path(self._counters_dir, key))

    def close(self) -> None:
        """Nothing to release: no file stays open between calls."""

    # -- expiry -------------------------------------------------------------------------------

    def purge_expired(self, *, budget_s: float = SWEEP_BUDGET_S) -> int:
        """Remove expired files for about ``budget_s`` seconds; return how many."""
        return self._sweeper.purge(budget_s)

    def _maybe_sweep(self) -> None:
        self._sweeper.maybe_sweep()

    def _sweep(self, deadline: float) -> tuple[int, bool]:
        """Return (files removed, whether every directory was read to its end)."""
        removed = 0
        for directory in (self._root, self._kv_dir, self._counters_dir):
            count, finished = self._sweep_dir(directory, deadline)
            removed += count
            if not finished:
                return removed, False
        return removed, True

    def _sweep_dir(self, directory: str, deadline: float) -> tuple[int, bool]:
        # A sweep that runs out of time skips, next time, the entries it already read.
        skip = self._sweep_offsets.get(directory, 0)
        removed = seen = 0
        now = time.time()
        with self._errors("remove expired files", directory):
            try:
                entries = os.scandir(directory)
            except FileNotFoundError:
                return 0, True
            with entries:
                for entry in entries:
                    seen += 1
                    if seen <= skip:
                        continue
                    removed += self._sweep_entry(entry, now)
                    if time.monotonic() >= deadline:
                        self._sweep_offsets[directory] = seen
                        return removed, False
        self._sweep_offsets[directory] = 0
        return removed, True

    def _sweep_entry(self, entry: os.DirEntry[str], now: float) -> int:
        if entry.name.startswith(_TEMP_PREFIX):
            with suppress(FileNotFoundError):
                if entry.stat().st_mtime < now - STALE_TEMP_S:
                    os.unlink(entry.path)
            return 0
        if not entry.name.endswith(_SUFFIX) or not entry.is_file():
            return 0
        try:
            envelope = self._read(entry.path)
        except BackendError as exc:
            log.warning("sweep skips %s", exc)  # a reader will report it too; keep sweeping
            return 0
        if envelope is None or not _expired(envelope, now):
            return 0
        return 1 if self._remove_expired(entry.path) else 0

    # -- files --------------------------------------------------------------------------------

    def _record_path(self, task_id: str) -> str:
        if (
            not task_id
            or task_id.startswith(".")
            or any(char in task_id for char in "/\\\0")
            or len(task_id.encode("utf-8", "surrogatepass")) > MAX_TASK_ID_BYTES
        ):
            msg = (
                f"task id {task_id!r} cannot name a file in the file result backend: it must be "
                f"non-empty, at most {MAX_TASK_ID_BYTES} bytes, not start with '.', and contain "
                "no '/', '\\' or NUL"
            )
            raise BackendError(msg)
        return os.path.join(self._root, task_id + _SUFFIX)

    def _key_path(self, directory: str, key: str) -> str:
        name = _KEY_PREFIX + quote(key, safe="") + _SUFFIX
        if len(name) > MAX_ENCODED_KEY_BYTES:
            msg = (
                f"key {key[:40]!r}... is {len(name)} bytes once encoded as a file name, over "
                f"the limit of {MAX_ENCODED_KEY_BYTES}; use a shorter key"
            )
            raise BackendError(msg)
        return os.path.join(directory, name)

    def _ensure_dirs(self) -> None:
        if self._dirs_ready:
            return
        for directory in (self._root, self._kv_dir, self._counters_dir, self._locks_dir):
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as exc:
                msg = (
                    f"file result backend cannot create the directory {directory!r}: "
                    f"{exc.strerror or exc}; use a writable path in the URL (file:///absolute/dir)"
                )
                raise ConfigurationError(msg) from exc
        self._dirs_ready = True

    @contextmanager
    def _locked(self, path: str) -> Iterator[None]:
        """Hold the exclusive lock of ``path``'s stripe (across threads and processes)."""
        stripe = zlib.crc32(path.encode("utf-8", "surrogatepass")) % LOCK_STRIPES
        lock_path = os.path.join(self._locks_dir, f"{stripe:02d}.lock")
        # A new descriptor per call: flock() excludes other open file descriptions, so
        # threads of one process exclude each other too, and a fork inherits nothing.
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _get_value(self, path: str) -> Any:
        """The value in ``path`` unless it is missing or expired (then removed)."""
        now = time.time()
        with self._errors("read", path):
            envelope = self._read(path)
            if envelope is None:
                return None
            if _expired(envelope, now):
                self._remove_expired(path)
                return None
        return envelope["value"]

    def _read_live(self, path: str, now: float) -> Any:
        """The unexpired value in ``path`` or None, without removing anything."""
        envelope = self._read(path)
        if envelope is None or _expired(envelope, now):
            return None
        return envelope["value"]

    def _read(self, path: str) -> dict[str, Any] | None:
        try:
            with open(path, encoding="utf-8") as file:
                text = file.read()
        except FileNotFoundError:
            return None
        try:
            envelope = json.loads(text)
        except ValueError as exc:
            msg = f"{path} is not valid JSON ({exc}); delete the file or restore it from a backup"
            raise BackendError(msg) from exc
        if not isinstance(envelope, dict) or "value" not in envelope:
            msg = f"{path} was not written by the file result backend; move it elsewhere"
            raise BackendError(msg)
        return envelope

    def _write(self, path: str, text: str) -> None:
        directory = os.path.dirname(path)
        temp = os.path.join(directory, f"{_TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(text)
                if self._fsync:
                    file.flush()
                    os.fsync(file.fileno())
            os.replace(temp, path)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        if self._fsync:
            _fsync_directory(directory)

    def _remove(self, path: str) -> None:
        if not os.path.exists(path):
            return  # idempotent, and creates no directory for nothing
        self._ensure_dirs()
        with self._errors("remove", path), self._locked(path), suppress(FileNotFoundError):
            os.unlink(path)

    def _remove_expired(self, path: str) -> bool:
        """Remove ``path`` if it is still expired once locked (a writer may have renewed it)."""
        self._ensure_dirs()
        with self._locked(path):
            envelope = self._read(path)
            if envelope is None or not _expired(envelope, time.time()):
                return False
            with suppress(FileNotFoundError):
                os.unlink(path)
            return True

    @contextmanager
    def _errors(self, action: str, path: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            msg = (
                f"file result backend could not {action} {path!r}: {exc.strerror or exc}; "
                "check that the directory exists and is writable by this user"
            )
            raise BackendError(msg) from exc


def _fsync_option(options: dict[str, Any]) -> bool:
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        msg = f"unknown backend_options {unknown} for the file result backend; known: {sorted(_OPTIONS)}"
        raise ConfigurationError(msg)
    value = options.get("fsync", False)
    if not isinstance(value, bool):
        msg = f"backend_options fsync must be true or false, got {value!r}"
        raise ConfigurationError(msg)
    return value


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _decode_key(name: str) -> str | None:
    if not (name.startswith(_KEY_PREFIX) and name.endswith(_SUFFIX)):
        return None  # a temporary file
    return unquote(name[len(_KEY_PREFIX) : -len(_SUFFIX)])


def _envelope(value: Any, ttl_s: float | None) -> dict[str, Any]:
    expires_at = None if ttl_s is None else time.time() + ttl_s
    return {"expires_at": expires_at, "value": value}


def _expired(envelope: dict[str, Any], now: float) -> bool:
    expires_at = envelope.get("expires_at")
    return expires_at is not None and float(expires_at) <= now


def _blocks(current: Any, new_status: str) -> bool:
    """Whether the stored record keeps its place against a record of ``new_status``."""
    if not isinstance(current, dict) or new_status in READY_STATES:
        return False
    return current.get("status") in READY_STATES
