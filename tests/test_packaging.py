"""The package installs as a wheel with the pipeline under nano_dit.pipelines, never as `pipelines`."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# What a source distribution carries; the wheel is built from a copy so the tree stays clean.
SOURCES = ["nano_dit", "pipelines", "setup.cfg", "pyproject.toml", "README.md"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("nano_dit-*.whl")
    return path


@pytest.mark.slow
def test_wheel_holds_the_pipeline_under_the_package_and_no_top_level_pipelines(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "nano_dit/pipelines/pipeline_nano_dit.py" in names
    assert "nano_dit/transformer_nano_dit.py" in names
    top_level = {name.split("/")[0] for name in names}
    assert "pipelines" not in top_level and "tests" not in top_level
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "nano-dit = nano_dit.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_public_names_import_from_the_installed_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import nano_dit, nano_dit.pipelines\n"
        "from nano_dit import NanoDiTTransformer2DModel, NanoDiTPipeline, CFGDropout\n"
        "import importlib.util\n"
        "print(nano_dit.__file__, nano_dit.pipelines.__file__, importlib.util.find_spec('pipelines'))\n"
    )
    # Run from an empty folder with only the unpacked wheel ahead of site-packages.
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
    ).stdout.split()
    assert out[0] == str(site / "nano_dit" / "__init__.py")
    assert out[1] == str(site / "nano_dit" / "pipelines" / "__init__.py")
    assert out[2] == "None"  # no bare `pipelines` module anywhere on the path
