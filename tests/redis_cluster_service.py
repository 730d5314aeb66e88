"""A throw-away three-node Redis Cluster for the tests, started from the installed redis-server.

:class:`LocalCluster` starts three ``redis-server --cluster-enabled yes`` processes on spare
ports (in the foreground, so that :meth:`LocalCluster.stop` can kill them) and joins them with
``redis-cli --cluster create``; no replicas, no persistence. ``tests/integration/test_redis_cluster.py``
starts one per module; :func:`url` starts one for the whole session on first use (the broker
conformance entry ``redis-cluster``), stopped when the interpreter exits.
"""

from __future__ import annotations

import atexit
import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

NODES = 3
HOW_TO_GET = "redis-server and redis-cli are needed for the Redis Cluster tests: apt-get install redis-server"


def unavailable() -> str | None:
    """Why no cluster can be started here, or None when it can."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        return HOW_TO_GET
    return None


class LocalCluster:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ports: list[int] = []
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """The URL of one node; a cluster client finds the others from it."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def start(self) -> None:
        """Start the nodes and wait for ``cluster_state:ok``; on failure, stop what started."""
        try:
            for _ in range(NODES):
                self.ports.append(_free_port(self.ports))
            for port in self.ports:
                command = [
                    "redis-server",
                    "--port", str(port),
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(self.directory / f"nodes-{port}.conf"),
                    "--cluster-node-timeout", "2000",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.directory),
                    "--bind", "127.0.0.1",
                ]  # fmt: skip
                self.processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for port in self.ports:
                wait_until(lambda port=port: answers(port), f"redis-server on port {port} to answer")  # type: ignore[misc]
            nodes = [f"127.0.0.1:{port}" for port in self.ports]
            create = ["redis-cli", "--cluster", "create", *nodes, "--cluster-yes"]
            subprocess.run(create, check=True, capture_output=True, timeout=60)
            for port in self.ports:
                wait_until(lambda port=port: _cluster_ok(port), f"cluster_state:ok on port {port}")  # type: ignore[misc]
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        kill_all(self.processes)


_session: LocalCluster | None = None
_failed: BaseException | None = None  # a start that failed is not tried again by every test


def url() -> str:
    """The URL (with ``?cluster=true``) of this session's cluster, started on first call."""
    global _session, _failed
    if _failed is not None:
        raise _failed
    if _session is None:
        cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="taskframe-redis-cluster-")))
        try:
            cluster.start()
        except Exception as exc:
            shutil.rmtree(cluster.directory, ignore_errors=True)
            _failed = exc
            raise
        atexit.register(shutil.rmtree, cluster.directory, ignore_errors=True)  # runs after stop (LIFO)
        atexit.register(cluster.stop)
        _session = cluster
    return f"{_session.url}?cluster=true"


def _free_port(taken: list[int]) -> int:
    """A free port whose cluster bus port (10000 above it) is free too, so at most 55535."""
    while True:
        port = random.randrange(20000, 45000)
        if any(abs(port - other) in (0, 10000) for other in taken):
            continue
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


def kill_all(processes: list[subprocess.Popen[bytes]]) -> None:
    """Kill the servers a test started, wait for them, and forget them."""
    for process in processes:
        process.kill()
    for process in processes:
        process.wait(timeout=10)
    processes.clear()


def answers(port: int) -> bool:
    """Whether a redis-server on 127.0.0.1:``port`` answers a PING."""
    with contextlib.suppress(redis.exceptions.RedisError), redis.Redis(port=port) as client:
        return bool(client.ping())
    return False


def _cluster_ok(port: int) -> bool:
    with redis.Redis(port=port, decode_responses=True) as client:
        info = client.cluster("info")  # parsed by redis-py into a dict
    return bool(info.get("cluster_state") == "ok")


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Poll ``condition`` every 50 ms; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
