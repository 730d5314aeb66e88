"""The wheel holds the adapters under taskframe.brokers / taskframe.backends, and py.typed."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_maps_brokers_and_backends_into_the_package(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("taskframe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "taskframe/__init__.py",
        "taskframe/py.typed",
        "taskframe/brokers/sqlite.py",
        "taskframe/brokers/memory.py",
        "taskframe/backends/sqlite.py",
        "taskframe/backends/files.py",
    ):
        assert expected in names, expected
    assert not any(name.startswith(("brokers/", "backends/", "tests/")) for name in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "taskframe = taskframe.cli:main" in text
    assert "[taskframe.brokers]" in text and "[taskframe.backends]" in text
