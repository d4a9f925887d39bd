"""``pytest --benchmark`` runs the benchmark suite in bench/ instead of the tests (see README)."""

from pathlib import Path

import pytest


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", help="run the benchmark suite (bench/) instead of tests/")


def pytest_configure(config):
    if config.getoption("--benchmark") and config.args_source == pytest.Config.ArgsSource.TESTPATHS:
        config.args[:] = [str(Path(__file__).parent / "bench")]
