"""bipartite_merge / unmerge: ToMe bipartite soft matching with size-weighted averages.

The Triton path has three steps (STS_SPEC.md §1):
  1. `sts::bipartite_match`: one fused kernel normalises, dots and keeps a running max/argmax
     over tiles of destinations, so the [|A|, |Bd|] score matrix never exists (O(B*N) memory);
  2. top-r selection and the output index of every token, a few small torch ops on [B, N];
  3. `sts::merge_wavg`: every output token is the size-weighted mean of the input tokens that
     went into it, a deterministic segmented reduction over the tokens sorted by output row
     (no atomics); its backward `sts::merge_wavg_backward` is a gather with the weights.
`sts::unmerge` (a gather) and `sts::unmerge_backward` (the segmented sum) are adjoint.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks, reference
from .._backend import select, triton_interpreter
from .._triton import tl, triton
from .._types import MergeResult
from ._common import acc_dtype, register_adjoint_autograd, tile_shape


@triton.jit
def _match_kernel(
    M_ptr,  # [B, N, C] any strides: the metric
    BEST_ptr,  # [B, NA] fp32
    DST_ptr,  # [B, NA] int64
    NA,  # unprotected sources (even positions from SRC0)
    NB,  # unprotected destinations (odd positions from DST0)
    C,
    SRC0,
    DST0,
    stride_mb,
    stride_mn,
    stride_mc,
    EPS: tl.constexpr,
    LOWP_DOT: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """best[a] = max_j s[a, j], dst[a] = min{j : s[a, j] = best[a]} with

    s[a, j] = <m_a, m_j> / (max(|m_a|, EPS) * max(|m_j|, EPS)),  m_a = M[b, SRC0 + 2a],
    m_j = M[b, DST0 + 2j]: the cosine of F.normalize(eps=EPS), in fp32. Destinations are
    visited in tiles; a tile replaces the running best only when strictly better, so ties go
    to the lowest destination.
    """
    pid_a = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    a_mask = a < NA
    a_rows = M_ptr + b * stride_mb + (SRC0 + 2 * a)[:, None] * stride_mn  # [BLOCK_A, 1]
    # squared norms of this tile's sources
    a_sq = tl.zeros((BLOCK_A,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        xa = tl.load(
            a_rows + c[None, :] * stride_mc, mask=a_mask[:, None] & (c < C)[None, :], other=0.0
        )
        xa = xa.to(tl.float32)
        a_sq += tl.sum(xa * xa, axis=1)
    a_norm = tl.maximum(tl.sqrt(a_sq), EPS)
    best = tl.full((BLOCK_A,), float("-inf"), dtype=tl.float32)
    arg = tl.zeros((BLOCK_A,), dtype=tl.int64)
    for j0 in range(0, NB, BLOCK_B):
        j = j0 + tl.arange(0, BLOCK_B)
        j_mask = j < NB
        b_rows = M_ptr + b * stride_mb + (DST0 + 2 * j)[:, None] * stride_mn  # [BLOCK_B, 1]
        # raw dot products and destination norms, accumulated over feature chunks
        dot = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
        b_sq = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_mask = (c < C)[None, :]
            xa = tl.load(a_rows + c[None, :] * stride_mc, mask=a_mask[:, None] & c_mask, other=0.0)
            xb = tl.load(b_rows + c[None, :] * stride_mc, mask=j_mask[:, None] & c_mask, other=0.0)
            xb32 = xb.to(tl.float32)
            b_sq += tl.sum(xb32 * xb32, axis=1)
            if LOWP_DOT:
                # fp16/bf16 products are exact in fp32: tensor cores, fp32 accumulation
                dot += tl.dot(xa, tl.trans(xb), out_dtype=tl.float32)
            else:
                dot += tl.dot(xa.to(tl.float32), tl.trans(xb32), input_precision="ieee")
        b_norm = tl.maximum(tl.sqrt(b_sq), EPS)
        score = dot / (a_norm[:, None] * b_norm[None, :])
        score = tl.where(j_mask[None, :], score, float("-inf"))
        # best of the tile (lowest j on ties), merged into the running best
        tile_best = tl.max(score, axis=1)
        tile_arg = tl.min(tl.where(score == tile_best[:, None], j[None, :], NB), axis=1)
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        arg = tl.where(better, tile_arg, arg)
    tl.store(BEST_ptr + b * NA + a, best, mask=a_mask)
    tl.store(DST_ptr + b * NA + a, arg, mask=a_mask)


@triton.jit
def _segment_reduce_kernel(
    X_ptr,  # [B, N, D] any strides
    W_ptr,  # [B, N] fp32 weights (MEAN only)
    PERM_ptr,  # [B, N] int64: input rows sorted by the output row they go to
    OFFSETS_ptr,  # [B, NOUT + 1] int64: output row j owns PERM[offsets[j]:offsets[j+1]]
    Y_ptr,  # [B, NOUT, D] contiguous
    DEN_ptr,  # [B, NOUT] fp32 (MEAN only)
    N,
    NOUT,
    D,
    stride_xb,
    stride_xn,
    stride_xd,
    MEAN: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """MEAN:  y[j] = sum_{n in S_j} w[n] x[n] / den[j],  den[j] = sum_{n in S_j} w[n]
              (a one-token segment copies its token exactly);
    else:  y[j] = sum_{n in S_j} x[n]  (0 for an empty segment)."""
    pid_p = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    j = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    j_mask = j < NOUT
    d_mask = d < D
    start = tl.load(OFFSETS_ptr + b * (NOUT + 1) + j, mask=j_mask, other=0)
    length = tl.load(OFFSETS_ptr + b * (NOUT + 1) + j + 1, mask=j_mask, other=0) - start
    x_base = X_ptr + b * stride_xb + d[None, :] * stride_xd
    # first member of every segment, kept apart for the exact copy of one-token segments
    has = length > 0
    n0 = tl.load(PERM_ptr + b * N + start, mask=has, other=0)
    x0 = tl.load(x_base + n0[:, None] * stride_xn, mask=has[:, None] & d_mask[None, :], other=0.0)
    x0 = x0.to(ACC_DTYPE)
    if MEAN:
        w0 = tl.load(W_ptr + b * N + n0, mask=has, other=0.0)
        den = w0
        acc = x0 * w0.to(ACC_DTYPE)[:, None]
    else:
        acc = x0
    # the remaining members, up to the longest segment of the tile
    for k in range(1, tl.max(length, axis=0)):
        active = k < length
        n = tl.load(PERM_ptr + b * N + start + k, mask=active, other=0)
        xv = tl.load(
            x_base + n[:, None] * stride_xn, mask=active[:, None] & d_mask[None, :], other=0.0
        )
        xv = xv.to(ACC_DTYPE)
        if MEAN:
            wv = tl.load(W_ptr + b * N + n, mask=active, other=0.0)
            den += wv
            acc += xv * wv.to(ACC_DTYPE)[:, None]
        else:
            acc += xv
    if MEAN:
        # (empty segments only occur in padding lanes here: divide them by 1, not 0)
        den_safe = tl.where(length > 0, den, 1.0).to(ACC_DTYPE)
        acc = tl.where((length == 1)[:, None], x0, acc / den_safe[:, None])
        tl.store(DEN_ptr + b * NOUT + j, den, mask=j_mask & (pid_d == 0))
    y_ptrs = Y_ptr + (b * NOUT + j[:, None]) * D + d[None, :]
    tl.store(y_ptrs, acc.to(Y_ptr.dtype.element_ty), mask=j_mask[:, None] & d_mask[None, :])


@triton.jit
def _gather_rows_kernel(
    Y_ptr,  # [B, NOUT, D] any strides
    INDEX_ptr,  # [B, N] int64 in [0, NOUT)
    W_ptr,  # [B, N] fp32 (WEIGHTED only)
    DEN_ptr,  # [B, NOUT] fp32 (WEIGHTED only)
    OUT_ptr,  # [B, N, D] contiguous
    N,
    NOUT,
    D,
    stride_yb,
    stride_yn,
    stride_yd,
    WEIGHTED: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[n] = y[index[n]] * (w[n] / den[index[n]] if WEIGHTED else 1)."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n_mask = n < N
    mask = n_mask[:, None] & (d < D)[None, :]
    idx = tl.load(INDEX_ptr + b * N + n, mask=n_mask, other=0)
    # an index outside [0, NOUT) reads nothing (memory safety for hand-made indices)
    valid = n_mask & (idx >= 0) & (idx < NOUT)
    y_ptrs = Y_ptr + b * stride_yb + idx[:, None] * stride_yn + d[None, :] * stride_yd
    out = tl.load(y_ptrs, mask=mask & valid[:, None], other=0.0)
    if WEIGHTED:
        w = tl.load(W_ptr + b * N + n, mask=valid, other=0.0)
        den = tl.load(DEN_ptr + b * NOUT + idx, mask=valid, other=1.0)
        out = out.to(ACC_DTYPE) * (w / den).to(ACC_DTYPE)[:, None]
    tl.store(
        OUT_ptr + (b * N + n[:, None]) * D + d[None, :], out.to(OUT_ptr.dtype.element_ty), mask=mask
    )


# D is tiled across programs; capping it at 512 leaves a 4K-element GPU tile >= 8 rows tall
_MAX_BLOCK_D = 512


def _split(n: int, protected: int) -> tuple[int, int, int, int]:
    """(first source, first destination, |A|, |Bd|) of the unprotected tokens."""
    src0 = protected + protected % 2
    dst0 = protected + 1 - protected % 2
    return src0, dst0, (n - src0 + 1) // 2, (n - dst0 + 1) // 2


def _segments(index: Tensor, n_out: int) -> tuple[Tensor, Tensor]:
    """CSR of the inverse of `index`: (perm [B, N], offsets [B, n_out + 1]), the input rows
    sorted (stably) by output row and where each output row's run starts."""
    perm = torch.argsort(index, dim=1, stable=True)
    counts = torch.zeros(index.shape[0], n_out, dtype=torch.int64, device=index.device)
    counts.scatter_add_(1, index, torch.ones_like(index))
    offsets = torch.nn.functional.pad(counts.cumsum(1), (1, 0))
    return perm, offsets


def _segment_reduce(x: Tensor, index: Tensor, n_out: int, weight: Tensor | None):
    """Launch `_segment_reduce_kernel`; returns (y, den) with den None unless weighted."""
    b, n, d = x.shape
    y = torch.empty(b, n_out, d, dtype=x.dtype, device=x.device)
    den = (
        torch.empty(b, n_out, dtype=torch.float32, device=x.device) if weight is not None else None
    )
    if b * n_out == 0:
        return y, den
    perm, offsets = _segments(index.contiguous(), n_out)
    weight = weight.contiguous() if weight is not None else None
    block_p, block_d, num_warps = tile_shape(n_out, d, _MAX_BLOCK_D)
    grid = (triton.cdiv(n_out, block_p), triton.cdiv(max(d, 1), block_d), b)
    _segment_reduce_kernel[grid](
        x, weight, perm, offsets, y, den, n, n_out, d, *x.stride(),
        MEAN=weight is not None, ACC_DTYPE=acc_dtype(x.dtype), BLOCK_P=block_p, BLOCK_D=block_d,
        num_warps=num_warps,
    )  # fmt: skip
    return y, den


def _gather_rows(y: Tensor, index: Tensor, weight: Tensor | None, den: Tensor | None) -> Tensor:
    """Launch `_gather_rows_kernel`: [B, NOUT, D] -> [B, N, D]."""
    b, n_out, d = y.shape
    n = index.shape[1]
    out = torch.empty(b, n, d, dtype=y.dtype, device=y.device)
    if out.numel() == 0:
        return out
    index = index.contiguous()
    if weight is not None:
        weight, den = weight.contiguous(), den.contiguous()
    block_n, block_d, num_warps = tile_shape(n, d, _MAX_BLOCK_D)
    grid = (triton.cdiv(n, block_n), triton.cdiv(d, block_d), b)
    _gather_rows_kernel[grid](
        y, index, weight, den, out, n, n_out, d, *y.stride(),
        WEIGHTED=weight is not None, ACC_DTYPE=acc_dtype(y.dtype), BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps,
    )  # fmt: skip
    return out


# ---- sts::bipartite_match --------------------------------------------------------------


@torch.library.custom_op("sts::bipartite_match", mutates_args=())
def _bipartite_match_op(metric: Tensor, protected: int) -> tuple[Tensor, Tensor]:
    b, n, c = metric.shape
    src0, dst0, na, nb = _split(n, protected)
    best = torch.empty(b, na, dtype=torch.float32, device=metric.device)
    dst = torch.empty(b, na, dtype=torch.int64, device=metric.device)
    if b * na == 0:
        return best, dst
    interp = triton_interpreter()
    # tl.dot needs every tile side >= 16 on a GPU; 64x64 fp32 tiles fit 4 warps' registers
    block_a = max(16, min(triton.next_power_of_2(na), 64))
    block_b = max(16, min(triton.next_power_of_2(nb), 128 if interp else 64))
    block_c = max(16, min(triton.next_power_of_2(c), 128 if interp else 64))
    # the interpreter's fp16/bf16 tl.dot is unreliable: it takes the fp32 ("ieee") path
    lowp_dot = not interp and metric.dtype in (torch.float16, torch.bfloat16)
    _match_kernel[(triton.cdiv(na, block_a), b)](
        metric, best, dst, na, nb, c, src0, dst0, *metric.stride(),
        EPS=1e-12, LOWP_DOT=lowp_dot, BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_C=block_c,
    )  # fmt: skip
    return best, dst


@_bipartite_match_op.register_fake
def _(metric: Tensor, protected: int) -> tuple[Tensor, Tensor]:
    b, n, _ = metric.shape
    na = _split(n, protected)[2]
    return (
        metric.new_empty(b, na, dtype=torch.float32),
        metric.new_empty(b, na, dtype=torch.int64),
    )


# ---- sts::merge_wavg and its backward ----------------------------------------------------


@torch.library.custom_op("sts::merge_wavg", mutates_args=())
def _merge_wavg_op(x: Tensor, weight: Tensor, index: Tensor, n_out: int) -> tuple[Tensor, Tensor]:
    return _segment_reduce(x, index, n_out, weight)


@_merge_wavg_op.register_fake
def _(x: Tensor, weight: Tensor, index: Tensor, n_out: int) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape[0], n_out, x.shape[2]), weight.new_empty(x.shape[0], n_out)


@torch.library.custom_op("sts::merge_wavg_backward", mutates_args=())
def _merge_wavg_backward_op(grad: Tensor, weight: Tensor, index: Tensor, den: Tensor) -> Tensor:
    return _gather_rows(grad, index, weight, den)


@_merge_wavg_backward_op.register_fake
def _(grad: Tensor, weight: Tensor, index: Tensor, den: Tensor) -> Tensor:
    return grad.new_empty(grad.shape[0], index.shape[1], grad.shape[2])


def _merge_wavg_setup(ctx, inputs, output) -> None:
    _, weight, index, _ = inputs
    ctx.save_for_backward(weight, index, output[1])
    ctx.mark_non_differentiable(output[1])


def _merge_wavg_grad(ctx, grad_y: Tensor, _grad_den: Tensor | None):
    weight, index, den = ctx.saved_tensors
    return _merge_wavg_backward_op(grad_y, weight, index, den), None, None, None


_merge_wavg_op.register_autograd(_merge_wavg_grad, setup_context=_merge_wavg_setup)


# ---- sts::unmerge and its backward (adjoint of each other) -------------------------------


@torch.library.custom_op("sts::unmerge", mutates_args=())
def _unmerge_op(y: Tensor, index: Tensor) -> Tensor:
    return _gather_rows(y, index, None, None)


@_unmerge_op.register_fake
def _(y: Tensor, index: Tensor) -> Tensor:
    return y.new_empty(y.shape[0], index.shape[1], y.shape[2])


@torch.library.custom_op("sts::unmerge_backward", mutates_args=())
def _unmerge_backward_op(grad: Tensor, index: Tensor, n_out: int) -> Tensor:
    return _segment_reduce(grad, index, n_out, None)[0]


@_unmerge_backward_op.register_fake
def _(grad: Tensor, index: Tensor, n_out: int) -> Tensor:
    return grad.new_empty(grad.shape[0], n_out, grad.shape[2])


register_adjoint_autograd("sts::unmerge", "sts::unmerge_backward", row_dim=1)


# ---- public API ---------------------------------------------------------------------------


def _merge_index(best: Tensor, dst: Tensor, r: int, n: int, protected: int) -> Tensor:
    """[B, N] output position of every input token: protected tokens, then the kept sources
    in position order, then the destinations; a merged source goes to its destination."""
    b = best.shape[0]
    src0, dst0, na, nb = _split(n, protected)
    # the r best-scoring sources merge; a stable sort sends ties to the lower position
    merged = torch.sort(best, dim=-1, descending=True, stable=True).indices[:, :r]  # [B, r]
    is_merged = torch.zeros_like(best, dtype=torch.bool).scatter(1, merged, True)  # [B, |A|]
    first_dst = protected + na - r
    kept_rank = torch.cumsum(~is_merged, dim=1) - 1
    src_out = torch.where(is_merged, first_dst + dst, protected + kept_rank)  # [B, |A|]
    dev = best.device
    index = torch.empty(b, n, dtype=torch.int64, device=dev)
    index[:, :protected] = torch.arange(protected, device=dev)
    index[:, src0::2] = src_out
    index[:, dst0::2] = first_dst + torch.arange(nb, device=dev)
    return index


def bipartite_merge(
    x: Tensor,
    r: int,
    metric: Tensor | None = None,
    size: Tensor | None = None,
    protected: int = 0,
) -> MergeResult:
    """Merge the `r` most redundant tokens of each sample (STS_SPEC.md §1)."""
    _checks.bipartite_merge(x, r, metric, size, protected)
    if select("bipartite_merge", x.device, ("triton",)) != "triton":
        return reference.bipartite_merge(x, r, metric, size, protected)
    b, n, _ = x.shape
    if size is None:
        size = torch.ones(b, n, dtype=torch.float32, device=x.device)
    r = min(r, (n - protected) // 2)
    if r <= 0:
        return MergeResult(x, size, torch.arange(n, device=x.device).expand(b, n))
    # the matching gets no gradient: metric (x by default) only chooses the pairs
    best, dst = _bipartite_match_op((x if metric is None else metric).detach(), protected)
    index = _merge_index(best, dst, r, n, protected)
    y, den = _merge_wavg_op(x, size.detach().float(), index, n - r)
    return MergeResult(y, den.to(size.dtype), index)


def unmerge(y: Tensor, index: Tensor) -> Tensor:
    """`[B, N_out, D]` -> `[B, N, D]`: each original token gets its merged token's value."""
    _checks.unmerge(y, index)
    if select("unmerge", y.device, ("triton",)) == "triton":
        return _unmerge_op(y, index)
    return reference.unmerge(y, index)
