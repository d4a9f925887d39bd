"""The benchmark suite's shared state: device, dtype, and the report written when the run ends."""

import pytest
import torch
from harness import machine
from report import Report

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
REPORT = Report(machine=machine(DEVICE))


@pytest.fixture(scope="session")
def report() -> Report:
    return REPORT


@pytest.fixture(autouse=True)
def write_report_after_each_benchmark():
    """Rewrite the report after every benchmark, so that a run cut short keeps what it measured."""
    yield
    if REPORT.layer_rows or REPORT.model_rows or REPORT.multi_rows or REPORT.targets:
        REPORT.write(DEVICE.type)


def pytest_sessionfinish(session):
    if REPORT.layer_rows or REPORT.model_rows or REPORT.multi_rows or REPORT.targets:
        folder = REPORT.write(DEVICE.type)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = REPORT.markdown() + f"\nreport written to {folder}/report.md and report.png\n"
        if reporter is not None:
            reporter.write_line("")
            for line in text.splitlines():
                reporter.write_line(line)
        else:
            print(text)
