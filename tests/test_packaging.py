"""The kernels install as lorafast.kernels only, never as a top-level ``kernels`` module."""

import subprocess
import sys
import zipfile
from pathlib import Path

import lorafast
import lorafast.kernels

REPO = Path(__file__).resolve().parents[1]


def test_kernels_package_is_the_repo_kernels_folder():
    assert Path(lorafast.kernels.__file__).resolve() == REPO / "kernels" / "__init__.py"
    assert Path(lorafast.__file__).resolve() == REPO / "lorafast" / "__init__.py"


def test_wheel_holds_only_the_lorafast_package(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("lorafast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lorafast/kernels/fused_lora_matmul.py" in names
    assert all(n.startswith(("lorafast/", "lorafast-")) for n in names), names
    top_level = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["lorafast"]
