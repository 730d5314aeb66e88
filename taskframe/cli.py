"""The ``taskframe`` command: worker, call, result, status, purge, dead.

Every command takes ``-A/--app module[:attr]`` before or after its name; else
``$TASKFRAME_APP``, else ``[tool.taskframe] app`` in ./pyproject.toml. Errors print one line
on stderr, without a traceback, and exit non-zero.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from .app import App
from .exceptions import TaskError, TaskframeError
from .result import AsyncResult
from .settings import mask_url

LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"


class JSONLogFormatter(logging.Formatter):
    """One JSON object per log line (``taskframe worker --json``), for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "process": record.processName,
            "logger": record.name,
            "message": mask_url(record.getMessage()),
        }
        return json.dumps(entry)


class CommandError(Exception):
    """A problem with what the user asked for: printed as one line, exit 1."""


# -- finding the app ----------------------------------------------------------------------------


def app_spec_from_pyproject(path: str = "pyproject.toml") -> str | None:
    if not os.path.exists(path):
        return None
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # the same parser, from PyPI
        import tomli as tomllib
    with open(path, "rb") as handle:
        data = tomllib.load(handle)
    spec = data.get("tool", {}).get("taskframe", {}).get("app")
    return str(spec) if spec else None


def load_app(spec: str | None, *, required: bool) -> App:
    spec = spec or os.environ.get("TASKFRAME_APP") or app_spec_from_pyproject()
    if not spec:
        if required:
            msg = (
                "no app given: pass -A module[:attr], set TASKFRAME_APP, or set [tool.taskframe] app in pyproject.toml"
            )
            raise CommandError(msg)
        return App()
    module_name, _, attr = spec.partition(":")
    if module_name.endswith(".py"):
        module_name = module_name[:-3].replace(os.sep, ".")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name == module_name or (exc.name and module_name.startswith(exc.name)):
            msg = f"cannot import the app module {module_name!r} (from -A {spec!r}): {exc}"
            raise CommandError(msg) from None
        raise
    if attr:
        app = getattr(module, attr, None)
        if not isinstance(app, App):
            msg = f"{module_name!r} has no taskframe App named {attr!r}"
            raise CommandError(msg)
        return app
    candidate = getattr(module, "app", None)
    if isinstance(candidate, App):
        return candidate
    apps = [value for value in vars(module).values() if isinstance(value, App)]
    if len(apps) == 1:
        return apps[0]
    msg = f"module {module_name!r} has {len(apps) or 'no'} taskframe App(s); name one with -A {module_name}:attr"
    raise CommandError(msg)


# -- commands -----------------------------------------------------------------------------------


def _queues(args: argparse.Namespace, app: App) -> list[str]:
    if getattr(args, "queues", None):
        return [q.strip() for q in args.queues.split(",") if q.strip()]
    return [app.conf.default_queue]


def cmd_worker(args: argparse.Namespace) -> int:
    from .worker import Worker

    app = load_app(args.app, required=True)
    for module in app.conf.imports:
        importlib.import_module(module)
    worker = Worker(
        app,
        _queues(args, app),
        concurrency=args.concurrency,
        pool=args.pool,
        prefetch=args.prefetch,
        max_tasks_per_child=args.max_tasks_per_child,
        shutdown_timeout_s=args.shutdown_timeout,
        burst=args.burst,
    )
    try:
        return worker.run()
    finally:
        app.close()


def _json_arg(text: str | None, what: str, kind: type) -> Any:
    if text is None:
        return kind()
    try:
        value = json.loads(text)
    except ValueError as exc:
        msg = f"--{what} is not valid JSON ({exc}): {text!r}"
        raise CommandError(msg) from None
    if not isinstance(value, kind):
        msg = f"--{what} must be a JSON {'list' if kind is list else 'object'}; got {text!r}"
        raise CommandError(msg)
    return value


def _print_result(result: AsyncResult[Any], as_json: bool, timeout: float | None, wait: bool) -> int:
    if wait:
        try:
            result.get(timeout=timeout, propagate=False)
        except TaskframeError as exc:
            raise CommandError(str(exc)) from None
    state = result.state
    value = result.info
    failed = isinstance(value, BaseException)
    shown: Any = _describe_exception(value) if failed else value
    if as_json:
        print(json.dumps({"id": result.id, "state": state, "result": shown}, default=str))
    else:
        print(state)
        print(json.dumps(shown, default=str))
    return 1 if state == "FAILURE" else 0


def _describe_exception(exc: Any) -> dict[str, Any]:
    if isinstance(exc, TaskError):
        return {"exc_type": exc.exc_type, "exc_message": exc.exc_message}
    return {"exc_type": type(exc).__name__, "exc_message": str(exc)}


def cmd_call(args: argparse.Namespace) -> int:
    app = load_app(args.app, required=False)
    call_args = _json_arg(args.args, "args", list)
    call_kwargs = _json_arg(args.kwargs, "kwargs", dict)
    options: dict[str, Any] = {}
    if args.queue:
        options["queue"] = args.queue
    if args.countdown:
        options["countdown"] = args.countdown
    result = app.send_task(args.name, call_args, call_kwargs, **options)
    if not args.wait:
        print(json.dumps({"id": result.id}) if args.json else result.id)
        return 0
    return _print_result(result, args.json, args.timeout, wait=True)


def cmd_result(args: argparse.Namespace) -> int:
    app = load_app(args.app, required=False)
    return _print_result(app.AsyncResult(args.id), args.json, args.timeout, wait=args.wait)


def _status_queues(args: argparse.Namespace, app: App) -> list[str]:
    queues = app.known_queues()
    if getattr(args, "queues", None):
        queues += _queues(args, app)
    return list(dict.fromkeys(queues))


def cmd_status(args: argparse.Namespace) -> int:
    app = load_app(args.app, required=False)
    stats = [app.broker.stats(q) for q in _status_queues(args, app)]
    workers = sorted(app.backend.scan("worker-"), key=lambda w: str(w.get("name")))
    if args.json:
        print(
            json.dumps(
                {
                    "queues": [
                        {
                            "queue": s.queue,
                            "ready": s.ready,
                            "delayed": s.delayed,
                            "reserved": s.reserved,
                            "dead": s.dead,
                        }
                        for s in stats
                    ],
                    "workers": workers,
                }
            )
        )
        return 0
    for s in stats:
        print(f"queue {s.queue}: {s.ready} ready, {s.delayed} delayed, {s.reserved} reserved, {s.dead} dead")
    if not workers:
        print("no live workers")
    now = time.time()
    for w in workers:
        age = now - float(w.get("last_heartbeat") or 0)
        print(
            f"worker {w.get('name')}: queues {','.join(w.get('queues') or [])}, pid {w.get('pid')}, "
            f"{w.get('tasks_done')} tasks done, last heartbeat {age:.1f}s ago"
        )
    return 0


def _confirm(question: str, force: bool) -> None:
    if force:
        return
    if not sys.stdin.isatty():
        msg = f"{question} needs confirmation and there is no terminal; pass -f to confirm"
        raise CommandError(msg)
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        msg = "aborted: nothing was deleted"
        raise CommandError(msg)


def cmd_purge(args: argparse.Namespace) -> int:
    app = load_app(args.app, required=False)
    queues = _queues(args, app)
    _confirm(f"delete every ready and delayed message of {', '.join(queues)}?", args.force)
    counts = {q: app.broker.purge(q) for q in queues}
    if args.json:
        print(json.dumps({"purged": counts}))
    else:
        for queue, count in counts.items():
            print(f"purged {count} message(s) from {queue}")
    return 0


def cmd_dead(args: argparse.Namespace) -> int:
    app = load_app(args.app, required=False)
    queues = _queues(args, app)
    broker = app.broker
    if args.action == "list":
        letters = [d for q in queues for d in broker.dead_letters(q, limit=args.limit)]
        rows = [
            {
                "id": d.envelope.task_id or d.id,
                "task": d.task,
                "queue": d.queue,
                "deliveries": d.deliveries,
                "reason": d.reason,
                "dead_at": datetime.datetime.fromtimestamp(d.dead_at, datetime.timezone.utc).isoformat(),
            }
            for d in letters
        ]
        if args.json:
            print(json.dumps(rows))
        elif not rows:
            print(f"no dead letters in {', '.join(queues)}")
        for row in [] if args.json else rows:
            print(
                f"{row['id']} {row['task']} queue={row['queue']} deliveries={row['deliveries']} "
                f"dead_at={row['dead_at']}: {row['reason']}"
            )
        return 0
    if args.action == "requeue":
        counts = {q: broker.requeue_dead(q) for q in queues}
        verb = "requeued"
    else:
        _confirm(f"delete every dead letter of {', '.join(queues)}?", args.force)
        counts = {q: broker.purge_dead(q) for q in queues}
        verb = "purged"
    if args.json:
        print(json.dumps({verb: counts}))
    else:
        for queue, count in counts.items():
            print(f"{verb} {count} dead letter(s) of {queue}")
    return 0


# -- the parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # -A and --json are accepted before or after the command: the sub-parsers repeat them
    # with SUPPRESS defaults so a value given before the command is not overwritten.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-A", "--app", default=argparse.SUPPRESS, help="module[:attr] of the App")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    common.add_argument("-l", "--loglevel", default=argparse.SUPPRESS, help="debug, info, warning, error")

    parser = argparse.ArgumentParser(
        prog="taskframe",
        parents=[common],
        description="Run and inspect taskframe workers and queues.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    worker = sub.add_parser("worker", parents=[common], help="consume queues and run tasks")
    worker.add_argument("-Q", "--queues", help="comma-separated queues (default: the default queue)")
    worker.add_argument("-c", "--concurrency", type=int, help="pool size (default: number of CPUs)")
    worker.add_argument("-P", "--pool", choices=["prefork", "threads", "solo"], default="prefork")
    worker.add_argument("--prefetch", type=int, help="messages held beyond free slots (worker_prefetch)")
    worker.add_argument("--max-tasks-per-child", type=int, help="replace a prefork child after N tasks")
    worker.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds running tasks get at SIGTERM")
    worker.add_argument("--burst", action="store_true", help="exit once the queues hold no ready message")
    worker.set_defaults(func=cmd_worker)

    call = sub.add_parser("call", parents=[common], help="send a task by name")
    call.add_argument("name")
    call.add_argument("--args", help="JSON list of positional arguments")
    call.add_argument("--kwargs", help="JSON object of keyword arguments")
    call.add_argument("-Q", "--queue")
    call.add_argument("--countdown", type=float)
    call.add_argument("--wait", action="store_true", help="wait for the result and print it as JSON")
    call.add_argument("--timeout", type=float, help="seconds to wait with --wait")
    call.set_defaults(func=cmd_call)

    result = sub.add_parser("result", parents=[common], help="print a task's state and result")
    result.add_argument("id")
    result.add_argument("--wait", action="store_true")
    result.add_argument("--timeout", type=float)
    result.set_defaults(func=cmd_result)

    status = sub.add_parser("status", parents=[common], help="queue counts and live workers")
    status.add_argument("-Q", "--queues", help="more queues to show")
    status.set_defaults(func=cmd_status)

    purge = sub.add_parser("purge", parents=[common], help="delete ready and delayed messages")
    purge.add_argument("-Q", "--queues", help="comma-separated queues (default: the default queue)")
    purge.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(func=cmd_purge)

    dead = sub.add_parser("dead", parents=[common], help="list, requeue or purge dead letters")
    dead.add_argument("action", choices=["list", "requeue", "purge"])
    dead.add_argument("-Q", "--queues", help="comma-separated queues (default: the default queue)")
    dead.add_argument("-f", "--force", action="store_true", help="purge without confirmation")
    dead.add_argument("--limit", type=int, default=100, help="list at most N per queue")
    dead.set_defaults(func=cmd_dead)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, default in (("app", None), ("json", False), ("loglevel", "info")):
        if not hasattr(args, name):
            setattr(args, name, default)
    level = getattr(logging, str(args.loglevel).upper(), None)
    if not isinstance(level, int):
        parser.error(f"unknown log level {args.loglevel!r}; use debug, info, warning or error")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONLogFormatter() if args.json else logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    try:
        code: int = args.func(args)
        return code
    except (CommandError, TaskframeError) as exc:
        print(f"taskframe: error: {mask_url(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
