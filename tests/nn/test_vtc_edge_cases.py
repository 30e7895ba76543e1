"""VTC edge cases on every backend (issue 11 points 4-8): out-of-range unmerge indices,
NaN/Inf in the metric, non-positive sizes, double backward, fp64 exactness."""

import importlib
import os

import pytest
import torch

import sts_kernels
from sts_kernels import _backend, reference
from tests.ops.test_bipartite_merge import force_matcher  # noqa: F401 (fixture "matcher")

merge_module = importlib.import_module("sts_kernels.ops.bipartite_merge")


def _backends(device):
    """Backends bipartite_merge/unmerge can run on `device` (reference always)."""
    names = ["reference"]
    if _backend.triton_runs_on(torch.device(device)):
        names.append("triton")
    return names


CPU_BACKENDS = _backends("cpu")


# ---- 4. unmerge index range --------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [-1, 5, 1 << 40])
def test_unmerge_out_of_range_index_raises(backend, bad):
    y = torch.randn(2, 5, 3)
    index = torch.zeros(2, 10, dtype=torch.int64)
    index[1, 7] = bad
    with sts_kernels.use_backend(backend), pytest.raises(ValueError, match=r"index must lie in"):
        sts_kernels.unmerge(y, index)


@pytest.mark.interpreter
def test_unmerge_strided_index(triton_device):
    """The index of a merge that merged nothing is an expanded arange (stride 0 over B); a
    transposed index is strided too: both read as PyTorch reads them, forward and backward."""
    y = torch.randn(3, 6, 4, device=triton_device, requires_grad=True)
    nothing = sts_kernels.bipartite_merge(y.detach(), 0)
    assert nothing.index.stride(0) == 0
    perm = torch.stack([torch.randperm(6) for _ in range(3)], 1).to(triton_device).T
    for index in (nothing.index, perm):
        with sts_kernels.use_backend("triton"):
            out = sts_kernels.unmerge(y, index)
        (dy,) = torch.autograd.grad(out, y, torch.ones_like(out))
        torch.testing.assert_close(out, reference.unmerge(y, index))
        torch.testing.assert_close(dy, torch.ones_like(y))


@pytest.mark.gpu
def test_unmerge_out_of_range_index_on_gpu():
    """CUDA: with STS_DEBUG=1 it raises like on CPU; the fast path (no host sync) writes NaN
    rows for the bad entries and the exact rows elsewhere."""
    y = torch.randn(2, 5, 3, device="cuda")
    index = torch.zeros(2, 10, dtype=torch.int64, device="cuda")
    index[1, 7] = -1
    with sts_kernels.use_backend("triton"):
        out = sts_kernels.unmerge(y, index)
        assert out[1, 7].isnan().all() and not out[1, :7].isnan().any()
        os.environ["STS_DEBUG"] = "1"
        try:
            with pytest.raises(ValueError, match="index must lie in"):
                sts_kernels.unmerge(y, index)
        finally:
            del os.environ["STS_DEBUG"]


# ---- 5. NaN / Inf in the metric -----------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_metric_rows_score_zero_on_every_backend(bad, matcher, triton_device):
    """One rule everywhere: a row with a NaN/Inf scores 0 against every token (like a zero
    row), so the merge is the same deterministic one on every backend and either matcher."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 20, 8, generator=g).to(triton_device)
    metric = x.clone()
    metric[0, 4, 2] = bad  # a source
    metric[1, 7, 0] = bad  # a destination
    results = {}
    for backend in _backends(triton_device):
        with sts_kernels.use_backend(backend):
            results[backend] = sts_kernels.bipartite_merge(x, 6, metric=metric)
    first = results["reference"]
    for name, out in results.items():
        assert torch.equal(out.index, first.index), name
        assert torch.equal(out.size, first.size), name
        torch.testing.assert_close(out.x, first.x, msg=lambda m, name=name: f"{name}: {m}")
    best, _ = reference.bipartite_match(metric)
    assert best[0, 2] == 0  # source 4 = the third source: all its scores are 0
    zero = metric.clone()
    zero[0, 4], zero[1, 7] = 0, 0
    assert torch.equal(reference.bipartite_merge(x, 6, metric=zero).index, first.index)


# ---- 6. size must be positive -----------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_non_positive_size_raises(backend, bad):
    size = torch.ones(2, 10)
    size[1, 3] = bad
    with (
        sts_kernels.use_backend(backend),
        pytest.raises(ValueError, match=r"size must be positive"),
    ):
        sts_kernels.bipartite_merge(torch.randn(2, 10, 4), 2, size=size)


# ---- 7. double backward -----------------------------------------------------------------


@pytest.mark.interpreter
def test_double_backward_through_merge(triton_device):
    """gradgradcheck on the Triton path: the merge is linear in x for a fixed matching."""
    kw = dict(dtype=torch.float64, device=triton_device)
    x = torch.randn(1, 9, 3, **kw, requires_grad=True)
    metric = torch.randn(1, 9, 4, **kw)  # fixed: the matching must not move with x
    size = torch.rand(1, 9, **kw) + 1
    for backend in _backends(triton_device):

        def merge(t, backend=backend):
            with sts_kernels.use_backend(backend):
                return sts_kernels.bipartite_merge(t, 3, metric=metric, size=size, protected=1).x

        assert torch.autograd.gradgradcheck(merge, (x,)), backend


# ---- 8. fp64 --------------------------------------------------------------------------------


@pytest.mark.interpreter
def test_fp64_merge_is_exact(triton_device):
    """fp64 values and sizes accumulate in fp64 on the Triton path: equal to the reference to
    fp64 rounding (the fp32 accumulation this replaces was off by ~4e-5 in the sizes)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 41, 6, generator=g, dtype=torch.float64).to(triton_device)
    size = (torch.rand(2, 41, generator=g, dtype=torch.float64) * 7 + 0.1).to(triton_device)
    with sts_kernels.use_backend("triton"):
        out = sts_kernels.bipartite_merge(x, 15, size=size, protected=1)
        again = sts_kernels.bipartite_merge(out.x, 9, size=out.size, protected=1)
    ref = reference.bipartite_merge(x, 15, size=size, protected=1)
    ref_again = reference.bipartite_merge(ref.x, 9, size=ref.size, protected=1)
    assert out.size.dtype == torch.float64 and out.x.dtype == torch.float64
    assert torch.equal(out.index, ref.index) and torch.equal(again.index, ref_again.index)
    for got, want in ((out.x, ref.x), (out.size, ref.size), (again.size, ref_again.size)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(again.size.sum(1), size.sum(1), atol=1e-12, rtol=1e-12)
