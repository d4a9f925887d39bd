"""``bench/gpu.sh``'s preflight: what Triton needs and is missing is named before anything runs (the dry run itself,
which CI runs, covers the rest of the script)."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu.sh"


def preflight(tmp_path, **env) -> subprocess.CompletedProcess:
    """``bash bench/gpu.sh --preflight`` (the checks alone: nothing is installed or run) with ``env`` added."""
    env = os.environ | {"OUT": str(tmp_path)} | env
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # python3: this Python
    return subprocess.run(["bash", str(SCRIPT), "--preflight"], env=env, capture_output=True, text=True, timeout=60)


def test_preflight_names_a_missing_c_compiler(tmp_path):
    result = preflight(tmp_path, CC=str(tmp_path / "no-such-cc"))
    assert result.returncode == 1
    assert f"missing the C compiler CC={tmp_path / 'no-such-cc'}" in result.stderr
    assert not (tmp_path / "gpu_machine.txt").exists()  # nothing else ran
