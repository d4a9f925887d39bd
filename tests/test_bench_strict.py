"""``LORAFAST_BENCH_STRICT=1``: a benchmark whose recorded targets are missed fails; by default it only reports them.

Runs bench/conftest.py (with the harness and report beside it, copied to a temporary folder so that the report is
written there) on a one-benchmark file that records one met and one missed target, in a pytest subprocess.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

BENCHMARK = """
from report import Target

def test_records_targets(report):
    report.targets.append(Target("met ratio", 0.9, 1.0))
    report.targets.append(Target("missed ratio", 1.7, 1.25))
"""


@pytest.fixture(scope="module")
def bench_copy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    for name in ("conftest.py", "harness.py", "report.py"):
        shutil.copy(BENCH / name, folder / name)
    (folder / "test_targets_bench.py").write_text(BENCHMARK)
    return folder


def run_benchmarks(folder: Path, strict: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LORAFAST_BENCH_STRICT", "LORAFAST_BENCH_DRY_RUN")}
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH.parent), env.get("PYTHONPATH", "")])
    if strict is not None:
        env["LORAFAST_BENCH_STRICT"] = strict
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)]
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("strict", [None, "1"])
def test_strict_mode_turns_missed_targets_into_failures(bench_copy, strict):
    result = run_benchmarks(bench_copy, strict)
    output = result.stdout + result.stderr
    if strict == "1":
        assert result.returncode == 1, output
        assert "missed targets (LORAFAST_BENCH_STRICT=1)" in output and "missed ratio" in output
        assert "met ratio" not in output.split("missed targets")[1].split("\n\n")[0]
    else:
        assert result.returncode == 0, output
    assert "| missed ratio | 1.700 | ≤ 1.25 | NO |" in output  # the report lists it either way
