"""The wheel holds every library module, as lorafast.kernels, never as a top-level ``kernels`` module."""

import os
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
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "lorafast").rglob("*.py")}
    packaged = {n for n in wheel.namelist() if n.endswith(".py")}
    assert sources - packaged == set(), "modules missing from the wheel"
    assert packaged - sources == set(), "wheel modules with no source file"


def test_wheel_holds_only_the_lorafast_package(wheel):
    names = wheel.namelist()
    assert all(n.startswith(("lorafast/", "lorafast-")) for n in names), names
    top_level = next(n for n in names if n.endswith("top_level.txt"))
    assert wheel.read(top_level).decode().split() == ["lorafast"]


def test_checkout_has_no_top_level_kernels_module():
    """Run from the checkout (as ``python -m pytest`` and scripts are), ``import kernels`` must not find lorafast's
    kernels: transformers imports a ``kernels`` it finds to probe for the hub package, and a second copy of the
    kernel modules would define the ``lorafast::`` operators again, leaving the first copy's operators dangling."""
    code = (
        "import sys, importlib.util, lorafast.kernels, transformers.modeling_utils\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec else None, sorted(m for m in sys.modules if m.split('.')[0] == 'kernels'))"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "[]"], out.stdout + out.stderr
