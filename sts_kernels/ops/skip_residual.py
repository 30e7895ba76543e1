"""skip_residual: out = x + gate * delta on the active rows, out = x elsewhere.

Two forms of the update `u`: the residual `delta` (out = x + g * delta), or, with
`from_output=True`, the layer's output `y` on the routed rows (out = x + g * (y - x)): the
kernel forms `y - x` itself, so the skipper needs no separate `delta = y - rows` pass.

Backends: "triton" (the kernels below, registered as the opaque custom ops
`sts::skip_residual_triton` and `sts::skip_residual_backward_triton`; GPUs, or the CPU under the
interpreter), "cpp" (the extension's CPU ops `sts::skip_residual` and
`sts::skip_residual_backward`, csrc/skip_residual_cpu.cpp, same signatures) and
"reference". One helper registers fake kernels and autograd for both op pairs; the public
function validates and dispatches. The ops see canonical 2-D views: `x` `[R, F]` (R rows of
F = prod(feature dims) values) and `u` packed `[K, F]` or padded `[B, Kmax, F]`.

Layouts: the forward walks all R rows once and finds each row's update through the plan's
inverse map `row_to_k` (built by `route`, once per plan), so the output is written in a single
pass with no `x.clone()` followed by a scatter. The residual backward walks the update slots
(K packed, or B * Kmax padded with zeros written to the padding) and hands `grad_out` to `x`
as is; the output-form backward walks the R rows once, writing grad_x = (1 - g) * grad_out on
active rows (grad_out elsewhere), grad_y and grad_gate.

Double backward: the backward ops are opaque, so under `create_graph=True` the backward is
computed with differentiable torch ops instead (same formulas): second derivatives are exact
on every backend.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _checks, reference
from .._backend import extension, select
from .._triton import tl, triton
from .._types import RoutePlan
from ._common import acc_dtype, kernel, on_input_device, tile_shape


@triton.jit
def _gate(GATE_ptr, k, active, HAS_GATE: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """g[k] on active rows (1 without a gate), 0 elsewhere."""
    if HAS_GATE:
        return tl.load(GATE_ptr + k, mask=active, other=0.0).to(ACC_DTYPE)
    return tl.where(active, 1.0, 0.0).to(ACC_DTYPE)


@triton.jit
def _row_slots(
    ROW_TO_K_ptr,  # [R] int64: k of row i, -1 when no update row maps to it
    OFFSETS_ptr,  # [B + 1] int64
    pid,
    num_rows,
    num_active,
    num_slots,
    rows_per_sample,
    max_count,
    IS_PADDED: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    """Rows i of program `pid`, k = row_to_k[i] and k's slot in the update tensor: k packed,
    b * Kmax + (k - offsets[b]) padded (i = b * T + t). `active` is false where no update row
    maps to i, and where a malformed plan would point outside the update tensor (so a kernel
    never reads or writes out of bounds; a valid plan is unaffected)."""
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # [BLOCK_ROWS]
    in_range = rows < num_rows
    k = tl.load(ROW_TO_K_ptr + rows, mask=in_range, other=-1)
    active = (k >= 0) & (k < num_active)
    sample = rows // rows_per_sample  # only the padded layout uses it
    if IS_PADDED:
        first_k = tl.load(OFFSETS_ptr + sample, mask=active, other=0)
        slot = sample * max_count + k - first_k
    else:
        slot = k
    active = active & (slot >= 0) & (slot < num_slots)
    return rows, in_range, k, active, slot, sample


@triton.jit
def _skip_residual_fwd_kernel(
    X_ptr,  # [R, F]
    U_ptr,  # [K, F] packed or [B * Kmax, F] padded: delta, or y with FROM_OUTPUT
    GATE_ptr,  # [K]
    ROW_TO_K_ptr,  # [R] int64, k of the row's update or -1
    OFFSETS_ptr,  # [B + 1] int64 first k of every sample
    OUT_ptr,  # [R, F]
    COS_ptr,  # [K] fp32
    num_rows,
    num_active,
    num_slots,
    num_features,
    rows_per_sample,
    max_count,
    stride_x,
    stride_u,
    stride_out,
    HAS_GATE: tl.constexpr,
    IS_PADDED: tl.constexpr,
    FROM_OUTPUT: tl.constexpr,
    STATS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """out[i] = x[i] + g[k] * delta[k] where k = row_to_k[i] >= 0, else out[i] = x[i];
    delta[k] = u[k], or u[k] - x[i] with FROM_OUTPUT.

    Padded u: row i = b * T + t lives in slot b * Kmax + (k - offsets[b]).
    STATS: cos[k] = <x[i], out[i]> / max(|x[i]| |out[i]|, 1e-8), out taken before the cast.
    """
    pid = tl.program_id(0).to(tl.int64)
    # this program's rows, the update row k each adds (if any) and k's slot in U
    rows, in_range, k, active, slot, sample = _row_slots(
        ROW_TO_K_ptr, OFFSETS_ptr, pid, num_rows, num_active, num_slots, rows_per_sample,
        max_count, IS_PADDED=IS_PADDED, BLOCK_ROWS=BLOCK_ROWS,
    )  # fmt: skip
    gate = _gate(GATE_ptr, k, active, HAS_GATE=HAS_GATE, ACC_DTYPE=ACC_DTYPE)
    x_dot_out = tl.zeros([BLOCK_ROWS], dtype=ACC_DTYPE)
    x_sq = tl.zeros([BLOCK_ROWS], dtype=ACC_DTYPE)
    out_sq = tl.zeros([BLOCK_ROWS], dtype=ACC_DTYPE)
    # one sweep over the features: read x (and u on active rows), write out
    for start in range(0, num_features, BLOCK_F):
        cols = start + tl.arange(0, BLOCK_F)  # [BLOCK_F]
        col_ok = cols < num_features
        row_mask = in_range[:, None] & col_ok[None, :]
        x = tl.load(X_ptr + rows[:, None] * stride_x + cols[None, :], mask=row_mask, other=0.0)
        x = x.to(ACC_DTYPE)
        u = tl.load(
            U_ptr + slot[:, None] * stride_u + cols[None, :],
            mask=active[:, None] & col_ok[None, :],
            other=0.0,
        ).to(ACC_DTYPE)
        delta = u - x if FROM_OUTPUT else u
        # inactive rows are copied bit-exactly (x + 0 would turn -0.0 into +0.0)
        out = tl.where(active[:, None], x + gate[:, None] * delta, x)
        tl.store(
            OUT_ptr + rows[:, None] * stride_out + cols[None, :],
            out.to(OUT_ptr.dtype.element_ty),
            mask=row_mask,
        )
        if STATS:
            x_dot_out += tl.sum(x * out, axis=1)
            x_sq += tl.sum(x * x, axis=1)
            out_sq += tl.sum(out * out, axis=1)
    # the redundancy signal of the active rows, from the same pass
    if STATS:
        cos = x_dot_out / tl.maximum(tl.sqrt(x_sq) * tl.sqrt(out_sq), 1e-8)
        tl.store(COS_ptr + k, cos.to(tl.float32), mask=active)


@triton.jit
def _skip_residual_bwd_delta_kernel(
    GRAD_OUT_ptr,  # [R, F]
    DELTA_ptr,  # [K, F] packed or [B * Kmax, F] padded
    GATE_ptr,  # [K]
    INDEX_ptr,  # [K] int64 flat row of every k
    OFFSETS_ptr,  # [B + 1] int64
    GRAD_DELTA_ptr,  # like DELTA
    GRAD_GATE_ptr,  # [K]
    num_rows,
    num_slots,
    num_features,
    max_count,
    stride_grad_out,
    stride_delta,
    stride_grad_delta,
    HAS_GATE: tl.constexpr,
    NEED_GRAD_GATE: tl.constexpr,
    IS_PADDED: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """Residual form: grad_delta[k] = g[k] * grad_out[i], grad_gate[k] = <grad_out[i],
    delta[k]>, i = index[k] (grad_x is grad_out itself: no kernel).

    Padded: slot s = b * Kmax + j holds k = offsets[b] + j when j < counts[b]; other slots are
    padding and get grad_delta = 0. The grid is (B, Kmax blocks) then: the sample is the
    program's, with no per-slot 64-bit division (which spilled on sm_80).
    """
    pid = tl.program_id(0).to(tl.int64)
    # the k (and so the flat row) of every delta slot
    if IS_PADDED:
        j = tl.program_id(1).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # [BLOCK_ROWS]
        slots = pid * max_count + j
        in_range = j < max_count
        first_k = tl.load(OFFSETS_ptr + pid)
        k = first_k + j
        valid = in_range & (k < tl.load(OFFSETS_ptr + pid + 1))
    else:
        slots = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # [BLOCK_ROWS]
        in_range = slots < num_slots
        k = slots
        valid = in_range
    rows = tl.load(INDEX_ptr + k, mask=valid, other=0)
    valid = valid & (rows >= 0) & (rows < num_rows)  # a malformed plan stays in bounds
    gate = _gate(GATE_ptr, k, valid, HAS_GATE=HAS_GATE, ACC_DTYPE=ACC_DTYPE)
    grad_gate = tl.zeros([BLOCK_ROWS], dtype=ACC_DTYPE)
    # one sweep over the features: read grad_out (and delta for grad_gate), write grad_delta
    for start in range(0, num_features, BLOCK_F):
        cols = start + tl.arange(0, BLOCK_F)  # [BLOCK_F]
        col_ok = cols < num_features
        valid_mask = valid[:, None] & col_ok[None, :]
        grad_out = tl.load(
            GRAD_OUT_ptr + rows[:, None] * stride_grad_out + cols[None, :],
            mask=valid_mask,
            other=0.0,
        ).to(ACC_DTYPE)
        tl.store(
            GRAD_DELTA_ptr + slots[:, None] * stride_grad_delta + cols[None, :],
            (gate[:, None] * grad_out).to(GRAD_DELTA_ptr.dtype.element_ty),
            mask=in_range[:, None] & col_ok[None, :],
        )
        if NEED_GRAD_GATE:
            delta = tl.load(
                DELTA_ptr + slots[:, None] * stride_delta + cols[None, :],
                mask=valid_mask,
                other=0.0,
            ).to(ACC_DTYPE)
            grad_gate += tl.sum(grad_out * delta, axis=1)
    if NEED_GRAD_GATE:
        tl.store(GRAD_GATE_ptr + k, grad_gate.to(GRAD_GATE_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _skip_residual_bwd_output_kernel(
    GRAD_OUT_ptr,  # [R, F]
    X_ptr,  # [R, F]
    Y_ptr,  # [K, F] packed or [B * Kmax, F] padded
    GATE_ptr,  # [K]
    ROW_TO_K_ptr,  # [R] int64
    OFFSETS_ptr,  # [B + 1] int64
    GRAD_X_ptr,  # [R, F]
    GRAD_Y_ptr,  # like Y
    GRAD_GATE_ptr,  # [K]
    num_rows,
    num_active,
    num_slots,
    num_features,
    rows_per_sample,
    max_count,
    stride_grad_out,
    stride_x,
    stride_y,
    HAS_GATE: tl.constexpr,
    NEED_GRAD_GATE: tl.constexpr,
    IS_PADDED: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """Output form, one walk over the R rows: grad_x[i] = (1 - g[k]) * grad_out[i] and
    grad_y[k] = g[k] * grad_out[i] for k = row_to_k[i] >= 0, grad_x[i] = grad_out[i] elsewhere;
    grad_gate[k] = <grad_out[i], y[k] - x[i]>.

    Padded: padding slot (b, j), counts[b] <= j < Kmax, gets zeros from row i = b * T + j
    (Kmax <= T, so every padding slot has exactly one such row): no separate zero fill.
    """
    pid = tl.program_id(0).to(tl.int64)
    # this program's rows, the update row k each adds (if any) and k's slot in U
    rows, in_range, k, active, slot, sample = _row_slots(
        ROW_TO_K_ptr, OFFSETS_ptr, pid, num_rows, num_active, num_slots, rows_per_sample,
        max_count, IS_PADDED=IS_PADDED, BLOCK_ROWS=BLOCK_ROWS,
    )  # fmt: skip
    if IS_PADDED:
        # the padding slot this row zeroes, if any: (b, t) with counts[b] <= t < Kmax
        t = rows - sample * rows_per_sample
        count = tl.load(OFFSETS_ptr + sample + 1, mask=in_range, other=0) - tl.load(
            OFFSETS_ptr + sample, mask=in_range, other=0
        )
        pad_slot = sample * max_count + t
        pads = in_range & (t >= count) & (t < max_count) & (pad_slot < num_slots)
    gate = _gate(GATE_ptr, k, active, HAS_GATE=HAS_GATE, ACC_DTYPE=ACC_DTYPE)
    grad_gate = tl.zeros([BLOCK_ROWS], dtype=ACC_DTYPE)
    # one sweep over the features: read grad_out, write grad_x (and grad_y on active rows)
    for start in range(0, num_features, BLOCK_F):
        cols = start + tl.arange(0, BLOCK_F)  # [BLOCK_F]
        col_ok = cols < num_features
        row_mask = in_range[:, None] & col_ok[None, :]
        active_mask = active[:, None] & col_ok[None, :]
        grad_out = tl.load(
            GRAD_OUT_ptr + rows[:, None] * stride_grad_out + cols[None, :],
            mask=row_mask,
            other=0.0,
        ).to(ACC_DTYPE)
        # inactive rows pass grad_out through bit-exactly
        grad_x = tl.where(active[:, None], grad_out - gate[:, None] * grad_out, grad_out)
        tl.store(
            GRAD_X_ptr + rows[:, None] * stride_grad_out + cols[None, :],
            grad_x.to(GRAD_X_ptr.dtype.element_ty),
            mask=row_mask,
        )
        tl.store(
            GRAD_Y_ptr + slot[:, None] * stride_y + cols[None, :],
            (gate[:, None] * grad_out).to(GRAD_Y_ptr.dtype.element_ty),
            mask=active_mask,
        )
        if IS_PADDED:
            tl.store(
                GRAD_Y_ptr + pad_slot[:, None] * stride_y + cols[None, :],
                tl.zeros([BLOCK_ROWS, BLOCK_F], dtype=GRAD_Y_ptr.dtype.element_ty),
                mask=pads[:, None] & col_ok[None, :],
            )
        if NEED_GRAD_GATE:
            x = tl.load(X_ptr + rows[:, None] * stride_x + cols[None, :], mask=active_mask)
            y = tl.load(Y_ptr + slot[:, None] * stride_y + cols[None, :], mask=active_mask)
            delta = tl.where(active_mask, y.to(ACC_DTYPE) - x.to(ACC_DTYPE), 0.0)
            grad_gate += tl.sum(grad_out * delta, axis=1)
    if NEED_GRAD_GATE:
        tl.store(GRAD_GATE_ptr + k, grad_gate.to(GRAD_GATE_ptr.dtype.element_ty), mask=active)


def _launch_config(num_rows: int, num_features: int) -> dict:
    """Tile: BLOCK_ROWS rows x BLOCK_F features, looped over F inside the program (the
    stats need whole-row sums)."""
    block_rows, block_f, num_warps = tile_shape(num_rows, num_features)
    return dict(BLOCK_ROWS=block_rows, BLOCK_F=block_f, num_warps=num_warps)


def _slots(update: Tensor) -> tuple[bool, int, int]:
    """(is_padded, number of update rows, Kmax) of a canonical `[K, F]` / `[B, Kmax, F]`."""
    if update.dim() == 3:
        return True, update.shape[0] * update.shape[1], update.shape[1]
    return False, update.shape[0], 0


@torch.library.custom_op("sts::skip_residual_triton", mutates_args=())
@on_input_device
def _skip_residual_triton(
    x: Tensor,
    update: Tensor,
    index: Tensor,
    row_to_k: Tensor,
    offsets: Tensor,
    gate: Tensor | None,
    stats: bool,
    from_output: bool,
) -> tuple[Tensor, Tensor]:
    """x `[R, F]`, update `[K, F]` or `[B, Kmax, F]` -> (out `[R, F]`, cos `[K]` or `[0]` fp32)."""
    x, update = x.contiguous(), update.contiguous()
    row_to_k, offsets = row_to_k.contiguous(), offsets.contiguous()
    gate = None if gate is None else gate.contiguous()  # the kernels read gate[k] at stride 1
    num_rows, num_features = x.shape
    is_padded, num_slots, max_count = _slots(update)
    out = torch.empty_like(x)
    cos = torch.empty(index.numel() if stats else 0, dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out, cos.zero_()
    config = _launch_config(num_rows, num_features)
    grid = (triton.cdiv(num_rows, config["BLOCK_ROWS"]),)
    _skip_residual_fwd_kernel[grid](
        x,
        update,
        gate if gate is not None else x,  # never read without HAS_GATE
        row_to_k,
        offsets,
        out,
        cos,
        num_rows,
        index.numel(),
        num_slots,
        num_features,
        num_rows // max(offsets.numel() - 1, 1),
        max_count,
        x.stride(0),
        num_features,
        out.stride(0),
        HAS_GATE=gate is not None,
        IS_PADDED=is_padded,
        FROM_OUTPUT=from_output,
        STATS=stats,
        ACC_DTYPE=acc_dtype(x.dtype),
        **config,
    )
    return out, cos


@torch.library.custom_op("sts::skip_residual_backward_triton", mutates_args=())
@on_input_device
def _skip_residual_backward_triton(
    grad_out: Tensor,
    x: Tensor | None,
    update: Tensor,
    index: Tensor,
    row_to_k: Tensor,
    offsets: Tensor,
    gate: Tensor | None,
    need_grad_gate: bool,
    from_output: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x `[R, F]` (output form) or `[0, F]` (residual form: grad_x is grad_out), grad of
    the update, grad_gate `[K]` in gate's dtype or `[0]` if not needed)."""
    grad_out, update = grad_out.contiguous(), update.contiguous()
    index, row_to_k, offsets = index.contiguous(), row_to_k.contiguous(), offsets.contiguous()
    gate = None if gate is None else gate.contiguous()
    num_rows, num_features = grad_out.shape
    is_padded, num_slots, max_count = _slots(update)
    need_grad_gate = need_grad_gate and gate is not None
    grad_gate = torch.empty(
        index.numel() if need_grad_gate else 0,
        dtype=gate.dtype if gate is not None else torch.float32,
        device=update.device,
    )
    common = dict(
        HAS_GATE=gate is not None,
        NEED_GRAD_GATE=need_grad_gate,
        IS_PADDED=is_padded,
        ACC_DTYPE=acc_dtype(update.dtype),
    )
    if from_output:
        x = x.contiguous()
        grad_x = torch.empty_like(grad_out)
        grad_update = torch.empty_like(update)  # the row walk writes the padding's zeros too
        if grad_x.numel() == 0:
            return grad_x, grad_update.zero_(), grad_gate.zero_()
        config = _launch_config(num_rows, num_features)
        _skip_residual_bwd_output_kernel[(triton.cdiv(num_rows, config["BLOCK_ROWS"]),)](
            grad_out,
            x,
            update,
            gate if gate is not None else update,  # never read without HAS_GATE
            row_to_k,
            offsets,
            grad_x,
            grad_update,
            grad_gate,
            num_rows,
            index.numel(),
            num_slots,
            num_features,
            num_rows // max(offsets.numel() - 1, 1),
            max_count,
            num_features,
            num_features,
            num_features,
            **common,
            **config,
        )
        return grad_x, grad_update, grad_gate
    grad_x = grad_out.new_empty((0, num_features))
    grad_update = torch.empty_like(update)
    if grad_update.numel() == 0:
        return grad_x, grad_update, grad_gate.zero_()
    if is_padded:  # one program row per sample
        config = _launch_config(max_count, num_features)
        grid = (update.shape[0], triton.cdiv(max_count, config["BLOCK_ROWS"]))
    else:
        config = _launch_config(num_slots, num_features)
        grid = (triton.cdiv(num_slots, config["BLOCK_ROWS"]),)
    _skip_residual_bwd_delta_kernel[grid](
        grad_out,
        update,
        gate if gate is not None else update,  # never read without HAS_GATE
        index,
        offsets,
        grad_update,
        grad_gate,
        num_rows,
        num_slots,
        num_features,
        max_count,
        num_features,
        num_features,
        num_features,
        **common,
        **config,
    )
    return grad_x, grad_update, grad_gate


# ---------------------------------------------------------------------------------------------
# torch.library registration


def _differentiable_backward(grad_out, x, update, index, row_to_k, offsets, gate, from_output):
    """The backward's formulas in differentiable torch ops (double backward): (grad_x,
    grad_update, grad_gate). Same shapes and dtypes as the backward op's results."""
    num_rows, num_features = grad_out.shape
    is_padded, num_slots, max_count = _slots(update)
    acc = torch.promote_types(update.dtype, torch.float32)
    # [K] the update slot of every active row
    slot = torch.arange(index.numel(), device=index.device)
    if is_padded:
        sample = index // max(num_rows // max(offsets.numel() - 1, 1), 1)
        slot = sample * max_count + slot - offsets[sample]
    g = (gate if gate is not None else grad_out.new_ones(index.numel())).to(acc)[:, None]
    grad_rows = grad_out.index_select(0, index).to(acc)  # [K, F]
    u = update.reshape(num_slots, num_features).index_select(0, slot).to(acc)
    delta = u - x.index_select(0, index).to(acc) if from_output else u
    grad_update = update.new_zeros((num_slots, num_features)).index_copy(
        0, slot, (g * grad_rows).to(update.dtype)
    )
    grad_x = grad_out
    if from_output:
        grad_x = grad_out.index_copy(0, index, ((1 - g) * grad_rows).to(grad_out.dtype))
    grad_gate = None if gate is None else (grad_rows * delta).sum(-1).to(gate.dtype)
    return grad_x, grad_update.view(update.shape), grad_gate


def _register(forward: str, backward: str) -> None:
    """Fake (meta) kernels of a (forward, backward) op pair with the signatures of
    `sts::skip_residual_triton` / `sts::skip_residual_backward_triton`, and the forward's autograd."""
    backward_op = getattr(torch.ops.sts, backward.split("::")[1])

    @torch.library.register_fake(forward)
    def _forward_fake(x, update, index, row_to_k, offsets, gate, stats, from_output):
        cos = x.new_empty(index.shape[0] if stats else 0, dtype=torch.float32)
        return torch.empty_like(x), cos

    @torch.library.register_fake(backward)
    def _backward_fake(
        grad_out, x, update, index, row_to_k, offsets, gate, need_grad_gate, from_output
    ):
        grad_x = (
            torch.empty_like(grad_out)
            if from_output
            else grad_out.new_empty((0,) + grad_out.shape[1:])
        )
        num_gate = index.shape[0] if need_grad_gate and gate is not None else 0
        dtype = gate.dtype if gate is not None else torch.float32
        return grad_x, torch.empty_like(update), update.new_empty(num_gate, dtype=dtype)

    def setup_context(ctx, inputs, output):
        x, update, index, row_to_k, offsets, gate, _, from_output = inputs
        ctx.from_output = from_output
        # the residual form needs no x in the backward: do not keep it alive
        ctx.save_for_backward(x if from_output else None, update, index, row_to_k, offsets, gate)
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero-filled gradient for `cos`: one launch less

    def backward_fn(ctx, grad_out, _grad_cos):
        x, update, index, row_to_k, offsets, gate = ctx.saved_tensors
        if grad_out is None:  # `out` took no part in the loss
            return (None,) * 8
        if torch.is_grad_enabled():  # create_graph: the opaque op has no derivative of its own
            grad_x, grad_update, grad_gate = _differentiable_backward(
                grad_out, x, update, index, row_to_k, offsets, gate, ctx.from_output
            )
        else:
            grad_x, grad_update, grad_gate = backward_op(
                grad_out,
                x,
                update,
                index,
                row_to_k,
                offsets,
                gate,
                ctx.needs_input_grad[5],
                ctx.from_output,
            )
            # residual form: d out / d x is the identity on every row (skipped rows are
            # copies, active rows add a term independent of x), so grad_x is grad_out itself
            grad_x = grad_x if ctx.from_output else grad_out
        return (
            grad_x if ctx.needs_input_grad[0] else None,
            grad_update,
            None,
            None,
            None,
            grad_gate if gate is not None and ctx.needs_input_grad[5] else None,
            None,
            None,
        )

    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)


_register("sts::skip_residual_triton", "sts::skip_residual_backward_triton")
if extension() is not None:  # importing the extension defined the C++ ops (CPU kernels)
    _register("sts::skip_residual", "sts::skip_residual_backward")


def skip_residual(
    x: Tensor,
    delta: Tensor,
    plan: RoutePlan,
    gate: Tensor | None = None,
    stats: bool = False,
    from_output: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Skip-gated residual (STS_SPEC.md §2); with `stats`, also per-row cos(x, out) in fp32.

    `x` `[*plan.shape, *feat]`; `delta` packed `[K, *feat]` or, for a `[B, T]` plan, padded
    `[B, Kmax, *feat]` (slots past a sample's count are ignored and get zero gradient);
    `gate` `[K]` or None. With `from_output=True`, `delta` is the layer's output `y` on the
    routed rows and the op computes `x + gate * (y - x)` in one pass. Returns `out` like `x`,
    or `(out, cos)` with `cos` `[K]` (no grad).
    """
    is_padded = _checks.skip_residual(x, delta, plan, gate)
    impl = select("skip_residual", x.device)
    if impl == "reference":
        return reference.skip_residual(x, delta, plan, gate, stats, from_output)
    num_features = math.prod(x.shape[len(plan.shape) :])
    rows = x.reshape(plan.num_rows, num_features)  # [R, F]
    if is_padded:
        delta = delta.reshape(plan.shape[0], delta.shape[1], num_features)  # [B, Kmax, F]
    else:
        delta = delta.reshape(plan.num_active, num_features)  # [K, F]
    out, cos = kernel("skip_residual", impl)(
        rows, delta, plan.index, plan.row_to_k, plan.offsets, gate, stats, from_output
    )
    out = out.view(x.shape)
    return (out, cos) if stats else out
