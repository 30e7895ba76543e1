"""The skipper's glue (`sts_kernels.ops.skip_glue`): `gather_for_layer`'s gather and combine
against the plain gather_rows and skip_residual (values and gradients bit for bit, padding
gradients never reaching x, the caller's grad_out untouched, exact double backward), the
choice of the in-place gradient add by skip_residual's backend, and `add_rows_`, the row add
of its backward."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close

import sts_kernels
from sts_kernels import _backend
from sts_kernels.ops import skip_glue
from sts_kernels.ops.skip_glue import add_rows_, gather_for_layer, gather_rows_passthrough

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Triton runs on DEVICE: CUDA on a GPU machine, else CPU under the interpreter
NEEDS_TRITON = pytest.mark.skipif(
    not _backend.triton_runs_on(DEVICE), reason=f"Triton cannot run on {DEVICE}"
)
IMPLS = ["cpp", pytest.param("triton", marks=NEEDS_TRITON)]


def need(impl: str, device: torch.device = DEVICE) -> None:
    if impl == "cpp" and not _backend.has_extension(device.type):
        pytest.skip(f"sts_kernels._C is not built with {device.type} kernels (pip install -e .)")


# ---- add_rows_: dst[ids[k]] += src[k], the passthrough gather's backward -------------------

# -1 (a padding slot), then ids past either end: skipped, their src rows never read
ADD_IDS = [7, -1, 0, 12, 3, -5, 10, 5, 2**40]
ADD_SKIPPED = [1, 3, 5, 8]


def _add_rows_case(dtype: torch.dtype, feat: tuple[int, ...]):
    """(dst [12, *feat], ids [8], src [8, *feat] with NaN in the skipped ids' rows)."""
    dst = torch.randn(12, *feat, device=DEVICE).to(dtype)
    src = torch.randn(len(ADD_IDS), *feat, device=DEVICE).to(dtype)
    src[ADD_SKIPPED] = float("nan")
    return dst, torch.tensor(ADD_IDS, device=DEVICE), src


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("feat", [(3, 5), (1500,)], ids=["3x5", "wide"])
def test_add_rows(impl, dtype, feat):
    """Against index_add in fp32 (fp64 for fp64) over the valid ids; rows no valid id names
    keep their bits (neither -1 nor an out-of-range id writes anything, not even the last
    row, where index_put_ would wrap -1), and the skipped src rows' NaN is never read."""
    need(impl)
    dst, ids, src = _add_rows_case(dtype, feat)
    before, src_before = dst.clone(), src.clone()
    add_rows_(dst, ids, src, impl)
    valid = (ids >= 0) & (ids < dst.shape[0])
    acc = torch.promote_types(dtype, torch.float32)
    expected = before.to(acc).index_add(0, ids[valid], src[valid].to(acc))
    lowp = before.index_add(0, ids[valid], src[valid])
    assert_close(dst, expected, reference_lowp=lowp, name="dst")
    untouched = torch.ones(dst.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[ids[valid]] = False
    assert untouched[-1] and torch.equal(dst[untouched], before[untouched])
    assert dst.isfinite().all()
    assert torch.equal(src.isnan(), src_before.isnan()) and torch.equal(
        src.nan_to_num(), src_before.nan_to_num()
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_add_rows_empty(impl):
    need(impl)
    dst = torch.randn(4, 3, device=DEVICE)
    before = dst.clone()
    add_rows_(dst, torch.empty(0, dtype=torch.int64, device=DEVICE), dst[:0], impl)
    add_rows_(dst[:0], torch.tensor([0, -1], device=DEVICE), torch.randn(2, 3, device=DEVICE), impl)
    assert torch.equal(dst, before)


# ---- gather with passthrough (the skipper's gather: one node, in-place backward add) -------

PASS_MASKS = {
    "samples": (lambda: torch.tensor([True, False, True, True, False], device=DEVICE), False),
    "tokens": (lambda: torch.rand(3, 7, device=DEVICE) < 0.5, False),
    "tokens_padded": (lambda: torch.rand(3, 7, device=DEVICE) < 0.5, True),
}


class _PoisonPadding(torch.autograd.Function):
    """Identity whose backward puts NaN on the padding slots' gradient (a layer may give
    padding slots any gradient; none of it may reach x)."""

    @staticmethod
    def forward(ctx, rows, valid):
        ctx.save_for_backward(valid)
        return rows.view_as(rows)

    @staticmethod
    def backward(ctx, grad):
        (valid,) = ctx.saved_tensors
        return torch.where(valid[..., None], grad, float("nan")), None


def _skip_layer(impl: str, plan, padded: bool, passthrough: bool, x):
    """The skipper's glue around a layer `rows * 1.5 + 0.25`: `gather_for_layer` and its
    combine, or (passthrough=False) the plain gather_rows and skip_residual(from_output=True)."""
    gate = torch.linspace(0.5, 2.0, plan.num_active, dtype=x.dtype, device=DEVICE)
    with sts_kernels.use_backend(impl):
        if passthrough:
            rows, combine = gather_for_layer(x, plan, padded)
        else:
            rows = sts_kernels.gather_rows(x, plan, padded)
            combine = lambda y, gate: sts_kernels.skip_residual(  # noqa: E731
                x, y, plan, gate, from_output=True
            )
        if padded:
            rows = _PoisonPadding.apply(rows, plan.valid)
        return combine(rows * 1.5 + 0.25, gate=gate)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(PASS_MASKS))
def test_gather_passthrough_matches_plain_gather(impl, case):
    """The in-place backward add gives x the same gradient as the plain gather (its own
    gradient node, summed by autograd), bit for bit; padding slots' NaN never reaches x, and
    the caller's grad_out is left unmodified."""
    need(impl)
    make_mask, padded = PASS_MASKS[case]
    plan = sts_kernels.route(make_mask())
    x = torch.randn(*plan.shape, 4, device=DEVICE, requires_grad=True)
    grad_out = torch.randn_like(x)
    kept = grad_out.clone()
    outs, grads = [], []
    for passthrough in (True, False):
        out = _skip_layer(impl, plan, padded, passthrough, x)
        outs.append(out)
        grads.append(torch.autograd.grad(out, x, grad_out)[0])
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0], grads[1]) and grads[0].isfinite().all()
    assert torch.equal(grad_out, kept)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(PASS_MASKS))
def test_gather_passthrough_double_backward_float64(impl, case):
    """create_graph: the backward adds out of place with differentiable ops, so second
    derivatives are exact."""
    need(impl)
    make_mask, padded = PASS_MASKS[case]
    plan = sts_kernels.route(make_mask())
    x = torch.randn(*plan.shape, 2, device=DEVICE, dtype=torch.float64, requires_grad=True)
    square = lambda t: _skip_layer(impl, plan, padded, True, t).square()
    assert torch.autograd.gradcheck(square, (x,))
    assert torch.autograd.gradgradcheck(square, (x,))


def test_gather_passthrough_without_grad_is_the_plain_gather():
    plan = sts_kernels.route(torch.tensor([True, False, True]))
    x = torch.randn(3, 2, 4)
    rows, x_pass = gather_rows_passthrough(x, plan)
    assert x_pass is x and torch.equal(rows, x[plan.index])
    rows, combine = gather_for_layer(x, plan)
    assert torch.equal(rows, x[plan.index])
    assert torch.equal(
        combine(rows * 2), sts_kernels.skip_residual(x, rows * 2, plan, from_output=True)
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_in_place_add_only_where_skip_residual_allocates_grad_x(impl, monkeypatch):
    """The passthrough node (in-place add) exactly where skip_residual's backward allocates
    grad_x (cpp / triton); where skip_residual runs the reference the plain gather, and x_pass
    is x itself."""
    need(impl)
    plan = sts_kernels.route(torch.tensor([True, False, True], device=DEVICE))
    x = torch.randn(3, 2, 4, device=DEVICE, requires_grad=True)
    with sts_kernels.use_backend(impl):
        fresh = _backend.select("skip_residual", DEVICE) != "reference"
        rows, x_pass = gather_rows_passthrough(x, plan)
    assert (x_pass is not x) == fresh
    assert (type(rows.grad_fn).__name__ == "_GatherPassthroughBackward") == fresh
    # skip_residual on the reference (e.g. a GPU without Triton): never the in-place node
    real = _backend.select
    monkeypatch.setattr(
        skip_glue,
        "select",
        lambda op, device: "reference" if op == "skip_residual" else real(op, device),
    )
    with sts_kernels.use_backend(impl):
        rows, x_pass = gather_rows_passthrough(x, plan)
    assert x_pass is x and type(rows.grad_fn).__name__ != "_GatherPassthroughBackward"
