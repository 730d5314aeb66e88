"""URL parsing shared by the core and the adapters."""

from __future__ import annotations

import os

from .exceptions import ConfigurationError
from .settings import mask_url


def sqlite_path(url: str) -> str:
    """The file path of a ``sqlite:`` (or ``db+sqlite:``) URL, SQLAlchemy's convention.

    ``sqlite:///rel/path.db`` is relative to the working directory (made absolute here, so a
    worker that changes directory keeps the same file); ``sqlite:////abs/path.db`` is
    absolute; ``sqlite://`` alone means ``./taskframe.sqlite3``.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme.endswith("sqlite"):
        msg = f"not a sqlite URL: {mask_url(url)!r}; expected 'sqlite:///relative.db' or 'sqlite:////abs.db'"
        raise ConfigurationError(msg)
    path = rest.split("?", 1)[0]
    if path in ("", "/"):
        path = "/taskframe.sqlite3"
    if not path.startswith("/"):
        msg = f"sqlite URL {mask_url(url)!r} has a host part; use 'sqlite:///relative.db' or 'sqlite:////abs.db'"
        raise ConfigurationError(msg)
    path = path[1:]  # sqlite:///x -> "x" (relative); sqlite:////x -> "/x" (absolute)
    if path == ":memory:":
        msg = "sqlite ':memory:' cannot be shared between a producer and a worker; use a file path"
        raise ConfigurationError(msg)
    return os.path.abspath(path)
