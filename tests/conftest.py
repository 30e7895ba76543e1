"""Test configuration: Triton runs under its interpreter on CPU-only machines.

Marker `interpreter`: the test runs Triton kernels. With the `triton_device` fixture it runs
on CUDA when present, else on CPU under the interpreter; without it, on CPU tensors, so only
under the interpreter (skipped on a GPU machine, where TRITON_INTERPRET is unset).

TRITON_INTERPRET must be set before anything imports triton, hence here, first.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sts_kernels import _backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
TRITON_DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_interp = pytest.mark.skip(reason="needs triton (CUDA, or TRITON_INTERPRET=1 on CPU)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        # A Triton test that takes `triton_device` runs wherever Triton runs (on a GPU too);
        # one without it uses CPU tensors and so needs the interpreter.
        device = (
            TRITON_DEVICE
            if "triton_device" in getattr(item, "fixturenames", ())
            else torch.device("cpu")
        )
        if "interpreter" in item.keywords and not _backend.triton_runs_on(device):
            item.add_marker(skip_interp)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def triton_device():
    """Device the Triton kernels run on: CUDA when present, else CPU under the interpreter."""
    return TRITON_DEVICE
