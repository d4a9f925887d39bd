"""The wheel holds every library module, as lorafast.kernels, never as a top-level ``kernels`` module."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel ``pip wheel`` builds from the checkout."""
    folder = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(folder)]
    subprocess.run([*command, str(REPO)], check=True, capture_output=True)
    (path,) = folder.glob("lorafast-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_holds_every_module_of_lorafast_and_kernels(wheel):
    # A module left out of the packages list imports from the checkout but not once installed.
    sources = {f"lorafast/{p.relative_to(REPO / 'lorafast').as_posix()}" for p in (REPO / "lorafast").rglob("*.py")}
    sources |= {
        f"lorafast/kernels/{p.relative_to(REPO / 'kernels').as_posix()}" for p in (REPO / "kernels").rglob("*.py")
    }
    packaged = {n for n in wheel.namelist() if n.endswith(".py")}
    assert sources - packaged == set(), "modules missing from the wheel"
    assert packaged - sources == set(), "wheel modules with no source file"


def test_wheel_holds_only_the_lorafast_package(wheel):
    names = wheel.namelist()
    assert all(n.startswith(("lorafast/", "lorafast-")) for n in names), names
    top_level = next(n for n in names if n.endswith("top_level.txt"))
    assert wheel.read(top_level).decode().split() == ["lorafast"]
