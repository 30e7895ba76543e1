"""pytest-benchmark runs of the op benchmarks (`bench/test_ops.py`).

    pytest bench/ --benchmark-only --benchmark-json=out.json [--bench-device cuda]
        [--bench-only vtc,lds] [--bench-full] [--bench-compile]

Every row is also appended, as it is measured, to bench/results/pytest-ops-<device>-<date>.json
(the format of `python -m bench.ops`), so a run cut short keeps what it measured.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.ops import METHOD, RESULTS, SUITES, ResultsFile, results_path, suite_cases
from bench.timing import copy_bandwidth_gbs


def pytest_addoption(parser):
    group = parser.getgroup("sts-bench")
    default = "cuda" if torch.cuda.is_available() else "cpu"
    group.addoption("--bench-device", default=default, help="device to benchmark on")
    group.addoption("--bench-only", default=",".join(SUITES), help="comma-separated suites")
    group.addoption("--bench-full", action="store_true", help="all shapes on the CPU too")
    group.addoption(
        "--bench-compile",
        action="store_true",
        help="add the torch.compile baselines (each case compiles afresh: slow)",
    )
    group.addoption("--bench-out", type=Path, default=RESULTS, help="folder of the row JSON")


def _settings(config) -> tuple[torch.device, bool, bool]:
    device = torch.device(config.getoption("--bench-device"))
    quick = device.type != "cuda" and not config.getoption("--bench-full")
    return device, quick, config.getoption("--bench-compile")


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        device, quick, compile_baseline = _settings(metafunc.config)
        only = metafunc.config.getoption("--bench-only").split(",")
        cases = list(suite_cases(only, device, quick, compile_baseline))
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    return _settings(pytestconfig)[0]


@pytest.fixture(scope="session")
def copy_gbs(device) -> float:
    return copy_bandwidth_gbs(device, nbytes=1 << (30 if device.type == "cuda" else 26))


@pytest.fixture(scope="session")
def results(pytestconfig, device, copy_gbs) -> ResultsFile:
    path = results_path(pytestconfig.getoption("--bench-out"), device, prefix="pytest-ops")
    return ResultsFile(path, device, copy_gbs, "pytest-benchmark: " + METHOD)
