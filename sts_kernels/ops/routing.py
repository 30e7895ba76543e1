"""route / gather_rows: sparse routing of the rows that run a layer.

Backends (`_backend.TABLE`): "triton" (the default on GPUs: `sts::route_triton`, one launch
and one host read of (K, Kmax), and the row kernels `sts::gather_rows_triton`,
`sts::scatter_rows_triton`), "cpp" (the extension's `sts::route`, `sts::gather_rows`,
`sts::scatter_rows`: C++/OpenMP on the CPU, CUDA kernels in a CUDA build, where its gather
and scatter come before Triton's) and "reference". Gather and scatter copy whole rows as raw
words, so they work for every dtype; each is the other's backward. Their `rows` come in two
layouts, told apart by their shape:

- 1-D `[K]`, a plan's `index`: every id must name a row (-1 included, an id outside [0, R) is
  a malformed plan). The C++ ops raise (RuntimeError naming the op and the id, checked on the
  host before any copy); the Triton and CUDA kernels cannot raise without a host sync, so the
  gather writes a poison row (NaN for floating dtypes, all bits set for integers, True for
  bool; never a silent zero row and never an out-of-bounds read) and the scatter writes
  nothing for such an id.
- 2-D `[B, Kmax]`, a plan's `padded_index`: -1 marks a padding slot, a zero row (gather) or
  nothing (scatter); any other id outside [0, R) is malformed, as above. The gather's output
  is `[B, Kmax, ...]` and the scatter's `src` must be.

Also here, for the skipper's gather backward (`ops.skip_glue`): the row add
`dst[ids[k]] += src[k]` as `sts::add_rows_triton` (the extension's `sts::add_rows` is CPU
only), touching only the rows of valid ids (the padded layout's -1 slots and any out-of-range
id are neither read nor written, on both backends).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .. import _checks, reference
from .._backend import extension, select
from .._triton import tl, triton
from .._types import RoutePlan
from ._common import acc_dtype, kernel, on_input_device, register_adjoint_autograd, tile_shape

# Words per row block: wide enough for 16-byte vector accesses of a long row, while leaving
# a 4K-word GPU tile >= 4 rows tall.
_MAX_BLOCK_COLS = 1024

# ---------------------------------------------------------------------------------------------
# Triton kernel


@triton.jit
def _copy_rows_kernel(
    SRC_ptr,  # [R_src, num_cols] integer words
    DST_ptr,  # [R_dst, num_cols] integer words
    ROWS_ptr,  # [num_ids] int64 row ids
    num_ids,
    num_rows,  # rows of the tensor the ids index (src for gather, dst for scatter)
    num_cols,
    stride_src_row,
    stride_dst_row,
    poison,  # gather: the word a malformed id's row is filled with (NaN bytes for floats)
    SCATTER: tl.constexpr,
    PADDED: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """Row copy through a list of row ids, on rows of `num_cols` words.

    gather:  dst[k, :] = src[rows[k], :]    scatter: dst[rows[k], :] = src[k, :]
    An id outside [0, num_rows) is never read through or written to. In the gather it gives a
    row of `poison` words, or with PADDED (the padded layout) a zero row for -1, its padding
    slots; in the scatter it writes nothing.
    """
    pid_ids = tl.program_id(0).to(tl.int64)
    pid_cols = tl.program_id(1).to(tl.int64)
    # this program's block of ids and the row each one names
    k = pid_ids * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    k_in = k < num_ids
    row = tl.load(ROWS_ptr + k, mask=k_in, other=-1)
    valid = (row >= 0) & (row < num_rows)
    # this program's block of words within a row
    cols = pid_cols * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    cols_in = (cols < num_cols)[None, :]
    has_row = valid[:, None] & cols_in
    if SCATTER:
        # packed row k lands on row `row`; other ids write nothing
        words = tl.load(SRC_ptr + k[:, None] * stride_src_row + cols[None, :], mask=has_row)
        tl.store(DST_ptr + row[:, None] * stride_dst_row + cols[None, :], words, mask=has_row)
    else:
        # row `row` lands on packed row k; a malformed id gives a poison row, a padding slot
        # (-1 in the padded layout) a zero row
        words = tl.load(
            SRC_ptr + row[:, None] * stride_src_row + cols[None, :], mask=has_row, other=0
        )
        bad = ~valid
        if PADDED:
            bad = bad & (row != -1)
        words = tl.where(bad[:, None], poison.to(words.dtype), words)
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


@triton.jit
def _route_kernel(
    MASK_ptr,  # [B, T] uint8, the bool mask's bytes
    INDEX_ptr,  # [R] int64: the K active flat row ids in its first K entries
    COUNTS_ptr,  # [B] int64
    OFFSETS_ptr,  # [B + 1] int64
    ROW_TO_K_ptr,  # [R] int64
    PADDED_ptr,  # [B * T] int64: the [B, Kmax] padded ids in its first B * Kmax entries
    SIZES_ptr,  # [1] int64: K * (T + 1) + Kmax
    num_samples,
    per_sample,
    stride_mask_b,
    stride_mask_t,
    BLOCK: tl.constexpr,
):
    """Stream compaction of a `[B, T]` mask (T = 1 for a `[B]` one) over its R = B * T rows:

    k(i)          = #{j < i : mask[j]}        row_to_k[i] = k(i) if mask[i] else -1
    index[k(i)]   = i (mask[i])               offsets[b] = k(b * T), offsets[B] = K
    counts[b]     = offsets[b + 1] - offsets[b]
    padded[b, j]  = index[offsets[b] + j] for j < counts[b], else -1     (Kmax = max counts)

    One program, so the whole route is one launch: three sweeps in blocks of BLOCK, over the
    rows (the running count carried across blocks, tl.cumsum within one), the samples (counts
    and Kmax) and the B * Kmax padded slots (whose layout needs Kmax). Each sweep reads what
    the previous one stored, hence the barriers. The host reads `sizes` = K * (T + 1) + Kmax
    (Kmax <= T) in one 8-byte copy to trim the outputs.
    """
    num_rows = num_samples * per_sample
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    # rows: k of every row (exclusive running count), index, row_to_k and each sample's offset
    active = tl.zeros([], dtype=tl.int64)
    for start in range(0, num_rows, BLOCK):
        rows = start + lanes  # [BLOCK]
        in_range = rows < num_rows
        sample = rows // per_sample
        t = rows - sample * per_sample
        flag = tl.load(
            MASK_ptr + sample * stride_mask_b + t * stride_mask_t, mask=in_range, other=0
        )
        flag = flag != 0
        inclusive = active + tl.cumsum(flag.to(tl.int32), axis=0).to(tl.int64)
        k = inclusive - flag.to(tl.int64)
        tl.store(ROW_TO_K_ptr + rows, tl.where(flag, k, -1), mask=in_range)
        tl.store(INDEX_ptr + k, rows, mask=flag)
        tl.store(OFFSETS_ptr + sample, k, mask=in_range & (t == 0))
        active = tl.max(inclusive, axis=0)  # non-decreasing: the last row's count
    tl.store(OFFSETS_ptr + num_samples, active)
    tl.debug_barrier()
    # samples: counts and the widest one, Kmax
    max_count = tl.zeros([], dtype=tl.int64)
    for start in range(0, num_samples, BLOCK):
        samples = start + lanes  # [BLOCK]
        in_range = samples < num_samples
        first = tl.load(OFFSETS_ptr + samples, mask=in_range, other=0)
        count = tl.load(OFFSETS_ptr + samples + 1, mask=in_range, other=0) - first
        tl.store(COUNTS_ptr + samples, count, mask=in_range)
        max_count = tl.maximum(max_count, tl.max(count, axis=0))
    tl.store(SIZES_ptr, active * (per_sample + 1) + max_count)
    tl.debug_barrier()
    # padded slots (b, j): sample b's j-th active row, -1 past its count
    for start in range(0, num_samples * max_count, BLOCK):
        slots = start + lanes  # [BLOCK]
        in_range = slots < num_samples * max_count
        sample = slots // max_count
        j = slots - sample * max_count
        first = tl.load(OFFSETS_ptr + sample, mask=in_range, other=0)
        valid = in_range & (j < tl.load(COUNTS_ptr + sample, mask=in_range, other=0))
        row = tl.load(INDEX_ptr + first + j, mask=valid, other=-1)
        tl.store(PADDED_ptr + slots, row, mask=in_range)


_WORDS = (torch.int64, torch.int32, torch.int16, torch.uint8)


def _word_dtype(row_bytes: int, *tensors: Tensor) -> torch.dtype:
    """The widest integer word that divides a row and every tensor's start address, so each
    row starts word-aligned (a view may start at any element)."""
    return next(
        w
        for w in _WORDS
        if row_bytes % w.itemsize == 0 and all(t.data_ptr() % w.itemsize == 0 for t in tensors)
    )


def _row_tiles(num_ids: int, num_cols: int) -> tuple[tuple[int, int], dict]:
    """Grid (id blocks, column blocks) and tile meta-parameters of a row kernel."""
    block_rows, block_cols, num_warps = tile_shape(num_ids, num_cols, _MAX_BLOCK_COLS)
    grid = (triton.cdiv(num_ids, block_rows), triton.cdiv(num_cols, block_cols))
    return grid, dict(BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=num_warps)


@functools.cache
def _poison_byte(dtype: torch.dtype) -> int:
    """The byte that fills a gathered row whose id is malformed: all bits set, a NaN in every
    floating dtype of 2 or more bytes (complex ones too), -1 in signed integers, the maximum
    in unsigned ones; a float8 dtype's own NaN byte; 1 (True) for bool. The same byte for every
    byte of a row, so a word of any width holds the same pattern wherever it starts and the
    row copy keeps its wide words (as the CUDA kernel's `poison_byte`)."""
    if dtype == torch.bool:
        return 1
    if dtype.is_floating_point and dtype.itemsize == 1:
        return int(torch.tensor(float("nan")).to(dtype).view(torch.uint8).item())
    return 0xFF


def _launch_copy_rows(
    src: Tensor, dst: Tensor, rows: Tensor, scatter: bool, padded: bool = False
) -> None:
    """Gather (`dst[k] = src[rows[k]]`) or scatter (`dst[rows[k]] = src[k]`) whole rows of the
    contiguous `src` and `dst` through the 1-D `rows`; `padded`: -1 is a padding slot (a zero
    row in the gather), not a malformed id (a poison row)."""
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
    # the poison word as an int the kernel truncates to the word: at least 2 bytes of the
    # pattern, so it is never 1 (bool's byte), which Triton would turn into a constant
    poison = bytes([_poison_byte(src.dtype)]) * max(word.itemsize, 2)
    num_cols = src_words.shape[1]
    grid, tiles = _row_tiles(rows.numel(), num_cols)
    _copy_rows_kernel[grid](
        src_words,
        dst_words,
        rows,
        rows.numel(),
        dst_words.shape[0] if scatter else src_words.shape[0],
        num_cols,
        src_words.stride(0),
        dst_words.stride(0),
        int.from_bytes(poison, "little", signed=True),
        SCATTER=scatter,
        PADDED=padded,
        **tiles,
    )


def _launch_add_rows(dst: Tensor, ids: Tensor, src: Tensor) -> None:
    """`dst[ids[k]] += src[k]` for the contiguous `dst` `[R, ...]` and `src` `[len(ids), ...]`."""
    num_cols = math.prod(dst.shape[1:])
    if ids.numel() == 0 or num_cols == 0 or dst.shape[0] == 0:
        return
    grid, tiles = _row_tiles(ids.numel(), num_cols)
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
        **tiles,
    )


def _launch_route(mask: Tensor, outputs: tuple[Tensor, ...]) -> None:
    """The route kernel over the `[B, T]` bool `mask` into (index, counts, offsets, row_to_k,
    padded, sizes), allocated at their upper bounds."""
    _, block, _ = tile_shape(1, max(mask.numel(), mask.shape[0]))
    _route_kernel[(1,)](
        mask.view(torch.uint8),
        *outputs,
        mask.shape[0],
        mask.shape[1],
        mask.stride(0),
        mask.stride(1),
        BLOCK=block,
        # 8 rows per thread: 16 (a 4K block on 8 warps) took all 255 registers on sm_90
        num_warps=min(max(block // 256, 1), 16),
    )


# ---------------------------------------------------------------------------------------------
# torch.library registration


def _check_rows(op: str, data: Tensor, rows: Tensor, layouts: tuple[int, ...] = (1, 2)) -> None:
    """The C++ ops' argument checks, for their Triton twins, which are callable directly as
    `torch.ops.sts.*`: rows of another shape or dtype would make the kernel read or write past
    its tensors (out-of-range ids are safe: the kernel never reads or writes through them).
    `layouts`: the dims rows may have, 1 (ids) and 2 (the padded layout) for gather/scatter."""
    if data.dim() < 1:
        raise ValueError(f"{op}: the row tensor needs at least 1 dim, got a 0-dim tensor")
    if rows.dim() not in layouts or rows.dtype != torch.int64:
        padded = " or a 2-D one (the padded layout [B, Kmax], -1 = padding)" if 2 in layouts else ""
        raise ValueError(
            f"{op}: rows must be a 1-D int64 tensor of row ids{padded}, got {rows.dtype} of "
            f"shape {tuple(rows.shape)}"
        )
    if rows.device != data.device:
        raise ValueError(f"{op}: rows is on {rows.device} but the data is on {data.device}")


@torch.library.custom_op("sts::gather_rows_triton", mutates_args=())
@on_input_device
def _gather_rows_triton(x: Tensor, rows: Tensor) -> Tensor:
    """Triton twin of `sts::gather_rows`: `out[k] = x[rows[k]]`, `[*rows.shape, *x.shape[1:]]`.
    1-D rows: an id outside [0, len(x)) gives a poison row (NaN for floats); 2-D rows (the
    padded layout): -1 gives a zero row, any other such id a poison row."""
    _check_rows("sts::gather_rows_triton", x, rows)
    src = x.contiguous()
    ids = rows.contiguous().view(-1)  # [K] or [B * Kmax]
    out = src.new_empty((ids.shape[0], *src.shape[1:]))
    padded = rows.dim() == 2
    if src.shape[0] == 0 and out.numel() > 0:
        # no rows to read: every id is malformed (poison) or a padding slot (zeros)
        out.view(-1).view(torch.uint8).fill_(_poison_byte(src.dtype))
        if padded:
            out[ids == -1] = 0
    else:
        _launch_copy_rows(src, out, ids, scatter=False, padded=padded)
    return out.view(*rows.shape, *src.shape[1:])


@torch.library.custom_op("sts::scatter_rows_triton", mutates_args=())
@on_input_device
def _scatter_rows_triton(src: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """Triton twin of `sts::scatter_rows`: zeros `[num_rows, *src.shape[rows.dim():]]` with
    `out[rows[k]] = src[k]`; ids outside [0, num_rows) (the padded layout's -1 too) write
    nothing. `src` is `[*rows.shape, ...]`."""
    op = "sts::scatter_rows_triton"
    _check_rows(op, src, rows)
    if tuple(src.shape[: rows.dim()]) != tuple(rows.shape):
        raise ValueError(
            f"{op}: src must start with rows' shape {tuple(rows.shape)}, got {tuple(src.shape)}"
        )
    if num_rows < 0:
        raise ValueError(f"{op}: num_rows must be >= 0, got {num_rows}")
    feat = src.shape[rows.dim() :]
    packed = src.contiguous().view(rows.numel(), *feat)
    out = packed.new_zeros((num_rows, *feat))
    _launch_copy_rows(packed, out, rows.contiguous().view(-1), scatter=True)
    return out


def _check_add_rows(dst: Tensor, ids: Tensor, src: Tensor) -> None:
    """The checks of the C++ `sts::add_rows`, for its Triton twin: everything the kernel
    relies on to stay inside dst and src (out-of-range ids are safe: it skips them)."""
    op = "sts::add_rows_triton"
    _check_rows(op, src, ids, layouts=(1,))
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
@on_input_device
def _add_rows_triton(dst: Tensor, ids: Tensor, src: Tensor) -> None:
    """Triton twin of `sts::add_rows`: `dst[ids[k]] += src[k]` in place, ids outside
    [0, len(dst)) skipped (their src rows unread). Valid ids must be unique."""
    _check_add_rows(dst, ids, src)
    _launch_add_rows(dst, ids.contiguous(), src.contiguous())


def _add_rows_fake(dst: Tensor, ids: Tensor, src: Tensor) -> None:
    """Fake kernel of `sts::add_rows` and `sts::add_rows_triton` (in place: no outputs). They
    have no autograd: they run inside a backward, on gradients."""
    return None


torch.library.register_fake("sts::add_rows_triton")(_add_rows_fake)


def _route_fake(mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fake kernel of `sts::route` and `sts::route_triton`: K and Kmax come from the data."""
    ctx = torch.library.get_ctx()
    active, max_count = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    b = mask.shape[0]
    return (
        mask.new_empty((active,), dtype=torch.int64),
        mask.new_empty((b,), dtype=torch.int64),
        mask.new_empty((b + 1,), dtype=torch.int64),
        mask.new_empty((mask.numel(),), dtype=torch.int64),
        mask.new_empty((b, max_count), dtype=torch.int64),
    )


@torch.library.custom_op("sts::route_triton", mutates_args=())
@on_input_device
def _route_triton(mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton twin of `sts::route`: (index [K], counts [B], offsets [B + 1], row_to_k [R],
    padded_index [B, Kmax]) in one launch and one host read of (K, Kmax)."""
    if mask.dtype != torch.bool or mask.dim() not in (1, 2):
        raise ValueError(
            f"sts::route_triton: mask must be a bool [B] or [B, T] tensor, got {mask.dtype} "
            f"of shape {tuple(mask.shape)}"
        )
    mask_2d = mask.view(mask.shape[0], 1) if mask.dim() == 1 else mask  # [B, T]
    (b, per_sample), rows = mask_2d.shape, mask_2d.numel()
    # the kernel counts rows in int32 (sizes = K * (T + 1) + Kmax is int64)
    if rows >= 2**31 - 4096:
        raise ValueError(
            f"sts::route_triton: mask of shape {tuple(mask.shape)} has {rows} rows, at most "
            f"{2**31 - 4097} are supported"
        )
    new = lambda *shape: torch.empty(shape, dtype=torch.int64, device=mask.device)
    if rows == 0:  # no rows: nothing to compact
        return new(0), new(b).zero_(), new(b + 1).zero_(), new(0), new(b, 0)
    # index and padded at their upper bounds (R and B * T), trimmed after the one host read
    index, counts, offsets, row_to_k, padded, sizes = (
        new(rows), new(b), new(b + 1), new(rows), new(rows), new(1),
    )  # fmt: skip
    _launch_route(mask_2d, (index, counts, offsets, row_to_k, padded, sizes))
    active, max_count = divmod(int(sizes.item()), per_sample + 1)  # the host read (a sync)
    return index[:active], counts, offsets, row_to_k, padded[: b * max_count].view(b, max_count)


torch.library.register_fake("sts::route_triton")(_route_fake)


def _register(gather: str, scatter: str) -> None:
    """Fake (meta) kernels and autograd for a gather/scatter pair over dim 0 (rows 1-D, or
    2-D in the padded layout: the gather's output and the scatter's src `[*rows.shape, ...]`)."""

    @torch.library.register_fake(gather)
    def _gather_fake(x: Tensor, rows: Tensor) -> Tensor:
        return x.new_empty((*rows.shape, *x.shape[1:]))

    @torch.library.register_fake(scatter)
    def _scatter_fake(src: Tensor, rows: Tensor, num_rows: int) -> Tensor:
        return src.new_empty((num_rows, *src.shape[rows.dim() :]))

    register_adjoint_autograd(gather, scatter, row_dim=0)


_register("sts::gather_rows_triton", "sts::scatter_rows_triton")
if extension() is not None:  # importing the extension defined the C++ ops
    _register("sts::gather_rows", "sts::scatter_rows")

    torch.library.register_fake("sts::route")(_route_fake)
    torch.library.register_fake("sts::add_rows")(_add_rows_fake)


# ---------------------------------------------------------------------------------------------
# Public API


def route(mask: Tensor) -> RoutePlan:
    """Compact a bool mask (`[B]` samples or `[B, T]` tokens) into a `RoutePlan`: on a GPU
    the Triton route (one launch, one host read of K and Kmax) or, without Triton, the CUDA
    extension's; on the CPU the C++ op (no host read)."""
    _checks.mask(mask)
    impl = select("route", mask.device)
    if impl == "reference":
        return reference.route(mask)
    index, counts, offsets, row_to_k, padded_index = kernel("route", impl)(mask)
    return RoutePlan(index, counts, offsets, tuple(mask.shape), row_to_k, padded_index)


def gather_rows(x: Tensor, plan: RoutePlan, padded: bool = False) -> Tensor:
    """The plan's active rows of `x`: `[K, ...]`, or `[B, Kmax, ...]` with `padded=True` (zeros
    past each sample's count). Differentiable in `x`; rows outside the plan get zero gradient.
    (The skipper gathers with `ops.skip_glue.gather_for_layer`.)"""
    _checks.gather_rows(x, plan, padded)
    impl = select("gather_rows", x.device)
    if impl == "reference":
        return reference.gather_rows(x, plan, padded)
    feat = tuple(x.shape[len(plan.shape) :])
    flat = x.reshape(plan.num_rows, *feat)  # [R, ...]
    # [B, Kmax] (the padded layout: -1 marks padding) or [K] (every id a row)
    rows = plan.padded_index if padded else plan.index
    return kernel("gather_rows", impl)(flat, rows)
