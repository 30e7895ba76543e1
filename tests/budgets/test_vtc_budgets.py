"""Launch and host-sync budgets of the VTC ops on the Triton path (issue 8), counted on CPU
under the interpreter: Triton launches plus aten ops that would launch a GPU kernel.

bipartite_merge: <= 8 kernels forward, <= 12 forward+backward, 0 syncs, with either matcher
(the bmm path: squared norms, bmm, row max; the tiled kernel: squared norms, tiled match);
unmerge <= 4 forward+backward; token_pool 1 forward, 1 backward. The value checks that read
CPU tensors (`_common.check_values`: index ranges, positive sizes) are off here: on a GPU they only run
with STS_DEBUG=1, so the fast path has none of their reads.
"""

import importlib

import pytest
import torch

import sts_kernels
from tests.kernel_count import count_kernels
from tests.ops.test_bipartite_merge import force_matcher  # noqa: F401 (fixture "matcher")

merge_module = importlib.import_module("sts_kernels.ops.bipartite_merge")

pytestmark = pytest.mark.interpreter  # CPU tensors: runs where the interpreter does


@pytest.fixture(autouse=True)
def _gpu_fast_path(monkeypatch):
    monkeypatch.setattr(merge_module, "check_values", lambda t: False)


# the matcher's kernels: (Triton launches, aten kernels)
MATCHERS = {"bmm": (2, 1), "tiled": (2, 0)}


def _inputs(b=2, n=64, d=32, with_size=False):
    x = torch.randn(b, n, d, requires_grad=True)
    size = torch.rand(b, n) + 1 if with_size else None
    return x, size


@pytest.mark.parametrize("with_size", [False, True])
@pytest.mark.parametrize("protected", [0, 2])
def test_bipartite_merge_forward_budget(with_size, protected, matcher):
    x, size = _inputs(with_size=with_size)
    with sts_kernels.use_backend("triton"), count_kernels() as c:
        sts_kernels.bipartite_merge(x, 20, size=size, protected=protected)
    assert c.kernels <= 8 and c.syncs == 0, c
    # the matcher's, then select, index, counting sort, weighted segment mean
    triton, aten = MATCHERS[matcher]
    assert (c.triton, c.aten) == (triton + 4, aten), c
    assert c.triton_names["_match_kernel" if matcher == "tiled" else "_rowmax_kernel"] == 1, c


def test_bipartite_merge_forward_backward_budget(matcher):
    x, size = _inputs(with_size=True)
    grad = torch.randn(2, 44, 32)
    with sts_kernels.use_backend("triton"), count_kernels() as c:
        out = sts_kernels.bipartite_merge(x, 20, size=size, protected=1)
        torch.autograd.grad(out.x, x, grad)
    assert c.kernels <= 12 and c.syncs == 0, c


def test_bipartite_merge_nothing_to_merge_budget():
    x, _ = _inputs()
    with sts_kernels.use_backend("triton"), count_kernels() as c:
        sts_kernels.bipartite_merge(x, 0)
    assert c.kernels <= 2 and c.syncs == 0, c  # size ones and index arange


def test_unmerge_forward_backward_budget():
    x, _ = _inputs()
    merged = sts_kernels.bipartite_merge(x.detach(), 20)
    y = merged.x.requires_grad_(True)
    grad = torch.randn(2, 64, 32)
    with sts_kernels.use_backend("triton"), count_kernels() as c:
        out = sts_kernels.unmerge(y, merged.index)
        torch.autograd.grad(out, y, grad)
    assert c.kernels <= 4 and c.syncs == 0, c


def test_token_pool_budget():
    x = torch.randn(2, 35, 16, requires_grad=True)
    grad = torch.randn(2, 12, 16)
    with sts_kernels.use_backend("triton"), count_kernels() as fwd:
        y = sts_kernels.token_pool(x, (5, 7), (2, 2))
    with count_kernels() as bwd:
        torch.autograd.grad(y, x, grad)
    assert fwd.kernels == 1 and fwd.syncs == 0, fwd
    assert bwd.kernels == 1 and bwd.syncs == 0, bwd
