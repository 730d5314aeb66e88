"""A throw-away Redis with one replica, watched by one Sentinel, for the tests.

:class:`LocalSentinel` starts a primary, a replica of it and a ``redis-server --sentinel`` on
spare ports (in the foreground, so that :meth:`LocalSentinel.stop` can kill them); no
persistence. :func:`url` starts one for the whole session on first use (the conformance
entries ``redis-sentinel``), stopped when the interpreter exits; a test that fails over
starts its own.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import redis

from tests.redis_cluster_service import answers, kill_all, wait_until

SERVICE = "tfmaster"
HOW_TO_GET = "redis-server is needed for the Redis Sentinel tests: apt-get install redis-server"


def unavailable() -> str | None:
    """Why no Sentinel can be started here, or None when it can."""
    return HOW_TO_GET if shutil.which("redis-server") is None else None


class LocalSentinel:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.primary_port = self.replica_port = self.sentinel_port = 0
        self.processes: list[subprocess.Popen[bytes]] = []

    def url(self, db: int = 0) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{SERVICE}/{db}"

    def start(self) -> None:
        """Start the three and wait until the Sentinel knows the primary and its replica."""
        try:
            self.primary_port, self.replica_port, self.sentinel_port = _free_ports(3)
            self._server(self.primary_port)
            self._server(self.replica_port, "--replicaof", "127.0.0.1", str(self.primary_port))
            config = self.directory / "sentinel.conf"
            config.write_text(
                f"port {self.sentinel_port}\n"
                "bind 127.0.0.1\n"
                f"dir {self.directory}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} 1\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
            )
            command = ["redis-server", str(config), "--sentinel"]
            self.processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_until(lambda: self._replica_in_sync(), "the replica to sync with the primary")
            wait_until(lambda: self._sentinel_sees_replica(), "the Sentinel to find the replica")
        except BaseException:
            self.stop()
            raise

    def primary(self) -> tuple[str, int]:
        """What the Sentinel now says the primary is."""
        with redis.Redis(port=self.sentinel_port, decode_responses=True) as sentinel:
            host, port = sentinel.sentinel_get_master_addr_by_name(SERVICE)
        return str(host), int(port)

    def fail_over(self) -> None:
        """Make the replica the primary (SENTINEL FAILOVER) and wait until the Sentinel says so
        and the new primary accepts writes."""
        before = self.primary()
        with redis.Redis(port=self.sentinel_port) as sentinel:
            sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)
        wait_until(lambda: self.primary() != before, "the Sentinel to name a new primary")
        host, port = self.primary()
        wait_until(lambda: _role(port) == "master", f"redis on port {port} to become primary")

    def stop(self) -> None:
        kill_all(self.processes)

    def _server(self, port: int, *extra: str) -> None:
        command = [
            "redis-server",
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--dbfilename", f"dump-{port}.rdb",
            *extra,
        ]  # fmt: skip
        self.processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_until(lambda: answers(port), f"redis-server on port {port} to answer")

    def _replica_in_sync(self) -> bool:
        with redis.Redis(port=self.replica_port, decode_responses=True) as replica:
            return bool(replica.info("replication").get("master_link_status") == "up")

    def _sentinel_sees_replica(self) -> bool:
        with (
            contextlib.suppress(redis.exceptions.RedisError),
            redis.Redis(port=self.sentinel_port, decode_responses=True) as sentinel,
        ):
            return bool(sentinel.sentinel_slaves(SERVICE))
        return False


_session: LocalSentinel | None = None
_failed: BaseException | None = None  # a start that failed is not tried again by every test


def start(directory: Path) -> LocalSentinel:
    """A started LocalSentinel whose files live in ``directory``."""
    sentinel = LocalSentinel(directory)
    sentinel.start()
    return sentinel


def url(db: int = 0) -> str:
    """The ``redis+sentinel://`` URL of this session's Sentinel, started on first call."""
    global _session, _failed
    if _failed is not None:
        raise _failed
    if _session is None:
        directory = Path(tempfile.mkdtemp(prefix="taskframe-redis-sentinel-"))
        try:
            _session = start(directory)
        except Exception as exc:
            shutil.rmtree(directory, ignore_errors=True)
            _failed = exc
            raise
        atexit.register(shutil.rmtree, directory, ignore_errors=True)  # runs after stop (LIFO)
        atexit.register(_session.stop)
    return _session.url(db)


def _free_ports(count: int) -> list[int]:
    """``count`` ports that are free now (bound together, so they differ)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _role(port: int) -> str:
    with contextlib.suppress(redis.exceptions.RedisError), redis.Redis(port=port, decode_responses=True) as client:
        return str(client.info("replication").get("role"))
    return ""
