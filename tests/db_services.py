"""PostgreSQL, MariaDB/MySQL and MongoDB for the SQL and MongoDB result backend tests.

Addresses come from environment variables, read when this module is imported (the autouse
fixture of ``tests/conftest.py`` hides ``TASKFRAME_*`` variables from the tests themselves):

- ``TASKFRAME_TEST_POSTGRES_URL``, default ``postgresql://postgres@127.0.0.1:5432/taskframe_test``
- ``TASKFRAME_TEST_MYSQL_URL``, default ``mysql://root@127.0.0.1:3306/taskframe_test``
- ``TASKFRAME_TEST_MONGODB_URL``: a MongoDB server to use. When unset, the tests start
  nx-27017 (a MongoDB wire-protocol server on SQLite, ``pip install nx-27017``) on a free
  port, once per test process, with a throw-away data directory, and stop it at exit.

The databases are created when missing. Conformance tests get a namespace of their own per
test process (a PostgreSQL schema, a MySQL database), emptied before each test, so a count
such as ``purge_expired() == 5`` sees only that test's rows; namespaces are dropped at exit,
and those left by a test process that no longer runs are dropped the next time.

Every function that needs a service raises :class:`ServiceDown` when it cannot be reached,
with a message that names it and says how to start it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

import pytest

POSTGRES_URL = os.environ.get("TASKFRAME_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/taskframe_test")
MYSQL_URL = os.environ.get("TASKFRAME_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/taskframe_test")
MONGODB_URL = os.environ.get("TASKFRAME_TEST_MONGODB_URL", "")
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

#: Prefix of the per-process namespaces; the pid follows.
NAMESPACE_PREFIX = "tf_conformance_"

_lock = threading.Lock()


class ServiceDown(Exception):
    """A service the test needs cannot be reached; the message says how to start it."""


def require(probe: Any) -> Any:
    """Call ``probe()``; skip the test when the service is down, or fail in CI."""
    try:
        return probe()
    except ServiceDown as exc:
        if CI:
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def _parts(url: str) -> SplitResult:
    return urlsplit(url)


def _database(url: str) -> str:
    return _parts(url).path.lstrip("/") or "taskframe_test"


def _with_database(url: str, scheme: str, database: str, query: str = "") -> str:
    parts = _parts(url)
    return parts._replace(scheme=scheme, path=f"/{database}", query=query).geturl()


# -- PostgreSQL -------------------------------------------------------------------------------


def _pg_connect(database: str) -> Any:
    import psycopg

    parts = _parts(POSTGRES_URL)
    try:
        return psycopg.connect(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 5432,
            user=unquote(parts.username or "postgres"),
            password=unquote(parts.password or "") or None,
            dbname=database,
            autocommit=True,
            connect_timeout=3,
        )
    except psycopg.Error as exc:
        where = f"{parts.hostname}:{parts.port or 5432}"
        msg = (
            f"PostgreSQL is not reachable on {where} ({str(exc).strip().splitlines()[0]}); start it "
            "(e.g. docker compose -f compose/docker-compose.yml up -d postgres) or set TASKFRAME_TEST_POSTGRES_URL"
        )
        raise ServiceDown(msg) from None


@cache
def postgres_database() -> str:
    """``db+postgresql+psycopg://…/taskframe_test``, creating the database when missing."""
    database = _database(POSTGRES_URL)
    with contextlib.closing(_pg_connect("postgres")) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone() is None:
            with contextlib.suppress(Exception):  # another test process may create it first
                conn.execute(f'CREATE DATABASE "{database}"')
    return _with_database(POSTGRES_URL, "db+postgresql+psycopg", database)


@cache
def _pg_admin() -> Any:
    """One connection to the test database, for namespaces and for terminating sessions."""
    postgres_database()
    conn = _pg_connect(_database(POSTGRES_URL))
    atexit.register(conn.close)
    return conn


def postgres_url_for_test() -> str:
    """A URL whose tables live in this process's schema, emptied now."""
    with _lock:
        schema = _pg_namespace()
        conn = _pg_admin()
        for table in _TABLES:
            with contextlib.suppress(Exception):  # not created yet
                conn.execute(f'DELETE FROM "{schema}"."{table}"')
    return f"{postgres_database()}?options=-csearch_path%3D{schema}"


@cache
def _pg_namespace() -> str:
    conn = _pg_admin()
    schema = f"{NAMESPACE_PREFIX}{os.getpid()}"
    for (stale,) in conn.execute(
        "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (NAMESPACE_PREFIX + "%",)
    ).fetchall():
        if stale != schema and not _pid_alive(stale):
            conn.execute(f'DROP SCHEMA IF EXISTS "{stale}" CASCADE')
    conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    atexit.register(_drop_quietly, conn, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    return schema


def terminate_postgres_sessions() -> int:
    """Close every other session of the test database, as a server restart would; return how many."""
    rows = (
        _pg_admin()
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (_database(POSTGRES_URL),),
        )
        .fetchall()
    )
    return len(rows)


# -- MySQL / MariaDB --------------------------------------------------------------------------


def _mysql_connect(database: str | None = None) -> Any:
    import pymysql

    parts = _parts(MYSQL_URL)
    try:
        return pymysql.connect(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 3306,
            user=unquote(parts.username or "root"),
            password=unquote(parts.password or ""),
            database=database,
            autocommit=True,
            connect_timeout=3,
            charset="utf8mb4",
        )
    except pymysql.Error as exc:
        where = f"{parts.hostname}:{parts.port or 3306}"
        msg = (
            f"MariaDB/MySQL is not reachable on {where} ({exc}); start it "
            "(e.g. docker compose -f compose/docker-compose.yml up -d mariadb) or set TASKFRAME_TEST_MYSQL_URL"
        )
        raise ServiceDown(msg) from None


def _mysql_execute(conn: Any, sql: str, args: Any = None) -> list[Any]:
    with conn.cursor() as cursor:
        cursor.execute(sql, args)
        return list(cursor.fetchall())


@cache
def mysql_database() -> str:
    """``db+mysql+pymysql://…/taskframe_test``, creating the database when missing."""
    database = _database(MYSQL_URL)
    with contextlib.closing(_mysql_connect()) as conn:
        _mysql_execute(conn, f"CREATE DATABASE IF NOT EXISTS `{database}` CHARACTER SET utf8mb4")
    return _with_database(MYSQL_URL, "db+mysql+pymysql", database)


@cache
def _mysql_admin() -> Any:
    mysql_database()
    conn = _mysql_connect()
    atexit.register(conn.close)
    return conn


def mysql_url_for_test() -> str:
    """A URL on this process's own database, emptied now."""
    with _lock:
        database = _mysql_namespace()
        conn = _mysql_admin()
        for table in _TABLES:
            with contextlib.suppress(Exception):  # not created yet
                _mysql_execute(conn, f"DELETE FROM `{database}`.`{table}`")
    return _with_database(MYSQL_URL, "db+mysql+pymysql", database)


@cache
def _mysql_namespace() -> str:
    conn = _mysql_admin()
    database = f"{NAMESPACE_PREFIX}{os.getpid()}"
    for (stale,) in _mysql_execute(conn, "SHOW DATABASES LIKE %s", (NAMESPACE_PREFIX.replace("_", "\\_") + "%",)):
        if stale != database and not _pid_alive(stale):
            _mysql_execute(conn, f"DROP DATABASE IF EXISTS `{stale}`")
    _mysql_execute(conn, f"CREATE DATABASE IF NOT EXISTS `{database}` CHARACTER SET utf8mb4")
    atexit.register(_drop_quietly, conn, f"DROP DATABASE IF EXISTS `{database}`")
    return database


def terminate_mysql_sessions() -> int:
    """Kill every other session on the test database, as a server restart would; return how many."""
    conn = _mysql_admin()
    rows = _mysql_execute(
        conn,
        "SELECT id FROM information_schema.processlist WHERE db = %s AND id <> CONNECTION_ID()",
        (_database(MYSQL_URL),),
    )
    for (session,) in rows:
        with contextlib.suppress(Exception):  # it may have ended meanwhile
            _mysql_execute(conn, f"KILL {int(session)}")
    return len(rows)


# -- MongoDB ----------------------------------------------------------------------------------


class _NxServer:
    """nx-27017 on a free port with its own data directory, stopped at exit."""

    def __init__(self) -> None:
        executable = Path(sys.executable).with_name("nx-27017")
        if not executable.exists():
            found = shutil.which("nx-27017")
            if found is None:
                msg = "nx-27017 is not installed, and TASKFRAME_TEST_MONGODB_URL is unset: pip install nx-27017==0.8.1"
                raise ServiceDown(msg)
            executable = Path(found)
        self.dir = Path(tempfile.mkdtemp(prefix="taskframe-nx-27017-"))
        self.port = _free_port()
        command = [str(executable), "--host", "127.0.0.1", "-p", str(self.port), "--data-dir", str(self.dir / "data")]
        command += ["--log-file", str(self.dir / "server.log"), "--pid-file", str(self.dir / "server.pid")]
        self.process = subprocess.Popen(
            command,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C of the tests does not reach it before atexit does
        )
        atexit.register(self.stop)
        self._wait_ready(timeout_s=15.0)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.dir / "server.log").read_text(errors="replace")[-500:] if self.dir.exists() else ""
                msg = f"nx-27017 exited with code {self.process.returncode} at start: {log}"
                raise ServiceDown(msg)
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return
            time.sleep(0.02)
        self.stop()
        msg = f"nx-27017 did not listen on 127.0.0.1:{self.port} within {timeout_s:.0f}s"
        raise ServiceDown(msg)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)


@cache
def _nx_server() -> _NxServer:
    return _NxServer()


@cache
def mongodb_server() -> str:
    """``mongodb://host:port`` of the server under test (nx-27017 is started on first call)."""
    if MONGODB_URL:
        parts = _parts(MONGODB_URL)
        try:
            socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 27017), timeout=3).close()
        except OSError as exc:
            msg = f"MongoDB is not reachable at TASKFRAME_TEST_MONGODB_URL ({exc}); start it or unset the variable"
            raise ServiceDown(msg) from None
        return parts._replace(path="", query="").geturl()
    server = _nx_server()
    return f"mongodb://127.0.0.1:{server.port}"


def mongodb_url(database: str = "taskframe_test") -> str:
    return f"{mongodb_server()}/{database}"


# -- helpers ----------------------------------------------------------------------------------

_TABLES = ("taskframe_results", "taskframe_kv", "taskframe_counters")


def _pid_alive(namespace: str) -> bool:
    try:
        pid = int(namespace.rsplit("_", 1)[1])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _drop_quietly(conn: Any, statement: str) -> None:
    with contextlib.suppress(Exception):
        if hasattr(conn, "ping"):
            _mysql_execute(conn, statement)
        else:
            conn.execute(statement)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def check(probe: Any) -> Any:
    """A ``BackendSpec.check`` for tests/conformance: ``probe()``, ServiceDown as ServiceUnavailable."""

    def run() -> None:
        from tests.conformance.backends import ServiceUnavailable

        try:
            probe()
        except ServiceDown as exc:
            raise ServiceUnavailable(str(exc)) from None

    return run
