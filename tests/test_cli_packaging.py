"""What a user's tools see of the package: one version everywhere, ``--version``, and the PEP 561 ``py.typed`` marker.

The version is written twice on purpose (``pyproject.toml`` and ``moba_compile.__version__``): a dynamic version read
from the package would make every build import torch. These tests keep the two literals and the installed metadata
equal.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import moba_compile
from moba_compile.cli import main

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_pyproject_and_package_version_agree() -> None:
    assert PYPROJECT["project"]["version"] == moba_compile.__version__


def test_installed_metadata_matches_the_source() -> None:
    # A stale editable install (pyproject bumped without reinstalling) fails here: reinstall with pip install -e .
    assert importlib.metadata.version("moba-compile") == moba_compile.__version__


def test_version_flag_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"moba-compile {moba_compile.__version__}\n"


def test_supported_versions_are_declared() -> None:
    # The oldest releases .ci/run tests against: torch 2.11.0 and transformers 5.17.0.
    assert "torch>=2.11" in PYPROJECT["project"]["dependencies"]
    extras = PYPROJECT["project"]["optional-dependencies"]
    for extra in ("hf", "test"):
        assert "transformers>=5.17" in extras[extra], extra


def test_wheel_ships_py_typed(tmp_path: Path) -> None:
    assert (REPO / "moba_compile" / "py.typed").is_file()
    # Build from a copy so the checkout gets no build/ or egg-info from this test.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "moba_compile", src / "moba_compile", ignore=shutil.ignore_patterns("__pycache__"))
    # Python 3.11's venv carries setuptools, so no download is needed; on 3.12+ pip fetches it as for pip install.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("moba_compile-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "moba_compile/py.typed" in names
    assert f"moba_compile-{moba_compile.__version__}.dist-info/METADATA" in names
