"""RQ-style calls of plain functions: ``app.enqueue(sum, [42, 43])``.

The function travels by its dotted path as the task name. A worker runs such a path only if
it matches the ``enqueue_allow`` setting, so whoever can write to the broker cannot make a
worker call arbitrary code (RQ runs whatever callable a message names).
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import App
    from .task import Task


def dotted_path(func: Callable[..., Any] | str) -> str:
    """The importable path of a module-level function; refuse what a worker cannot import."""
    if isinstance(func, str):
        if "." not in func:
            msg = f"enqueue needs a dotted path like 'package.module.function'; got {func!r}"
            raise ValueError(msg)
        return func
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    owner = getattr(func, "__self__", None)
    if owner is not None and not isinstance(owner, type(importlib)):  # builtins' __self__ is their module
        msg = f"cannot enqueue the bound method {qualname}: a worker cannot rebuild its instance; use a function"
        raise ValueError(msg)
    if not module or not qualname:
        msg = f"cannot enqueue {func!r}: it has no module and name a worker could import"
        raise ValueError(msg)
    if qualname == "<lambda>" or "<lambda>" in qualname:
        msg = "cannot enqueue a lambda: a worker cannot import it; define a module-level function"
        raise ValueError(msg)
    if "<locals>" in qualname:
        msg = f"cannot enqueue the nested function {qualname}: a worker cannot import it; move it to module level"
        raise ValueError(msg)
    if module == "__main__":
        msg = f"cannot enqueue {qualname} from __main__: a worker imports it by module; move it to a module"
        raise ValueError(msg)
    return f"{module}.{qualname}"


def is_allowed(app: App, path: str) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in app.conf.enqueue_allow)


def resolve_enqueued(app: App, path: str) -> Task[Any, Any] | None:
    """A task wrapping the function at ``path`` if ``enqueue_allow`` permits it, else None."""
    if not is_allowed(app, path):
        return None
    func = _import_path(path)
    if func is None:
        return None
    from .task import Task, TaskOptions

    task: Task[Any, Any] = Task(app, func, path, TaskOptions(name=path))
    return task


def _import_path(path: str) -> Callable[..., Any] | None:
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj if callable(obj) else None
    return None
