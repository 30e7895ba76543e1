"""Launch and sync budgets of the skipper's glue around one skippable layer (issue 8): <= 6
kernels forward, <= 10 forward+backward, <= 1 host sync, in sample and token mode, on the C++
(CPU) and Triton backends. Counted on the CPU with tests/kernel_count.py around a trivial
layer (`x * w`), whose own kernels, counted alone on the same rows, are subtracted.

The one host sync is the route's read of (K, Kmax): an 8-byte device-to-host copy, no kernel,
so it is budgeted as the sync and not counted again as a kernel (kernel_count counts a read
as both). On the Triton backend (GPUs) the route is one launch and that read, all visible
here: forward 6 launches + 1 read, forward+backward 8 + 1. What the count cannot see: the
inside of a compiled C++ op (one kernel when nothing inside it is visible, else what is
visible; the CPU `route` shows as its `counts` subtraction and needs no read), and the CUDA
extension's `route` (4 launches and the read), which serves GPUs only without Triton."""

from __future__ import annotations

import pytest
import torch
from kernel_count import count_kernels
from torch import nn

import sts_kernels as sts
from bench.lds import ideal_bytes
from sts_kernels import _backend
from sts_kernels.nn import LayerDynamicSkipper

CPP = pytest.mark.skipif(not _backend.has_extension("cpu"), reason="extension not built")
BACKENDS = [pytest.param("cpp", marks=CPP), pytest.param("triton", marks=pytest.mark.interpreter)]
FORWARD, FORWARD_BACKWARD, SYNCS = 6, 10, 1  # counted now: 6 / 8, 0 (cpp) or 1 (triton) sync
READS = ("item", "_local_scalar_dense")  # host reads: a copy, not a launch


class Scale(nn.Module):
    """The trivial layer: one kernel forward."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return x * self.w


def _launches(counted) -> int:
    """Kernels counted, less the host reads (budgeted as syncs)."""
    return counted.kernels - sum(counted.aten_names[name] for name in READS)


def _counts(mode: str, backend: str):
    """(glue forward, glue forward+backward, syncs forward+backward, rows run) of layer 1."""
    layers = nn.ModuleList(Scale() for _ in range(3))
    skipper = LayerDynamicSkipper(
        layers, 8, mode=mode, p_max=0.5, seed=0, keep_first_last=False
    ).train()
    x = torch.randn(8, 6, 8, requires_grad=True)
    with sts.use_backend(backend):
        with count_kernels() as forward:
            skipper.layers[1](x)
        keep = skipper.report.keep_masks[1]
        skipper._generators.clear()  # the same draws again: restart the seeded generator
        with count_kernels() as both:
            skipper.layers[1](x).sum().backward()
    assert torch.equal(keep, skipper.report.keep_masks[1])  # seeded: the same rows both times
    assert 0 < keep.sum() < keep.numel(), "nothing or everything skipped: a vacuous count"
    # the layer alone on the rows it saw, plus the loss around it
    rows = (int(keep.sum()), 6) if mode == "sample" else (8, int(keep.sum(1).max()))
    inner = torch.randn(*rows, 8, requires_grad=True)
    with count_kernels() as layer_forward:
        layers[1](inner)
    with count_kernels() as layer_both:
        layers[1](inner).sum().backward()
    glue_forward = _launches(forward) - _launches(layer_forward)
    # the layer-alone backward accumulates into inner.grad (a leaf): one add_ the glue lacks
    glue_both = _launches(both) - (_launches(layer_both) - layer_both.aten_names["add_"])
    return glue_forward, glue_both, both.syncs, str(forward), str(both)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sample", "token"])
def test_skipper_glue_within_budget(mode, backend):
    forward, both, syncs, detail_forward, detail_both = _counts(mode, backend)
    assert forward <= FORWARD, detail_forward
    assert both <= FORWARD_BACKWARD, detail_both
    assert syncs <= SYNCS, detail_both


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sample", "token"])
def test_no_delta_pass_no_zero_fill_no_dense_add(mode, backend):
    """The glue neither forms `y - rows` (skip_residual reads y), nor zero-fills R rows for
    the gather's gradient, nor adds two R-row gradients of x: the gather and skip_residual's
    input are one autograd node whose backward adds the rows' gradient in place."""
    layers = nn.ModuleList(Scale() for _ in range(3))
    skipper = LayerDynamicSkipper(
        layers, 8, mode=mode, p_max=0.5, seed=0, keep_first_last=False
    ).train()
    x = torch.randn(8, 6, 8, requires_grad=True)
    with sts.use_backend(backend), count_kernels() as counted:
        skipper.layers[1](x).sum().backward()
    names = counted.aten_names
    assert names["sub"] <= 1 and names["neg"] == 0, counted  # sub: the CPU route's counts
    assert names["zeros"] == 0 and names["scatter_rows"] == 0, counted
    assert names["scatter_rows_triton"] == 0 and names["add"] == 0, counted
    # the in-place add of the routed rows (padded: skipping the padding, no masked fill)
    assert names["index_add_"] + names["index_put_"] + names["masked_fill"] == 0, counted
    adds = counted.sts_names["add_rows.default"] + counted.sts_names["add_rows_triton.default"]
    assert adds == 1, counted


def test_ideal_bytes_model():
    # forward 2R + 3K, backward 2R + 3K (+ 2K for the gate's gradient), in rows
    assert ideal_bytes(100, 40, 8, backward=False) == (200 + 120) * 8
    assert ideal_bytes(100, 40, 8) == 2 * (200 + 120) * 8
    assert ideal_bytes(100, 40, 8, gate_grad=True) == (2 * (200 + 120) + 80) * 8


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", [(8,), (8, 6)])
def test_triton_route_is_one_launch_and_one_read(shape):
    """route on the Triton backend: one kernel launch and one host read of (K, Kmax), nothing
    else (its outputs are allocated at their upper bounds and trimmed as views)."""
    mask = torch.rand(shape) < 0.5
    with sts.use_backend("triton"), count_kernels() as counted:
        plan = sts.route(mask)
        derived = (plan.padded_index, plan.row_to_k, plan.max_count)  # the kernel's: no launch
    assert derived[2] == int(mask.view(shape[0], -1).sum(1).max())
    assert counted.triton_names == {"_route_kernel": 1}, counted
    assert counted.syncs == 1 and counted.kernels - _launches(counted) == 1, counted
    assert _launches(counted) == 1, counted
