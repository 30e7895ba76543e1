"""The skipper's glue around one skipped layer, as one op:

    rows, combine = gather_for_layer(x, plan, padded)
    out = combine(layer(rows), gate)            # skip_residual(x, y, plan, gate, from_output=True)

`gather_for_layer` gathers the kept rows (`gather_rows`) and `combine` writes `x` on skipped
rows and `x + gate * (y - x)` on kept ones (`skip_residual(from_output=True)`). Where that
combine's backward allocates a fresh grad_x (the cpp and triton backends of skip_residual),
the gather and the combine's input `x` are one autograd node (`_GatherPassthrough`) whose
backward adds the rows' gradient into that grad_x in place (K rows): no zero-filled R-row
gradient and no out-of-place R-row add. The in-place add is safe only because of that
allocation: the reference skip_residual (autograd of torch ops), like the residual form of the
compiled ones, may hand back grad_out itself as grad_x, where the add would corrupt a gradient
someone else holds. So the choice is made here, from the backend skip_residual runs
(`_backend.select`), and `x_pass` never leaves this module. Tests: tests/ops/test_skip_glue.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .. import _checks
from .._backend import select
from .._types import RoutePlan
from ._common import kernel
from .routing import gather_rows
from .skip_residual import skip_residual

# combine(y, gate=None, stats=False) -> out, or (out, cos) with stats
Combine = Callable[..., "Tensor | tuple[Tensor, Tensor]"]


def add_rows_(dst: Tensor, ids: Tensor, src: Tensor, impl: str) -> Tensor:
    """`dst[ids[k]] += src[k]` in place for the ids in [0, len(dst)); other ids (the padded
    layout's -1) are skipped, their src rows unread. Valid ids must be unique (a plan's).
    `impl`: "triton" (`sts::add_rows_triton`), "cpp" (`sts::add_rows` on the CPU) or otherwise
    (the reference; "cpp" on a GPU, whose extension has no add kernel) a masked fill and
    `index_put_`, which read the skipped rows too."""
    if impl == "triton":
        torch.ops.sts.add_rows_triton(dst, ids, src)
    elif impl == "cpp" and dst.device.type == "cpu":
        torch.ops.sts.add_rows(dst, ids, src)
    else:
        skipped = (ids < 0) | (ids >= dst.shape[0])  # [N]
        src = src.masked_fill(skipped.view(-1, *(1,) * (src.dim() - 1)), 0)
        dst.index_put_((ids.masked_fill(skipped, 0),), src, accumulate=True)
    return dst


class _GatherPassthrough(torch.autograd.Function):
    """`(gather(x, ids), x)` as one autograd node, so its backward gets both gradients at once
    and returns grad_x = grad(x_pass) with the routed rows' gradient added in place
    (`add_rows_`: K rows read twice and written once, padding slots never read), and no
    zero-filled gather gradient that autograd then adds to grad(x_pass) out of place (R rows
    read and written).

    Why the in-place add is safe: `gather_for_layer` feeds `x_pass` to nothing but its
    `combine`, `skip_residual(from_output=True)` on a backend whose backward allocates its
    input gradient, so grad(x_pass) is a fresh tensor that no one else holds. Under
    create_graph (double backward) the add is out of place and differentiable, so second
    derivatives stay exact; without a grad(x_pass) it starts from zeros."""

    @staticmethod
    def forward(ctx, x: Tensor, ids: Tensor, lead: int, gather: str, add: str):
        # x [*plan.shape, *feat]; ids: plan.index [K] or plan.padded_index [B, Kmax] (its -1
        # slots are padding), the gather's two layouts
        ctx.save_for_backward(ids)
        ctx.shape, ctx.lead, ctx.add = x.shape, lead, add
        ctx.set_materialize_grads(False)
        flat = x.reshape(math.prod(x.shape[:lead]), *x.shape[lead:])  # [R, *feat]
        rows = kernel("gather_rows", gather)(flat, ids)  # [K or B, Kmax, *feat]
        return rows, x.view_as(x)

    @staticmethod
    def backward(ctx, grad_rows: Tensor | None, grad_x: Tensor | None):
        (ids,) = ctx.saved_tensors
        if grad_rows is None:
            return grad_x, None, None, None, None
        ids = ids.reshape(-1)  # [K or B * Kmax]
        feat = ctx.shape[ctx.lead :]
        src = grad_rows.reshape(ids.numel(), *feat)  # [K or B * Kmax, *feat]
        num_rows = math.prod(ctx.shape[: ctx.lead])
        if grad_x is None or torch.is_grad_enabled() or not grad_x.is_contiguous():
            # no fresh dense gradient to add into, or double backward: out of place, in
            # differentiable ops; padding slots (-1) and the ids of a malformed plan (which
            # the Triton and CUDA gathers ran through) add zeros to row 0 (a fill, not a
            # product: no NaN * 0) rather than wrap or fault
            skipped = (ids < 0) | (ids >= num_rows)
            src = src.masked_fill(skipped.view(-1, *(1,) * len(feat)), 0)
            base = grad_rows.new_zeros(ctx.shape) if grad_x is None else grad_x
            grad_x = base.reshape(num_rows, *feat).index_put(
                (ids.masked_fill(skipped, 0),), src, accumulate=True
            )
            grad_x = grad_x.view(ctx.shape)
        else:
            add_rows_(grad_x.view(num_rows, *feat), ids, src, ctx.add)
        return grad_x, None, None, None, None


def gather_rows_passthrough(x: Tensor, plan: RoutePlan, padded: bool = False):
    """`(gather_rows(x, plan, padded), x_pass)` for `skip_residual(x_pass, y, plan, ...,
    from_output=True)` and nothing else (use `gather_for_layer`, which keeps to that): `x_pass`
    equals `x`, and the two come from one autograd node whose backward adds the rows' gradient
    into grad(x_pass) in place, where skip_residual's backward allocates that gradient (its cpp
    and triton backends). Under torch.compile, without grad, and where skip_residual or the
    gather runs the reference it is `(gather_rows(x, plan, padded), x)`."""
    _checks.gather_rows(x, plan, padded)
    gather = select("gather_rows", x.device)
    fresh_grad_x = select("skip_residual", x.device) != "reference"
    plain = not (x.requires_grad and torch.is_grad_enabled()) or gather == "reference"
    if plain or not fresh_grad_x or torch.compiler.is_compiling():
        return gather_rows(x, plan, padded), x
    ids = plan.padded_index if padded else plan.index  # [B, Kmax] or [K]
    add = select("add_rows", x.device)
    return _GatherPassthrough.apply(x, ids, len(plan.shape), gather, add)


def gather_for_layer(x: Tensor, plan: RoutePlan, padded: bool = False) -> tuple[Tensor, Combine]:
    """`(rows, combine)`: the plan's rows of `x` for the layer (`[K, ...]`, or `[B, Kmax, ...]`
    with `padded=True`) and `combine(y, gate=None, stats=False)`, which puts the layer's output
    `y` on those rows back: `skip_residual(x, y, plan, gate, stats, from_output=True)`. `x`
    gets one gradient, with the rows' gradient added in place where that is safe (module
    docstring); values and gradients equal the plain gather and skip_residual's."""
    rows, x_pass = gather_rows_passthrough(x, plan, padded)

    def combine(y: Tensor, gate: Tensor | None = None, stats: bool = False):
        return skip_residual(x_pass, y, plan, gate, stats=stats, from_output=True)

    return rows, combine
