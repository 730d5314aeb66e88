"""One moto SQS server per test session, started on first use and stopped at exit.

The broker URL carries the server's endpoint, region, test credentials and a fresh queue
prefix, so worker processes started by a test reach the same server, and each test's queues
are new (moto, like SQS, allows one PurgeQueue per queue every 60 s)::

    sqs://testing:testing@?endpoint_url=http%3A%2F%2F127.0.0.1%3A<port>&region_name=us-east-1&queue_prefix=tf<hex>-

Needs moto's server (``pip install 'moto[server]'``, part of the ``dev`` extra). The server is
moto's own (``moto.server.main``, what ``moto_server`` runs), started by running this file, so
that two things in moto 5.2 can be mended first (:func:`_mend_moto`):

- A bug: ReceiveMessage marks messages received without a lock, so two concurrent receives
  of one queue can both get the same message (seen here: one MessageId delivered twice within
  a 30-s visibility timeout; getmoto/moto#519 reported it in 2016). AWS hands a message to
  one receiver per visibility timeout, give or take its rare standard-queue duplicates, so
  the receives of each queue are serialized; they wait for messages (long polls) outside
  that lock.
- Speed: every request costs time linear in the queue's depth with a large constant (at 2,000
  messages a receive took 300 ms, a send 85 ms), because moto reads the clock through
  ``datetime`` for every message and recomputes all of a queue's attributes, counts
  included, for each message it returns. The clock now comes from ``time.time()`` (the same
  value) and the retention check reads the retention period alone.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

#: Seconds moto's server may take to answer its first connection.
START_TIMEOUT_S = 15.0

_server: subprocess.Popen[bytes] | None = None
_endpoint: str | None = None
_failure: str | None = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop() -> None:
    if _server is not None and _server.poll() is None:
        _server.terminate()
        try:
            _server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _server.kill()
            _server.wait()


def endpoint() -> str:
    """The running server's URL, starting it if needed; raises RuntimeError if it cannot start."""
    global _server, _endpoint, _failure
    if _endpoint is not None:
        return _endpoint
    if _failure is not None:
        raise RuntimeError(_failure)
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        _failure = "moto's server is not installed (the SQS tests start it themselves): pip install 'moto[server]'"
        raise RuntimeError(_failure)
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    _server = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # one line per request
        env=env,
    )
    atexit.register(_stop)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and _server.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                _endpoint = f"http://127.0.0.1:{port}"
                return _endpoint
        except OSError:
            time.sleep(0.05)
    _stop()
    _failure = (
        f"moto's server did not answer on 127.0.0.1:{port} within {START_TIMEOUT_S:g}s;"
        f" run `{sys.executable} {__file__} {port}` to see why"
    )
    raise RuntimeError(_failure)


def unavailable() -> str | None:
    """Why the SQS tests cannot run here, or None (the server is then running)."""
    try:
        endpoint()
    except RuntimeError as exc:
        return str(exc)
    return None


def make_url(tmp_path: Path | None = None, /, **options: str) -> str:
    """A broker URL on the session's server with a queue prefix of its own (``tmp_path`` unused)."""
    query = {
        "endpoint_url": endpoint(),
        "region_name": "us-east-1",
        "queue_prefix": f"tf{uuid.uuid4().hex[:10]}-",
        **options,
    }
    return "sqs://testing:testing@?" + urlencode(query)


# -- the server process ---------------------------------------------------------------------


def _mend_moto() -> None:
    """Serialize each queue's receives (a moto race) and take moto's per-message costs out."""
    from moto.sqs import models

    receive = models.SQSBackend.receive_message
    wait = models.Queue.wait_for_messages
    slow_unix_time = getattr(models, "unix_time")  # noqa: B009 - moto does not export it
    held = threading.local()
    guard = threading.Lock()

    def receive_message(self: Any, queue_name: str, *args: Any, **kwargs: Any) -> Any:
        queue = self.get_queue(queue_name)
        with guard:
            lock = queue.__dict__.setdefault("_taskframe_receive_lock", threading.Lock())
        with lock:
            held.lock = lock
            try:
                return receive(self, queue_name, *args, **kwargs)
            finally:
                held.lock = None

    def wait_for_messages(self: Any, timeout: int) -> None:
        lock = getattr(held, "lock", None)
        if lock is None:
            wait(self, timeout)
            return
        lock.release()
        try:
            wait(self, timeout)
        finally:
            lock.acquire()

    def unix_time(dt: Any = None) -> float:
        return time.time() if dt is None else float(slow_unix_time(dt))

    def unix_time_millis(dt: Any = None) -> float:
        return unix_time(dt) * 1000.0

    def is_message_valid_based_on_retention_period(self: Any, queue_name: str, message: Any) -> bool:
        retention_s = int(self.get_queue(queue_name).message_retention_period)
        return bool(retention_s + message.sent_timestamp / 1000 > time.time())

    # setattr: mypy (rightly) frowns on replacing methods and module globals; here it is the point.
    setattr(models.SQSBackend, "receive_message", receive_message)  # noqa: B010
    setattr(models.SQSBackend, "is_message_valid_based_on_retention_period", is_message_valid_based_on_retention_period)  # noqa: B010
    setattr(models.Queue, "wait_for_messages", wait_for_messages)  # noqa: B010
    setattr(models, "unix_time", unix_time)  # noqa: B010
    setattr(models, "unix_time_millis", unix_time_millis)  # noqa: B010


if __name__ == "__main__":
    _mend_moto()
    from moto.server import main

    main(["-H", "127.0.0.1", "-p", sys.argv[1]])
