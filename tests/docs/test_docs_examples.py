"""Every example in docs/ runs here, so the documentation cannot drift from the code.

Conventions for fenced blocks in ``docs/**/*.md``. A marker is an HTML comment on the last
non-blank line before a fence (it does not show on the site)::

    ```python                     runs. The python blocks of one page run in order, in one
                                  module that stands in for __main__, in a fresh working
                                  directory and with no TASKFRAME_* variable set, so an App
                                  without URLs uses ./taskframe.sqlite3 there (the embedded
                                  default), as it would for a reader. An example that needs
                                  a worker starts one in-process with
                                  taskframe.testing.start_worker.
    ```python title="tasks.py"    is a file: any block with a title (python, toml, ...) is
                                  written to that path in the working directory, where
                                  later blocks and commands import, run or read it.
    <!-- docs-test: skip -->      before a block: not run nor written; python is still
                                  compiled (a Celery snippet, an adapter skeleton, a fragment).
    <!-- docs-test: run -->       before a console block: each "$ command" runs in the
                                  page's working directory, after the page's python blocks
                                  above it, with the venv's taskframe and python first on
                                  PATH. The lines up to the next "$" are the expected output
                                  (stdout and stderr, as a terminal shows them), compared as
                                  doctest does with ELLIPSIS: "..." matches anything. A
                                  command ending in " &" runs in the background: the next
                                  command starts once it has printed a line (a worker's
                                  "ready" line). When the page's examples end, one with
                                  lines shown after it (a script waiting for a result) must
                                  end by itself, its whole output matching those lines; then
                                  the others (workers) get SIGTERM. Each must exit 0.

Other blocks without a title (console without the marker, toml, yaml, text) are shown,
never run. A line ``--8<-- "path"`` in a block (pymdownx.snippets) stands for that
repository file, on the site and here.
The compose files are checked here too: compose/docker-compose.yml for the services and
ports the tests use, and the example deployment by running its producer and workers as
plain processes on SQLite (no Docker engine needed).
"""

from __future__ import annotations

import ast
import contextlib
import doctest
import importlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import taskframe.worker
from taskframe import App

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
COMPOSE = ROOT / "compose"
#: Seconds one documented command may take; a worker example must use --burst or " &".
COMMAND_TIMEOUT_S = 60.0

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^<!--\s*docs-test:\s*(?P<marker>[a-z-]+)\s*-->$")
_TITLE = re.compile(r'title="(?P<title>[^"]+)"')
#: A pymdownx.snippets line: the site shows that repository file there; so does the test.
_SNIPPET = re.compile(r'^-{1,3}8<-{1,3}\s+"(?P<path>[^"]+)"\s*$')


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    title: str | None
    marker: str | None
    source: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse_blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, with their language, title and marker."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence, info = opening["indent"], opening["fence"], opening["info"].strip()
        body: list[str] = []
        end = index + 1
        while end < len(lines) and lines[end].strip() != fence:
            line = lines[end]
            line = line[len(indent) :] if line.startswith(indent) else line.lstrip()
            snippet = _SNIPPET.match(line)
            if snippet:
                body.extend((ROOT / snippet["path"]).read_text(encoding="utf-8").splitlines())
            else:
                body.append(line)
            end += 1
        previous = next((lines[i].strip() for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        marker = _MARKER.match(previous)
        title = _TITLE.search(info)
        blocks.append(
            Block(
                page=page,
                line=index + 1,
                lang=info.split()[0] if info else "",
                title=title["title"] if title else None,
                marker=marker["marker"] if marker else None,
                source="\n".join(body) + "\n",
            )
        )
        index = end + 1
    for block in blocks:
        if block.marker not in (None, "skip", "run"):
            msg = f"{block.where}: unknown marker docs-test: {block.marker} (use skip or run)"
            raise ValueError(msg)
    return blocks


def runnable(block: Block) -> bool:
    if block.marker == "skip":
        return False
    if block.title or block.lang == "python":
        return True
    return block.lang == "console" and block.marker == "run"


PAGES = sorted(DOCS.rglob("*.md"))
PAGES_WITH_EXAMPLES = [page for page in PAGES if any(runnable(b) for b in parse_blocks(page))]


def page_id(page: Path) -> str:
    return str(page.relative_to(DOCS))


# -- running a page -------------------------------------------------------------------------------


class PageRun:
    """One page's working directory, namespace and background commands."""

    def __init__(self, workdir: Path, main: ModuleType) -> None:
        self.workdir = workdir
        self.namespace = vars(main)
        #: (label, process, log file, expected output) of each background command
        self.background: list[tuple[str, subprocess.Popen[bytes], Path, str]] = []
        self.env = dict(os.environ)
        venv_bin = str(Path(sys.executable).parent)
        self.env["PATH"] = venv_bin + os.pathsep + self.env.get("PATH", "")
        self.env["PYTHONUNBUFFERED"] = "1"  # background output in order, for failure reports

    def run(self, block: Block) -> None:
        if block.title:
            self.write_file(block)
        elif block.lang == "python":
            code = compile(block.source, block.where, "exec")
            exec(code, self.namespace)
        else:
            self.run_console(block)

    def write_file(self, block: Block) -> None:
        assert block.title is not None
        target = (self.workdir / block.title).resolve()
        if not target.is_relative_to(self.workdir.resolve()):
            # A title like "/etc/systemd/system/x.service" only names a file on the site.
            msg = f"{block.where}: title {block.title!r} is outside the working directory; mark it skip"
            raise AssertionError(msg)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.source, encoding="utf-8")
        importlib.invalidate_caches()  # a module written now must be importable now

    def run_console(self, block: Block) -> None:
        for command, expected in console_steps(block):
            if command.endswith("&"):
                self.start_background(command[:-1].strip(), expected, block)
                continue
            completed = subprocess.run(
                shlex.split(command),
                cwd=self.workdir,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=COMMAND_TIMEOUT_S,
                check=False,
            )
            got = completed.stdout.decode()
            if not doctest.OutputChecker().check_output(expected, got, doctest.ELLIPSIS):
                msg = (
                    f"{block.where}: `{command}` (exit {completed.returncode}) printed:\n{got}\n"
                    f"expected:\n{expected}{self.background_logs()}"
                )
                raise AssertionError(msg)

    def start_background(self, command: str, expected: str, block: Block) -> None:
        log = self.workdir / f".background-{len(self.background)}.log"
        with log.open("wb") as handle:
            process = subprocess.Popen(
                shlex.split(command), cwd=self.workdir, env=self.env, stdout=handle, stderr=subprocess.STDOUT
            )
        self.background.append((f"{block.where}: `{command}`", process, log, expected))
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        while not log.read_text().strip():
            if process.poll() is not None or time.monotonic() > deadline:
                msg = f"{block.where}: `{command}` printed nothing and exited {process.poll()}"
                raise AssertionError(msg)
            time.sleep(0.02)

    def background_logs(self) -> str:
        return "".join(f"\n--- {label} printed:\n{log.read_text()}" for label, _, log, _ in self.background)

    def stop_background(self) -> None:
        running, self.background = self.background, []
        # Commands with an expected output (a script waiting for a result) end by themselves,
        # while the workers still run; the others (workers) then stop, all at once.
        for _, process, _, expected in running:
            if expected:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=COMMAND_TIMEOUT_S)
        for _, process, _, _ in running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        failures = []
        for label, process, log, expected in running:
            try:
                code = process.wait(timeout=COMMAND_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
            got = log.read_text()
            if code != 0:
                failures.append(f"{label} exited {code}:\n{got}")
            elif expected and not doctest.OutputChecker().check_output(expected, got, doctest.ELLIPSIS):
                failures.append(f"{label} printed:\n{got}\nexpected:\n{expected}")
        if failures:
            raise AssertionError("\n".join(failures))

    def close(self) -> None:
        self.stop_background()
        for value in list(self.namespace.values()):
            if isinstance(value, App):
                value.close()
        for name, module in list(sys.modules.items()):
            path = getattr(module, "__file__", None) or ""
            if path.startswith(str(self.workdir)):
                for value in vars(module).values():
                    if isinstance(value, App):
                        value.close()
                del sys.modules[name]


def console_steps(block: Block) -> Iterator[tuple[str, str]]:
    """``(command, expected output)`` pairs of a console block; ``\\`` continues a command."""
    command: str | None = None
    expected: list[str] = []
    lines = block.source.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("$ "):
            if command is not None:
                yield command, "".join(e + "\n" for e in expected)
            command, expected = line[2:], []
            while command.endswith("\\") and index + 1 < len(lines):
                index += 1
                command = command[:-1] + " " + lines[index].strip()
        elif command is not None:
            expected.append(line)
        index += 1
    if command is not None:
        yield command, "".join(e + "\n" for e in expected)


@pytest.mark.parametrize("page", PAGES_WITH_EXAMPLES, ids=page_id)
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given: a fresh working directory, where the embedded default puts ./taskframe.sqlite3
    # (the autouse fixture of tests/conftest.py removes any TASKFRAME_* variable)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    # The page runs as a script would: its module is __main__, so that what it defines
    # (an exception class, say) can be imported back by name, as get() does.
    main = ModuleType("__main__")
    monkeypatch.setitem(sys.modules, "__main__", main)
    # An idle in-process worker notices a stop only after its current receive: a shorter
    # receive makes each `with start_worker(...)` block end at once, and nothing else changes.
    monkeypatch.setattr(taskframe.worker, "IDLE_RECEIVE_S", 0.05)
    run = PageRun(tmp_path, main)
    environment = dict(os.environ)
    # When / Then: every example of the page runs, in order, without an error
    try:
        for block in parse_blocks(page):
            if runnable(block):
                run.run(block)
    finally:
        run.close()
        os.environ.clear()  # an example that sets a variable must not leak it
        os.environ.update(environment)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_python_block_compiles(page: Path) -> None:
    # Blocks that are only shown (skip, or files never imported) must still be valid Python.
    for block in parse_blocks(page):
        if block.lang in ("python", "py"):
            ast.parse(block.source, filename=block.where)


def test_the_conventions_are_in_use() -> None:
    # Guards the parser itself: if it stopped finding blocks, every page would pass vacuously.
    blocks = [b for page in PAGES for b in parse_blocks(page)]
    assert sum(1 for b in blocks if b.lang == "python" and runnable(b) and not b.title) >= 30
    assert any(b.title for b in blocks if b.lang == "python")
    assert any(b.lang == "console" and b.marker == "run" for b in blocks)
    assert all(b.lang != "py" for b in blocks), "write ```python (with a skip marker), not ```py"


# -- compose files --------------------------------------------------------------------------------

#: service -> ports the test suite and the docs use (host:container, the same number).
SERVICE_PORTS = {
    "redis": {6379},
    "rabbitmq": {5672, 15672},
    "postgres": {5432},
    "mariadb": {3306},
    "mongodb": {27017},
    "elasticmq": {9324},
}


def load_yaml(path: Path) -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")  # comes with mkdocs, in the dev extra
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data


def published_ports(service: dict[str, Any]) -> set[int]:
    ports = set()
    for entry in service.get("ports", []):
        host, _, container = str(entry).rpartition(":")
        assert host.endswith(container), f"host and container ports differ in {entry!r}"
        ports.add(int(container))
    return ports


def test_services_compose_file_matches_the_tests() -> None:
    services = load_yaml(COMPOSE / "docker-compose.yml")["services"]
    assert set(services) == set(SERVICE_PORTS)
    for name, ports in SERVICE_PORTS.items():
        service = services[name]
        assert published_ports(service) == ports, name
        assert "healthcheck" in service, f"{name} has no health check"
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image version ({image})"
    assert "management" in services["rabbitmq"]["image"], "the management plugin must be on"


def test_example_deployment_runs_as_plain_processes(tmp_path: Path) -> None:
    # Given: the example's code and its compose commands, on a shared SQLite file instead of
    # Redis (the docs show this same switch), since no Docker engine runs here
    example = COMPOSE / "example"
    for source in example.glob("*.py"):
        shutil.copy(source, tmp_path / source.name)
    compose = load_yaml(example / "docker-compose.yml")["services"]
    database = f"sqlite:///{tmp_path / 'taskframe.sqlite3'}"
    env = {**os.environ, "TASKFRAME_BROKER_URL": database, "TASKFRAME_RESULT_BACKEND": database}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    workers = [s for s in compose.values() if s.get("command", [None])[:2] == ["taskframe", "worker"]]
    assert len(workers) == 2
    for service in workers:  # longer than the worker's default --shutdown-timeout of 30 s
        assert service["stop_grace_period"] == "40s"
    processes = [
        subprocess.Popen(
            s["command"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for s in workers
    ]
    try:
        # When: the producer runs its command against them
        producer = subprocess.run(
            compose["producer"]["command"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
    finally:
        # Then (also): SIGTERM, as `docker compose stop` sends it, is a clean warm shutdown
        for process in processes:
            process.send_signal(signal.SIGTERM)
        outputs = [process.communicate(timeout=COMMAND_TIMEOUT_S)[0] for process in processes]
    assert producer.returncode == 0, producer.stdout + producer.stderr + "".join(outputs)
    assert "all results arrived" in producer.stdout
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output
        assert "warm shutdown" in output, output
