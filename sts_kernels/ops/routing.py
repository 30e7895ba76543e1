"""route / gather_rows: sparse routing of the rows that run a layer.

Backends: "cpp" (the extension ops `sts::route`, `sts::gather_rows`, `sts::scatter_rows`, CPU
and CUDA), "triton" (row gather/scatter kernels as the custom ops `sts::gather_rows_triton`,
`sts::scatter_rows_triton`; route then uses the reference) and "reference". Gather and scatter
copy whole rows as raw words, so they work for every dtype; row id -1 means "a zero row"
(gather) or "no row" (scatter), which is how the padded layout marks the slots past a
sample's count. Each is the other's backward.

`gather_rows_passthrough` (the skipper's gather) returns the rows and `x` from one autograd
node, whose backward adds the rows' gradient in place into the gradient `x` gets through the
passthrough (see `_GatherPassthrough` for when that is safe) with `add_rows_`: the custom ops
`sts::add_rows` (C++, CPU) and `sts::add_rows_triton`, `dst[ids[k]] += src[k]` touching only
the rows of valid ids (the padded layout's -1 slots are neither read nor written).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _checks, reference
from .._backend import extension, select
from .._triton import tl, triton
from .._types import RoutePlan
from ._common import acc_dtype, register_adjoint_autograd, tile_shape

# Words per row block: wide enough for 16-byte vector accesses of a long row, while leaving
# a 4K-word GPU tile >= 4 rows tall.
_MAX_BLOCK_COLS = 1024

# ---------------------------------------------------------------------------------------------
# Triton kernel


@triton.jit
def _copy_rows_kernel(
    SRC_ptr,  # [R_src, num_cols] integer words
    DST_ptr,  # [R_dst, num_cols] integer words
    ROWS_ptr,  # [num_ids] int64 row ids, -1 for none
    num_ids,
    num_rows,  # rows of the tensor the ids index (src for gather, dst for scatter)
    num_cols,
    stride_src_row,
    stride_dst_row,
    SCATTER: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """Row copy through a list of row ids, on rows of `num_cols` words.

    gather:  dst[k, :] = src[rows[k], :]    (zeros where rows[k] = -1)
    scatter: dst[rows[k], :] = src[k, :]    (nothing where rows[k] = -1)
    An id outside [0, num_rows) counts as -1: a bad plan never reads or writes out of bounds.
    """
    pid_ids = tl.program_id(0).to(tl.int64)
    pid_cols = tl.program_id(1).to(tl.int64)
    # this program's block of ids and the row each one names
    k = pid_ids * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    k_in = k < num_ids
    row = tl.load(ROWS_ptr + k, mask=k_in, other=-1)
    row = tl.where(row < num_rows, row, -1)
    # this program's block of words within a row
    cols = pid_cols * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    cols_in = (cols < num_cols)[None, :]
    has_row = (row >= 0)[:, None] & cols_in
    if SCATTER:
        # packed row k lands on row `row`; ids of -1 write nothing
        words = tl.load(SRC_ptr + k[:, None] * stride_src_row + cols[None, :], mask=has_row)
        tl.store(DST_ptr + row[:, None] * stride_dst_row + cols[None, :], words, mask=has_row)
    else:
        # row `row` lands on packed row k; ids of -1 give a zero row
        words = tl.load(
            SRC_ptr + row[:, None] * stride_src_row + cols[None, :], mask=has_row, other=0
        )
        tl.store(
            DST_ptr + k[:, None] * stride_dst_row + cols[None, :],
            words,
            mask=k_in[:, None] & cols_in,
        )


@triton.jit
def _add_rows_kernel(
    DST_ptr,  # [num_rows, num_cols], updated in place
    SRC_ptr,  # [num_ids, num_cols]
    IDS_ptr,  # [num_ids] int64 destination row of every source row
    num_ids,
    num_rows,
    num_cols,
    stride_dst_row,
    stride_src_row,
    ACC_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """Row add through a list of row ids:

    dst[ids[k], :] += src[k, :]    for every k with 0 <= ids[k] < num_rows

    Other ids (-1 marks a padding slot; anything else out of range is a malformed plan) are
    skipped: their source row is never read and no row is written. The valid ids are unique
    (a plan's rows), so every destination row has one writer: a load-add-store without
    atomics, deterministic and fine for bf16 (which has no atomic_add).
    """
    pid_ids = tl.program_id(0).to(tl.int64)
    pid_cols = tl.program_id(1).to(tl.int64)
    # this program's block of ids and whether each names a row of dst
    k = pid_ids * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row = tl.load(IDS_ptr + k, mask=k < num_ids, other=-1)
    valid = (row >= 0) & (row < num_rows)
    # this program's block of columns, on the valid rows only
    cols = pid_cols * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = valid[:, None] & (cols < num_cols)[None, :]
    # the sum in the accumulator type, rounded once to dst's dtype
    src = tl.load(SRC_ptr + k[:, None] * stride_src_row + cols[None, :], mask=mask)
    dst_ptrs = DST_ptr + row[:, None] * stride_dst_row + cols[None, :]
    total = tl.load(dst_ptrs, mask=mask).to(ACC_DTYPE) + src.to(ACC_DTYPE)
    tl.store(dst_ptrs, total.to(DST_ptr.dtype.element_ty), mask=mask)


_WORDS = (torch.int64, torch.int32, torch.int16, torch.uint8)


def _word_dtype(row_bytes: int, *tensors: Tensor) -> torch.dtype:
    """The widest integer word that divides a row and every tensor's start address, so each
    row starts word-aligned (a view may start at any element)."""
    return next(
        w
        for w in _WORDS
        if row_bytes % w.itemsize == 0 and all(t.data_ptr() % w.itemsize == 0 for t in tensors)
    )


def _launch_copy_rows(src: Tensor, dst: Tensor, rows: Tensor, scatter: bool) -> None:
    """Gather (`dst[k] = src[rows[k]]`) or scatter (`dst[rows[k]] = src[k]`) whole rows of the
    contiguous `src` and `dst`."""
    if src.numel() == 0 or dst.numel() == 0 or rows.numel() == 0:
        return
    row_bytes = math.prod(src.shape[1:]) * src.element_size()
    word = _word_dtype(row_bytes, src, dst)
    # [Ns, W], [Nd, W]; canonical 2-D strides first: a contiguous tensor may keep any stride
    # on a size-1 dim (even through view(-1)), which a dtype view rejects
    src_words, dst_words = (
        t.as_strided((t.shape[0], t[0].numel()), (t[0].numel(), 1)).view(torch.uint8).view(word)
        for t in (src, dst)
    )
    num_cols = src_words.shape[1]
    block_rows, block_cols, num_warps = tile_shape(rows.numel(), num_cols, _MAX_BLOCK_COLS)
    grid = (triton.cdiv(rows.numel(), block_rows), triton.cdiv(num_cols, block_cols))
    _copy_rows_kernel[grid](
        src_words,
        dst_words,
        rows,
        rows.numel(),
        dst_words.shape[0] if scatter else src_words.shape[0],
        num_cols,
        src_words.stride(0),
        dst_words.stride(0),
        SCATTER=scatter,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        num_warps=num_warps,
    )


def _launch_add_rows(dst: Tensor, ids: Tensor, src: Tensor) -> None:
    """`dst[ids[k]] += src[k]` for the contiguous `dst` `[R, ...]` and `src` `[len(ids), ...]`."""
    num_cols = math.prod(dst.shape[1:])
    if ids.numel() == 0 or num_cols == 0 or dst.shape[0] == 0:
        return
    block_rows, block_cols, num_warps = tile_shape(ids.numel(), num_cols, _MAX_BLOCK_COLS)
    grid = (triton.cdiv(ids.numel(), block_rows), triton.cdiv(num_cols, block_cols))
    _add_rows_kernel[grid](
        dst,
        src,
        ids,
        ids.numel(),
        dst.shape[0],
        num_cols,
        num_cols,
        num_cols,
        ACC_DTYPE=acc_dtype(dst.dtype),
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        num_warps=num_warps,
    )


# ---------------------------------------------------------------------------------------------
# torch.library registration


def _check_rows(op: str, data: Tensor, rows: Tensor) -> None:
    """The C++ ops' argument checks, for their Triton twins, which are callable directly as
    `torch.ops.sts.*`: rows of another shape or dtype would make the kernel write past its
    output (out-of-range ids are safe: the kernel skips them)."""
    if data.dim() < 1:
        raise ValueError(f"{op}: the row tensor needs at least 1 dim, got a 0-dim tensor")
    if rows.dim() != 1 or rows.dtype != torch.int64:
        raise ValueError(
            f"{op}: rows must be a 1-D int64 tensor, got {rows.dtype} of shape {tuple(rows.shape)}"
        )
    if rows.device != data.device:
        raise ValueError(f"{op}: rows is on {rows.device} but the data is on {data.device}")


@torch.library.custom_op("sts::gather_rows_triton", mutates_args=())
def _gather_rows_triton(x: Tensor, rows: Tensor) -> Tensor:
    """Triton twin of `sts::gather_rows`: `out[k] = x[rows[k]]`, a zero row for -1."""
    _check_rows("sts::gather_rows_triton", x, rows)
    src = x.contiguous()
    shape = (rows.shape[0], *src.shape[1:])
    # With no source rows every id is -1 and the kernel has nothing to read: all zeros.
    out = src.new_zeros(shape) if src.numel() == 0 else src.new_empty(shape)
    _launch_copy_rows(src, out, rows.contiguous(), scatter=False)
    return out


@torch.library.custom_op("sts::scatter_rows_triton", mutates_args=())
def _scatter_rows_triton(src: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """Triton twin of `sts::scatter_rows`: zeros with `out[rows[k]] = src[k]`, -1 skipped."""
    _check_rows("sts::scatter_rows_triton", src, rows)
    if src.shape[0] != rows.shape[0]:
        raise ValueError(
            f"sts::scatter_rows_triton: src has {src.shape[0]} rows but rows has "
            f"{rows.shape[0]} entries"
        )
    if num_rows < 0:
        raise ValueError(f"sts::scatter_rows_triton: num_rows must be >= 0, got {num_rows}")
    packed = src.contiguous()
    out = packed.new_zeros((num_rows, *packed.shape[1:]))
    _launch_copy_rows(packed, out, rows.contiguous(), scatter=True)
    return out


def _check_add_rows(dst: Tensor, ids: Tensor, src: Tensor) -> None:
    """The checks of the C++ `sts::add_rows`, for its Triton twin: everything the kernel
    relies on to stay inside dst and src (out-of-range ids are safe: it skips them)."""
    op = "sts::add_rows_triton"
    _check_rows(op, src, ids)
    if dst.dim() < 1 or not dst.is_contiguous():
        raise ValueError(
            f"{op}: dst must be a contiguous tensor of at least 1 dim (it is updated in place), "
            f"got shape {tuple(dst.shape)}, strides {dst.stride()}"
        )
    if not dst.is_floating_point():
        raise TypeError(f"{op}: dst must be floating point, got {dst.dtype}")
    if src.dtype != dst.dtype or src.device != dst.device:
        raise ValueError(
            f"{op}: src ({src.dtype} on {src.device}) must match dst ({dst.dtype} on {dst.device})"
        )
    if src.shape[0] != ids.shape[0] or src.shape[1:] != dst.shape[1:]:
        raise ValueError(
            f"{op}: src must be [len(ids), *dst.shape[1:]] = "
            f"{[ids.shape[0], *dst.shape[1:]]}, got {list(src.shape)}"
        )


@torch.library.custom_op("sts::add_rows_triton", mutates_args=("dst",))
def _add_rows_triton(dst: Tensor, ids: Tensor, src: Tensor) -> None:
    """Triton twin of `sts::add_rows`: `dst[ids[k]] += src[k]` in place, ids outside
    [0, len(dst)) skipped (their src rows unread). Valid ids must be unique."""
    _check_add_rows(dst, ids, src)
    _launch_add_rows(dst, ids.contiguous(), src.contiguous())


@_add_rows_triton.register_fake
def _add_rows_fake(dst: Tensor, ids: Tensor, src: Tensor) -> None:
    return None


def _register(gather: str, scatter: str) -> None:
    """Fake (meta) kernels and autograd for a gather/scatter pair over dim 0."""

    @torch.library.register_fake(gather)
    def _gather_fake(x: Tensor, rows: Tensor) -> Tensor:
        return x.new_empty((rows.shape[0], *x.shape[1:]))

    @torch.library.register_fake(scatter)
    def _scatter_fake(src: Tensor, rows: Tensor, num_rows: int) -> Tensor:
        return src.new_empty((num_rows, *src.shape[1:]))

    register_adjoint_autograd(gather, scatter, row_dim=0)


_register("sts::gather_rows_triton", "sts::scatter_rows_triton")
if extension() is not None:  # importing the extension defined the C++ ops
    _register("sts::gather_rows", "sts::scatter_rows")

    @torch.library.register_fake("sts::route")
    def _route_fake(mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        ctx = torch.library.get_ctx()
        active, max_count = ctx.new_dynamic_size(), ctx.new_dynamic_size()  # from the data
        b = mask.shape[0]
        return (
            mask.new_empty((active,), dtype=torch.int64),
            mask.new_empty((b,), dtype=torch.int64),
            mask.new_empty((b + 1,), dtype=torch.int64),
            mask.new_empty((mask.numel(),), dtype=torch.int64),
            mask.new_empty((b, max_count), dtype=torch.int64),
        )


_GATHER = {"cpp": "gather_rows", "triton": "gather_rows_triton"}

# ---------------------------------------------------------------------------------------------
# Public API


def route(mask: Tensor) -> RoutePlan:
    """Compact a bool mask (`[B]` samples or `[B, T]` tokens) into a `RoutePlan`."""
    _checks.mask(mask)
    if select("route", mask.device, ("cpp",)) == "reference":
        return reference.route(mask)
    index, counts, offsets, row_to_k, padded_index = torch.ops.sts.route(mask)
    return RoutePlan(index, counts, offsets, tuple(mask.shape), row_to_k, padded_index)


class _SparseGradGather(torch.autograd.Function):
    """A packed gather whose backward is a sparse COO gradient holding just the K rows (the
    values are the incoming gradient itself, no copy): where `x` also gets a dense gradient
    from another path, autograd adds the two in one pass instead of zero-filling R rows,
    scattering K into them and adding that."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, plan_shape: tuple[int, ...], gather: str) -> Tensor:
        ctx.save_for_backward(index)
        ctx.shape, ctx.plan_shape = x.shape, plan_shape
        flat = x.reshape(math.prod(plan_shape), *x.shape[len(plan_shape) :])  # [R, ...]
        return getattr(torch.ops.sts, gather)(flat, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        # x's own shape, the plan's dims sparse (a reshape's backward rejects sparse tensors);
        # index is ascending and unique: a coalesced COO tensor by construction
        if len(ctx.plan_shape) == 1:
            ids = index[None]  # [1, K]
        else:
            ids = torch.stack((index // ctx.plan_shape[1], index % ctx.plan_shape[1]))  # [2, K]
        sparse = torch.sparse_coo_tensor(
            ids, grad, ctx.shape, is_coalesced=True, check_invariants=False
        )
        return sparse, None, None, None


def add_rows_(dst: Tensor, ids: Tensor, src: Tensor, impl: str) -> Tensor:
    """`dst[ids[k]] += src[k]` in place for the ids in [0, len(dst)); other ids (the padded
    layout's -1) are skipped, their src rows unread. Valid ids must be unique (a plan's).
    `impl`: "triton" (`sts::add_rows_triton`) or "cpp" (`sts::add_rows` on the CPU; on a GPU
    without Triton a masked fill and `index_put_`, which read the skipped rows too)."""
    if impl == "triton":
        torch.ops.sts.add_rows_triton(dst, ids, src)
    elif dst.device.type == "cpu":
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
    zero-filled or sparse gather gradient that autograd then adds to grad(x_pass) out of place
    (R rows read and written).

    Why the in-place add is safe: the caller feeds `x_pass` to nothing but an op whose backward
    allocates its input gradient (the skipper: `skip_residual(from_output=True)` on the cpp /
    triton backends), so grad(x_pass) is a fresh tensor that no one else holds. Under
    create_graph (double backward) the add is out of place and differentiable, so second
    derivatives stay exact; without a grad(x_pass) it starts from zeros."""

    @staticmethod
    def forward(ctx, x: Tensor, ids: Tensor, lead: int, slots: tuple[int, ...], impl: str):
        # x [*plan.shape, *feat]; ids [K] or [B * Kmax] flat row ids (-1: a padding slot)
        ctx.save_for_backward(ids)
        ctx.shape, ctx.lead, ctx.padded, ctx.impl = x.shape, lead, len(slots) == 2, impl
        ctx.set_materialize_grads(False)
        flat = x.reshape(math.prod(x.shape[:lead]), *x.shape[lead:])  # [R, *feat]
        rows = getattr(torch.ops.sts, _GATHER[impl])(flat, ids)  # [K or B * Kmax, *feat]
        return rows.view(*slots, *x.shape[lead:]), x.view_as(x)

    @staticmethod
    def backward(ctx, grad_rows: Tensor | None, grad_x: Tensor | None):
        (ids,) = ctx.saved_tensors
        if grad_rows is None:
            return grad_x, None, None, None, None
        feat = ctx.shape[ctx.lead :]
        src = grad_rows.reshape(ids.numel(), *feat)  # [K or B * Kmax, *feat]
        num_rows = math.prod(ctx.shape[: ctx.lead])
        if grad_x is None or torch.is_grad_enabled() or not grad_x.is_contiguous():
            # no fresh dense gradient to add into, or double backward: out of place, in
            # differentiable ops; padding slots (-1) add zeros (a fill, not a product: no NaN * 0)
            if ctx.padded:
                src = src.masked_fill((ids < 0).view(-1, *(1,) * len(feat)), 0)
            base = grad_rows.new_zeros(ctx.shape) if grad_x is None else grad_x
            grad_x = base.reshape(num_rows, *feat).index_put((ids,), src, accumulate=True)
            grad_x = grad_x.view(ctx.shape)
        else:
            add_rows_(grad_x.view(num_rows, *feat), ids, src, ctx.impl)
        return grad_x, None, None, None, None


def gather_rows_passthrough(x: Tensor, plan: RoutePlan, padded: bool = False):
    """`(gather_rows(x, plan, padded), x_pass)`: `x_pass` equals `x`, and the two come from one
    autograd node whose backward adds the rows' gradient into grad(x_pass) in place.

    Only for a caller whose `x_pass` feeds a single op that allocates its input gradient
    (`skip_residual(..., from_output=True)` on the cpp / triton backends): that gradient is
    then modified in place. Under torch.compile, on the reference backend and without grad it
    is `(gather_rows(x, plan, padded), x)`."""
    _checks.gather_rows(x, plan, padded)
    impl = select("gather_rows", x.device, ("cpp", "triton"))
    plain = not (x.requires_grad and torch.is_grad_enabled()) or impl == "reference"
    if plain or torch.compiler.is_compiling():
        return gather_rows(x, plan, padded), x
    ids = plan.padded_index.reshape(-1) if padded else plan.index  # [B * Kmax] or [K]
    slots = tuple(plan.padded_index.shape) if padded else (plan.num_active,)
    return _GatherPassthrough.apply(x, ids, len(plan.shape), slots, impl)


def gather_rows(
    x: Tensor, plan: RoutePlan, padded: bool = False, sparse_grad: bool = False
) -> Tensor:
    """The plan's active rows of `x`: `[K, ...]`, or `[B, Kmax, ...]` with `padded=True` (zeros
    past each sample's count). Differentiable in `x`; rows outside the plan get zero gradient.

    `sparse_grad=True` (packed only, like `nn.Embedding(sparse=True)`): the gradient of `x` is
    a sparse COO tensor of the K rows, for callers whose `x` also gets a dense gradient (the
    skipper: autograd then adds K rows into it). Ignored under torch.compile and on the
    reference backend."""
    _checks.gather_rows(x, plan, padded)
    if sparse_grad and padded:
        raise ValueError("sparse_grad=True needs the packed layout (padded=False)")
    impl = select("gather_rows", x.device, ("cpp", "triton"))
    if impl == "reference":
        return reference.gather_rows(x, plan, padded)
    feat = tuple(x.shape[len(plan.shape) :])
    flat = x.reshape(plan.num_rows, *feat)  # [R, ...]
    if sparse_grad and x.requires_grad and not torch.compiler.is_compiling():
        return _SparseGradGather.apply(x, plan.index, plan.shape, _GATHER[impl])
    rows = plan.padded_index.reshape(-1) if padded else plan.index  # [B * Kmax] or [K]
    out = getattr(torch.ops.sts, _GATHER[impl])(flat, rows)
    return out.view(*plan.padded_index.shape, *feat) if padded else out
