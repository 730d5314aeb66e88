"""Settings: one pydantic model, filled from keyword arguments, then ``TASKFRAME_*``, then defaults."""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .exceptions import ConfigurationError

#: Where the embedded default keeps its broker queue and results, relative to the working directory.
DEFAULT_SQLITE_URL = "sqlite:///taskframe.sqlite3"
#: Prefix of the environment variables read for each setting (``TASKFRAME_BROKER_URL``).
ENV_PREFIX = "TASKFRAME_"

_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.\-]*://[^:/?#@]*:)(?P<password>[^@/?#]*)(?=@)", re.I)


def mask_url(text: str) -> str:
    """Replace every password in URLs within ``text`` by ``***`` (for logs, errors and CLI)."""
    return _URL_PASSWORD.sub(lambda m: m.group("head") + "***", text)


class Settings(BaseModel):
    """Every setting of an App (``app.conf``). Durations are seconds."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    broker_url: str = DEFAULT_SQLITE_URL
    result_backend: str | None = None  # None: the broker's URL when it is sqlite/memory, else sqlite
    default_queue: str = "celery"
    #: Task name glob -> queue name, e.g. ``{"tasks.*": "low-priority"}``; first match wins.
    task_routes: dict[str, str] = Field(default_factory=dict)
    task_serializer: Literal["json", "msgpack", "pickle"] = "json"
    accept_content: list[str] = Field(default_factory=lambda: ["json"])
    task_acks_late: bool = True
    task_track_started: bool = False
    task_time_limit: float | None = Field(default=None, gt=0)
    task_soft_time_limit: float | None = Field(default=None, gt=0)
    task_default_priority: int = Field(default=4, ge=0, le=9)
    result_expires: float | None = Field(default=86400.0, gt=0)
    result_extended: bool = False
    #: Messages a worker holds beyond its free execution slots.
    worker_prefetch: int = Field(default=4, ge=0)
    worker_concurrency: int | None = Field(default=None, ge=1)
    worker_heartbeat_interval: float = Field(default=2.0, gt=0)
    #: How long a leased message stays invisible if its worker stops renewing the lease.
    visibility_timeout: float = Field(default=30.0, gt=0)
    max_deliveries: int = Field(default=5, ge=1)
    broker_connect_timeout: float = Field(default=30.0, ge=0)
    broker_options: dict[str, Any] = Field(default_factory=dict)
    backend_options: dict[str, Any] = Field(default_factory=dict)
    #: Glob patterns of dotted paths a worker may run through ``app.enqueue`` (RQ style).
    enqueue_allow: list[str] = Field(default_factory=list)
    #: Modules a worker imports at start so their tasks are registered.
    imports: list[str] = Field(default_factory=list)

    def __repr_args__(self) -> Any:
        for key, value in super().__repr_args__():
            yield key, mask_url(value) if isinstance(value, str) else value

    @property
    def effective_result_backend(self) -> str:
        """The result backend URL: explicit, else the broker's own URL when a backend speaks
        its scheme (sqlite, memory, redis), else the embedded SQLite file."""
        if self.result_backend:
            return self.result_backend
        from .registry import BACKENDS, scheme_of

        if scheme_of(self.broker_url) in BACKENDS:
            return self.broker_url
        return DEFAULT_SQLITE_URL


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        annotation = str(field.annotation)
        if raw.strip()[:1] in "[{" and ("dict" in annotation or "list" in annotation):
            try:
                values[name] = json.loads(raw)
            except ValueError as exc:
                msg = f"setting {name!r} from ${ENV_PREFIX}{name.upper()} is not valid JSON: {exc}"
                raise ConfigurationError(msg) from exc
        else:
            values[name] = raw
    return values


#: Aliases accepted as keyword arguments to App(), as Celery accepts them.
ALIASES = {"broker": "broker_url", "backend": "result_backend"}


def load_settings(overrides: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from keyword arguments, then the environment, then defaults."""
    values = _from_environment(os.environ if environ is None else environ)
    for key, value in overrides.items():
        if value is None and key in ALIASES:
            continue
        values[ALIASES.get(key, key)] = value
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigurationError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"]) or "settings"
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, list(Settings.model_fields), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            parts.append(f"unknown setting {key!r}; {hint}known: {', '.join(sorted(Settings.model_fields))}")
        else:
            shown = mask_url(repr(error.get("input")))
            parts.append(f"setting {key!r}: {error['msg']} (got {shown})")
    return "; ".join(parts)
