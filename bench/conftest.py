"""The benchmark suite's shared state: device, dtype, the run's plan, and the report written when the run ends.

``LORAFAST_BENCH_DRY_RUN=1`` (``bash bench/gpu.sh --dry-run``, with ``TRITON_INTERPRET=1`` and
``LORAFAST_BACKEND=triton``) runs the GPU run's plan on CPU tensors: its cases at the smallest shapes, one round,
bf16, lorafast's Triton kernels interpreted and its GEMM choice measured with a CPU clock. Its figures mean nothing;
it proves that every step of the GPU run works.

``LORAFAST_BENCH_STRICT=1`` makes every target a benchmark records (``report.targets``) an assertion: a benchmark whose
targets are missed fails (at its teardown, after the report is written, naming each missed target). Off by default
(a missed target is printed as "NO" in the report and listed in ``bench/gpu.sh``'s summary) and ignored in the dry run,
whose figures mean nothing.
"""

import os
import tempfile
from pathlib import Path

import pytest
import torch
from harness import Timer, machine
from report import Report

from lorafast.kernels import gemm_choice

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DRY_RUN = os.environ.get("LORAFAST_BENCH_DRY_RUN") == "1"
GPU_PLAN = DEVICE.type == "cuda" or DRY_RUN  # the cases, rounds and targets of a GPU run
DTYPE = torch.bfloat16 if GPU_PLAN else torch.float32
STRICT = os.environ.get("LORAFAST_BENCH_STRICT") == "1" and not DRY_RUN
REPORT = Report(machine=machine(DEVICE) + (" (dry run of the GPU plan: figures mean nothing)" if DRY_RUN else ""))

if DRY_RUN and DEVICE.type == "cpu":  # auto's measuring path, timed by the CPU clock, cached in a temporary folder
    gemm_choice.MEASURED_DEVICE_TYPES.add("cpu")
    gemm_choice.set_chooser(gemm_choice.GemmChooser(Path(tempfile.mkdtemp()) / "gemm_choices.json", Timer(DEVICE)))


@pytest.fixture(scope="session")
def report() -> Report:
    return REPORT


@pytest.fixture(autouse=True)
def write_report_after_each_benchmark():
    """Rewrite the report after every benchmark, so that a run cut short keeps what it measured; in strict mode, fail
    the benchmark whose targets are missed."""
    recorded = len(REPORT.targets)
    yield
    if REPORT.has_rows():
        REPORT.write(DEVICE.type)
    missed = [t.row() for t in REPORT.targets[recorded:] if not t.met]
    if STRICT and missed:
        pytest.fail("missed targets (LORAFAST_BENCH_STRICT=1):\n" + "\n".join(missed), pytrace=False)


def pytest_sessionfinish(session):
    if REPORT.has_rows():
        folder = REPORT.write(DEVICE.type)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = REPORT.markdown() + f"\nreport written to {folder}/report.md and report.png\n"
        if reporter is not None:
            reporter.write_line("")
            for line in text.splitlines():
                reporter.write_line(line)
        else:
            print(text)
