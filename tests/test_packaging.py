"""The wheel holds every library module, as lorafast.kernels, never as a top-level ``kernels`` module."""

import json
import os
import re
import shutil
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


# Run from a checkout (as ``python -m pytest`` and scripts are, the checkout first on sys.path), this imports what
# transformers imports and prints, as JSON, every loaded module named ``kernels`` or ``kernels.*`` with its file, and
# the module that defines each ``lorafast::`` operator.
LAYOUT_PROBE = """
import importlib.util, json, sys, sysconfig
import torch._library.custom_ops as custom_ops
import lorafast.kernels
error = None
try:
    import transformers.modeling_utils
    if importlib.util.find_spec("kernels"):  # Hugging Face's hub package, which transformers 5.25 requires
        import kernels
except ImportError as e:
    error = repr(e)
print(json.dumps({
    "error": error,
    "installed": sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")}),
    "kernels": {n: getattr(m, "__file__", None) for n, m in sys.modules.items() if n.split(".")[0] == "kernels"},
    "operators": {n: d._init_fn.__module__ for n, d in custom_ops.OPDEFS.items() if n.startswith("lorafast::")},
}))
"""


def layout_problems(checkout: Path) -> list[str]:
    """What is wrong with ``checkout``'s module layout, seen from a process started in it: a ``kernels`` module loaded
    from the checkout (a second copy of lorafast's kernels, which transformers' hub-kernels probe imports, redefining
    the ``lorafast::`` operators and leaving the first definitions dangling), or an operator defined outside
    ``lorafast.kernels``/``lorafast.dropout``/``lorafast.dora``. Hugging Face's ``kernels`` from site-packages is
    expected."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(checkout)}
    run = subprocess.run([sys.executable, "-c", LAYOUT_PROBE], cwd=checkout, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        return [f"the probe failed: {run.stderr[-2000:]}"]
    loaded = json.loads(run.stdout.splitlines()[-1])
    installed = [Path(p).resolve() for p in loaded["installed"]]

    def in_checkout(file: str | None) -> bool:
        path = Path(file or checkout).resolve()  # a namespace package (no file) counts as the checkout's
        return path.is_relative_to(checkout.resolve()) and not any(path.is_relative_to(p) for p in installed)

    problems = [
        f"module {name} loaded from the checkout: {file}"
        for name, file in loaded["kernels"].items()
        if in_checkout(file)
    ]
    if loaded["error"]:
        problems.append(f"importing transformers and kernels failed: {loaded['error']}")
    problems += [
        f"operator {op} defined by {module}"
        for op, module in loaded["operators"].items()
        if not module.startswith(("lorafast.kernels.", "lorafast.dropout", "lorafast.dora"))
    ]
    if not any(op.startswith("lorafast::lora_") for op in loaded["operators"]):
        problems.append(f"lorafast's operators are not registered: {sorted(loaded['operators'])}")
    return problems


def test_checkout_loads_kernels_only_as_lorafast_kernels():
    """Only Hugging Face's ``kernels`` (site-packages) may be imported as ``kernels``; lorafast's kernel modules load
    once, as ``lorafast.kernels``, and define each ``lorafast::`` operator once."""
    assert layout_problems(REPO) == []


def test_layout_check_catches_a_top_level_kernels_package(tmp_path):
    """The old layout, a top-level ``kernels/`` holding the kernel modules, fails the check above."""
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "lorafast", checkout / "lorafast", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "lorafast" / "kernels", checkout / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    problems = layout_problems(checkout)
    assert any(re.match(r"module kernels(\.\w+)* loaded from the checkout", p) for p in problems), problems
