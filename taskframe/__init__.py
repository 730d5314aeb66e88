"""taskframe: a broker-agnostic, Celery-style task framework.

::

    from taskframe import App

    app = App("proj")          # embedded SQLite broker and results in ./taskframe.sqlite3

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    add.delay(4, 4).get(timeout=10)   # 8, once `taskframe worker -A proj` runs
"""

from .app import App, current_app
from .canvas import Signature, chain, chord, group, signature
from .result import AsyncResult, GroupResult
from .settings import Settings
from .task import Task

__version__ = "0.1.0"

__all__ = [
    "App",
    "AsyncResult",
    "GroupResult",
    "Settings",
    "Signature",
    "Task",
    "chain",
    "chord",
    "current_app",
    "group",
    "signature",
]
