"""RabbitMQ for the broker tests: a vhost of this test session, and a probe that says how to start it.

The server comes from ``TASKFRAME_TEST_RABBITMQ_URL`` (default
``amqp://guest:guest@127.0.0.1:5672``, without a vhost), read when this module is imported
(the autouse fixture of ``tests/conftest.py`` hides ``TASKFRAME_*`` variables from the tests).

The server may be shared with other work, so each pytest session makes a vhost of its own,
``taskframe-test-<pid>``, with ``rabbitmqctl`` (as root, as CI and the developer machines run),
and deletes it at exit with every queue the tests left; vhosts of sessions whose process is
gone are deleted when the next session starts. Without ``rabbitmqctl`` (a remote server), set
``TASKFRAME_TEST_RABBITMQ_VHOST`` to an existing vhost the user may use: nothing is deleted then.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import socket
import subprocess
from urllib.parse import quote, urlsplit

RABBITMQ_URL = os.environ.get("TASKFRAME_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672").rstrip("/")
FIXED_VHOST = os.environ.get("TASKFRAME_TEST_RABBITMQ_VHOST")
VHOST = FIXED_VHOST or f"taskframe-test-{os.getpid()}"
HOW_TO_START = (
    "apt-get install rabbitmq-server && service rabbitmq-server start"
    " (or set TASKFRAME_TEST_RABBITMQ_URL and TASKFRAME_TEST_RABBITMQ_VHOST)"
)
_SESSION_VHOST = re.compile(r"^taskframe-test-(\d+)$")


def url(**options: object) -> str:
    """The URL of this session's vhost, with adapter options as query parameters."""
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return f"{RABBITMQ_URL}/{quote(VHOST, safe='')}" + (f"?{query}" if query else "")


def rabbitmqctl(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout_s, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@functools.lru_cache(maxsize=1)
def _prepare_vhost() -> str | None:
    """Create this session's vhost (and drop those of dead sessions); the reason if it fails."""
    if FIXED_VHOST:
        return None
    if shutil.which("rabbitmqctl") is None:
        return f"rabbitmqctl is not on PATH to create vhost {VHOST!r}; set TASKFRAME_TEST_RABBITMQ_VHOST instead"
    listed = rabbitmqctl("list_vhosts", "--quiet", "--no-table-headers")
    for name in listed.stdout.split():
        match = _SESSION_VHOST.match(name)
        if match and name != VHOST and not _alive(int(match.group(1))):
            rabbitmqctl("delete_vhost", name)
    for args in (("add_vhost", VHOST), ("set_permissions", "-p", VHOST, _user(), ".*", ".*", ".*")):
        done = rabbitmqctl(*args)
        if done.returncode != 0 and "already" not in (done.stderr + done.stdout):
            return f"rabbitmqctl {' '.join(args)} failed: {(done.stderr or done.stdout).strip()}"
    atexit.register(_drop_vhost)
    return None


def _drop_vhost() -> None:
    if os.getpid() == int(VHOST.rsplit("-", 1)[1]):
        rabbitmqctl("delete_vhost", VHOST)


def _user() -> str:
    return urlsplit(RABBITMQ_URL).username or "guest"


def unavailable() -> str | None:
    """Why RabbitMQ (and this session's vhost) cannot be used, or None when it can."""
    parts = urlsplit(RABBITMQ_URL)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5672
    try:
        with socket.create_connection((host, port), timeout=2):
            pass
    except OSError as exc:
        return f"RabbitMQ is not reachable on {host}:{port} ({exc}); start it with: {HOW_TO_START}"
    return _prepare_vhost()
