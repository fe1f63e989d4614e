"""The package builds from a clean copy: sdist, then a wheel from the sdist.

``python -m build`` makes the sdist first and builds the wheel from that
sdist alone, so a file the sdist forgets breaks this test. The wheel is then
installed into a folder of its own and imported from outside the
repository, where the checkout cannot stand in for it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COPIED = (
    "calejo_core",
    "calejo_server",
    "setup.py",
    "pyproject.toml",
    "MANIFEST.in",
    "README.md",
)
JUNK = shutil.ignore_patterns("*.so", "*.c", "__pycache__", "*.pyc", "build")

USE = """
import calejo_core
from calejo_core import Gate, Outcome, PumpLimits, StationImage

gate = Gate([PumpLimits(20.0, 50.0, 0.5, 35.0, pump_id="p1")])
assert gate.request(0, 75.0, 0.0) == Outcome.CLAMPED
gate.tick(1.0)  # the start: from stop_value straight to min_value
gate.tick(3.0)  # then 0.5 Hz/s
image = StationImage(1)
image.update_pumps(gate.applied, gate.status)
print(calejo_core.__file__)
print(int(image.registers[100]))
"""


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("packaging")
    source = work / "source"
    source.mkdir()
    for name in COPIED:
        origin = ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=JUNK)
        else:
            shutil.copy2(origin, source / name)

    out = work / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return out


def test_the_sdist_carries_what_the_build_needs(dist: Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}

    for module in ("gate", "codecs", "modbus"):
        assert f"calejo_core/{module}.pyx" in names
        assert f"calejo_core/{module}.pxd" in names
        assert f"calejo_core/{module}.pyi" in names
    assert {"setup.py", "pyproject.toml", "README.md", "calejo_core/py.typed"} <= names
    assert "calejo_server/storage/migrations/sqlite/0001_initial.sql" in names


def test_the_wheel_ships_the_extension_stubs_and_no_sources(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    for module in ("gate", "codecs", "modbus"):
        assert any(
            n.startswith(f"calejo_core/{module}.") and n.endswith(".so") for n in names
        ), module
        assert f"calejo_core/{module}.pyi" in names
        assert f"calejo_core/{module}.pyx" not in names
        assert f"calejo_core/{module}.c" not in names
    assert "calejo_core/py.typed" in names
    assert "calejo_server/py.typed" in names
    assert any(n.endswith("entry_points.txt") for n in names)


def test_the_installed_wheel_works_outside_the_repository(
    dist: Path, tmp_path: Path
) -> None:
    (wheel,) = dist.glob("*.whl")
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )

    result = subprocess.run(
        [sys.executable, "-P", "-c", USE],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )

    where, register = result.stdout.split()
    assert Path(where).is_relative_to(target)
    assert register == "210"
