"""bipartite_merge / unmerge: ToMe bipartite soft matching with size-weighted averages.

The Triton path is six or seven kernels forward, one backward, and no host synchronisation
(STS_SPEC.md §1) once the tiled matcher is tuned: its first launch per (dtype, C, size class
of N) benchmarks its configs (host syncs; do it before capturing a CUDA graph):
  1. `sts::bipartite_match_triton`: `_sqnorm_kernel` reads the metric once for every token's fp32
     squared norm; then, by `match_path` (N and C):
     - "bmm" (N <= 1024, C >= 256): one `torch.bmm` of the raw source and destination
       tokens gives every dot product in fp32 (tensor cores with fp32 accumulation for
       fp16/bf16, IEEE fp32 for fp32: never TF32), and `_rowmax_kernel` scales them into
       cosines and keeps each row's leftmost maximum;
     - "tiled" (large N, small C, TF32 allowed, fp64): `_match_kernel` (autotuned) dots tiles
       of sources against tiles of destinations and keeps a running max/argmax, so the
       [|A|, |Bd|] score matrix never exists.
     Both score s = fp32(<m_a, m_j>) / (max(|m_a|, eps) * max(|m_j|, eps)) with the same norms
     and the same rounding (`_best_of_tile`); they differ only in the order a GEMM sums the
     dot products, which the contract leaves open. The tokens are not normalised before the
     GEMM: normalised fp16/bf16 tokens would carry 11/8-bit cosines, the raw ones give fp32
     dot products of exact products.
  2. `sts::merge_index_triton`: the `r` best sources by a stable descending rank (`_select_kernel`),
     then the output position of every token (`_index_kernel`);
  3. `sts::merge_wavg_triton`: a stable counting sort of the tokens by output row (`_csr_kernel`),
     then every output row is the size-weighted mean of its tokens in position order, a
     deterministic segmented reduction without atomics (`_segment_reduce_kernel`); its
     backward `sts::merge_wavg_backward_triton` is a gather with the weights (`_unmerge_rows_kernel`).
`sts::unmerge_triton` (the gather) and `sts::unmerge_backward_triton` (counting sort + segmented sum) are
adjoint. Counting sorts compare every pair of a sample's tokens: O(N^2) integer work that a
GPU does in microseconds at N = 576 and well under a millisecond at N = 9216.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks, reference
from .._backend import select, triton_interpreter
from .._triton import autotune, tl, triton
from .._types import MergeResult
from ._common import acc_dtype, check_values, on_input_device, register_adjoint_autograd, tile_shape


@triton.jit
def _sqnorm_kernel(
    M_ptr,  # [B, N, C] any strides: the metric
    SQ_ptr,  # [B, N] fp32 out
    N,
    C,
    stride_mb,
    stride_mn,
    stride_mc,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """sq[b, n] = sum_c M[b, n, c]^2 in fp32: every token's squared norm, the metric read once
    for both matchers."""
    pid = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    rows = M_ptr + b * stride_mb + n[:, None] * stride_mn  # [BLOCK_N, 1]
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # sum of squares over feature chunks
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)  # int64: c * stride may pass 2^31
        x = tl.load(
            rows + c[None, :] * stride_mc, mask=n_mask[:, None] & (c < C)[None, :], other=0.0
        )
        x = x.to(tl.float32)
        sq += tl.sum(x * x, axis=1)
    tl.store(SQ_ptr + b * N + n, sq, mask=n_mask)


@triton.jit
def _norm(sq, EPS: tl.constexpr):
    """(max(sqrt(sq), EPS), sq finite) of squared norms: F.normalize's divisor, and whether the
    row scores at all (false for NaN too)."""
    return tl.maximum(tl.sqrt_rn(sq), EPS), sq < float("inf")


@triton.jit
def _source_tile(SQ_ptr, NA, N, SRC0, EPS: tl.constexpr, BLOCK_A: tl.constexpr):
    """Program (pid_a, b)'s sources a (a mask), their norms (`_norm`), and an empty running
    best: -inf, destination 0."""
    b = tl.program_id(1).to(tl.int64)
    a = tl.program_id(0).to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    a_mask = a < NA
    a_norm, a_ok = _norm(tl.load(SQ_ptr + b * N + SRC0 + 2 * a, mask=a_mask, other=0.0), EPS)
    best = tl.full((BLOCK_A,), float("-inf"), dtype=tl.float32)
    return b, a, a_mask, a_norm, a_ok, best, tl.zeros((BLOCK_A,), dtype=tl.int64)


@triton.jit
def _store_best(BEST_ptr, DST_ptr, b, NA, a, a_mask, best, arg):
    """best[b, a], dst[b, a] = the running best and its destination."""
    tl.store(BEST_ptr + b * NA + a, best, mask=a_mask)
    tl.store(DST_ptr + b * NA + a, arg, mask=a_mask)


@triton.jit
def _best_of_tile(dot, a_norm, a_ok, SQ_DST_ptr, j0, j, j_mask, best, arg, EPS: tl.constexpr):
    """Fold a [BLOCK_A, BLOCK_B] tile of raw dot products with destinations j = j0 + [0,
    BLOCK_B) (squared norms at SQ_DST_ptr + 2j) into the running (best, arg): s = dot /
    (|m_a| |m_j|), 0 for a non-finite row; the tile's leftmost maximum replaces the running
    best only when strictly better."""
    b_norm, b_ok = _norm(tl.load(SQ_DST_ptr + 2 * j, mask=j_mask, other=0.0), EPS)
    score = tl.div_rn(dot, a_norm[:, None] * b_norm[None, :])
    score = tl.where(a_ok[:, None] & b_ok[None, :], score, 0.0)
    score = tl.where(j_mask[None, :], score, float("-inf"))
    tile_best, tile_arg = tl.max(
        score, axis=1, return_indices=True, return_indices_tie_break_left=True
    )
    better = tile_best > best
    return tl.where(better, tile_best, best), tl.where(better, j0 + tile_arg.to(tl.int64), arg)


# `_match_kernel`'s tiles by dot: tensor cores (fp16/bf16 on a GPU) or the IEEE fp32 FMA dot,
# whose operands and accumulator all live in registers: only smaller tiles compile without
# spills there (sm_80/sm_90, tests/budgets/test_aot_compile.py compiles every config). tl.dot needs
# every tile side >= 16.
_MATCH_CONFIGS = {
    True: [
        dict(BLOCK_A=64, BLOCK_B=64, BLOCK_C=32, num_warps=4),
        dict(BLOCK_A=64, BLOCK_B=64, BLOCK_C=64, num_warps=8),
        dict(BLOCK_A=64, BLOCK_B=128, BLOCK_C=32, num_warps=8),
        dict(BLOCK_A=128, BLOCK_B=64, BLOCK_C=32, num_warps=8),
    ],
    False: [
        dict(BLOCK_A=32, BLOCK_B=64, BLOCK_C=64, num_warps=8),
        dict(BLOCK_A=32, BLOCK_B=32, BLOCK_C=64, num_warps=4),
        dict(BLOCK_A=16, BLOCK_B=64, BLOCK_C=64, num_warps=4),
        dict(BLOCK_A=32, BLOCK_B=64, BLOCK_C=32, num_warps=8),
    ],
}


@autotune(
    key=["N_CLASS", "C"],
    configs=_MATCH_CONFIGS[True] + _MATCH_CONFIGS[False],
    interpreted=dict(BLOCK_A=64, BLOCK_B=128, BLOCK_C=128, num_warps=4),
    keep=lambda config, LOWP_DOT, **_: config in _MATCH_CONFIGS[LOWP_DOT],
)
@triton.jit
def _match_kernel(
    M_ptr,  # [B, N, C] any strides: the metric
    SQ_ptr,  # [B, N] fp32: squared norms (`_sqnorm_kernel`)
    BEST_ptr,  # [B, NA] fp32 out
    DST_ptr,  # [B, NA] int64 out
    NA,  # unprotected sources (even positions from SRC0)
    NB,  # unprotected destinations (odd positions from DST0)
    C,
    N,
    SRC0,
    DST0,
    stride_mb,
    stride_mn,
    stride_mc,
    N_CLASS,  # next power of two of N: the autotune key (not one tuning per N)
    EPS: tl.constexpr,
    LOWP_DOT: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """best[a] = max_j s[a, j], dst[a] = min{j : s[a, j] = best[a]} with

    s[a, j] = <m_a, m_j> / (max(|m_a|, EPS) * max(|m_j|, EPS)),  m_a = M[b, SRC0 + 2a],
    m_j = M[b, DST0 + 2j]: the cosine of F.normalize(eps=EPS), in fp32, and s[a, j] = 0 when
    |m_a|^2 or |m_j|^2 is not finite (NaN/Inf rows score like zero rows). Square root and
    division round to nearest (sqrt_rn/div_rn, not the GPU's approximations), so bitwise-equal
    rows give bitwise-equal scores; ties go to the lowest destination (`_best_of_tile`). The
    [NA, NB] scores never exist: dot products are accumulated tile by tile of destinations.
    """
    b, a, a_mask, a_norm, a_ok, best, arg = _source_tile(SQ_ptr, NA, N, SRC0, EPS, BLOCK_A)
    a_rows = M_ptr + b * stride_mb + (SRC0 + 2 * a)[:, None] * stride_mn  # [BLOCK_A, 1]
    for j0 in range(0, NB, BLOCK_B):
        j = j0 + tl.arange(0, BLOCK_B)
        j_mask = j < NB
        b_rows = M_ptr + b * stride_mb + (DST0 + 2 * j)[:, None] * stride_mn  # [BLOCK_B, 1]
        # raw dot products, accumulated over feature chunks
        dot = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_mask = (c < C)[None, :]
            xa = tl.load(a_rows + c[None, :] * stride_mc, mask=a_mask[:, None] & c_mask, other=0.0)
            xb = tl.load(b_rows + c[None, :] * stride_mc, mask=j_mask[:, None] & c_mask, other=0.0)
            if LOWP_DOT:
                # fp16/bf16 products are exact in fp32: tensor cores, fp32 accumulation
                dot += tl.dot(xa, tl.trans(xb), out_dtype=tl.float32)
            else:
                dot += tl.dot(
                    xa.to(tl.float32), tl.trans(xb.to(tl.float32)), input_precision="ieee"
                )
        sq_dst = SQ_ptr + b * N + DST0
        best, arg = _best_of_tile(dot, a_norm, a_ok, sq_dst, j0, j, j_mask, best, arg, EPS)
    _store_best(BEST_ptr, DST_ptr, b, NA, a, a_mask, best, arg)


@triton.jit
def _rowmax_kernel(
    DOT_ptr,  # [B, NA, NB] fp32 contiguous: raw dot products (a bmm's output)
    SQ_ptr,  # [B, N] fp32: squared norms (`_sqnorm_kernel`)
    BEST_ptr,  # [B, NA] fp32 out
    DST_ptr,  # [B, NA] int64 out
    NA,
    NB,
    N,
    SRC0,
    DST0,
    EPS: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """best[a], dst[a] exactly as `_match_kernel` defines them, from precomputed dot products
    dot[b, a, j] = <m_a, m_j>: the same scores up to the order the dot products were summed."""
    b, a, a_mask, a_norm, a_ok, best, arg = _source_tile(SQ_ptr, NA, N, SRC0, EPS, BLOCK_A)
    # one pass over the score rows, a chunk of destinations at a time
    for j0 in range(0, NB, BLOCK_B):
        j = j0 + tl.arange(0, BLOCK_B)
        j_mask = j < NB
        dot_ptrs = DOT_ptr + (b * NA + a[:, None]) * NB + j[None, :]
        dot = tl.load(dot_ptrs, mask=a_mask[:, None] & j_mask[None, :], other=0.0)
        sq_dst = SQ_ptr + b * N + DST0
        best, arg = _best_of_tile(dot, a_norm, a_ok, sq_dst, j0, j, j_mask, best, arg, EPS)
    _store_best(BEST_ptr, DST_ptr, b, NA, a, a_mask, best, arg)


@triton.jit
def _select_kernel(
    BEST_ptr,  # [B, NA] fp32
    MERGED_ptr,  # [B, NA] int8 out
    NA,
    R,
    BLOCK_A: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """merged[a] = rank[a] < R, where rank[a] = #{k : best[k] > best[a]} + #{k < a : best[k] =
    best[a]} is a's place in a stable descending sort: the R best sources, ties to the lower
    position."""
    pid = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    a = pid * BLOCK_A + tl.arange(0, BLOCK_A)
    a_mask = a < NA
    best_a = tl.load(BEST_ptr + b * NA + a, mask=a_mask, other=0.0)
    # count the sources ranked ahead of each a, a chunk of the sample at a time
    rank = tl.zeros((BLOCK_A,), dtype=tl.int32)
    for k0 in range(0, NA, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < NA
        best_k = tl.load(BEST_ptr + b * NA + k, mask=k_mask, other=0.0)
        ahead = (best_k[None, :] > best_a[:, None]) | (
            (best_k[None, :] == best_a[:, None]) & (k[None, :] < a[:, None])
        )
        rank += tl.sum((ahead & k_mask[None, :]).to(tl.int32), axis=1)
    tl.store(MERGED_ptr + b * NA + a, (rank < R).to(tl.int8), mask=a_mask)


@triton.jit
def _index_kernel(
    MERGED_ptr,  # [B, NA] int8
    DST_ptr,  # [B, NA] int64: each source's destination j
    INDEX_ptr,  # [B, N] int64 out
    N,
    NA,
    PROTECTED,
    SRC0,
    DST0,
    FIRST_DST,  # output position of destination 0: PROTECTED + NA - R
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """index[n] = n for a protected token; FIRST_DST + j for destination j (n = DST0 + 2j);
    for source a (n = SRC0 + 2a): FIRST_DST + dst[a] if merged, else its place among the kept
    sources, PROTECTED + a - #{k < a : merged[k]}."""
    pid = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    is_src = (n >= SRC0) & ((n - SRC0) % 2 == 0)
    is_dst = (n >= DST0) & ((n - DST0) % 2 == 0)
    a = (n - SRC0) // 2
    src_mask = n_mask & is_src
    merged = tl.load(MERGED_ptr + b * NA + a, mask=src_mask, other=0)
    dst = tl.load(DST_ptr + b * NA + a, mask=src_mask, other=0)
    # merged sources before each source, a chunk of the sample at a time
    merged_before = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(0, NA, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        merged_k = tl.load(MERGED_ptr + b * NA + k, mask=k < NA, other=0).to(tl.int32)
        merged_before += tl.sum(tl.where(k[None, :] < a[:, None], merged_k[None, :], 0), axis=1)
    src_out = tl.where(merged != 0, FIRST_DST + dst, PROTECTED + a - merged_before)
    out = tl.where(is_src, src_out, tl.where(is_dst, FIRST_DST + (n - DST0) // 2, n))
    tl.store(INDEX_ptr + b * N + n, out.to(tl.int64), mask=n_mask)


@triton.jit
def _csr_kernel(
    INDEX_ptr,  # [B, N] int64 output row of every token
    PERM_ptr,  # [B, N] int32 out: the tokens sorted (stably) by output row
    OFFSETS_ptr,  # [B, NOUT + 1] int32 out: output row j owns PERM[offsets[j]:offsets[j + 1]]
    N,
    NOUT,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """A stable counting sort by output row, sample by sample:

    pos[n] = #{k : index[k] < index[n]} + #{k < n : index[k] = index[n]},  perm[pos[n]] = n,
    offsets[j] = #{k : index[k] < j} for j in [0, NOUT].
    Tokens whose index is outside [0, NOUT) fall outside every segment."""
    pid = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    e = pid * BLOCK + tl.arange(0, BLOCK)  # a token n and an output row j at once
    n_mask = e < N
    idx = tl.load(INDEX_ptr + b * N + e, mask=n_mask, other=0)
    pos = tl.zeros((BLOCK,), dtype=tl.int32)
    below = tl.zeros((BLOCK,), dtype=tl.int32)
    # compare with every token of the sample, a chunk at a time
    for k0 in range(0, N, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = (k < N)[None, :]
        idx_k = tl.load(INDEX_ptr + b * N + k, mask=k < N, other=0)[None, :]
        ahead = (idx_k < idx[:, None]) | ((idx_k == idx[:, None]) & (k[None, :] < e[:, None]))
        pos += tl.sum((ahead & k_mask).to(tl.int32), axis=1)
        below += tl.sum(((idx_k < e[:, None]) & k_mask).to(tl.int32), axis=1)
    tl.store(PERM_ptr + b * N + pos, e.to(tl.int32), mask=n_mask)
    tl.store(OFFSETS_ptr + b * (NOUT + 1) + e, below, mask=e <= NOUT)


@triton.jit
def _segment_reduce_kernel(
    X_ptr,  # [B, N, D] any strides
    W_ptr,  # [B, N] any float dtype (MEAN and HAS_W only)
    PERM_ptr,  # [B, N] int32: input rows sorted by the output row they go to
    OFFSETS_ptr,  # [B, NOUT + 1] int32: output row j owns PERM[offsets[j]:offsets[j+1]]
    Y_ptr,  # [B, NOUT, D] contiguous
    DEN_ptr,  # [B, NOUT] (MEAN only)
    N,
    NOUT,
    D,
    stride_xb,
    stride_xn,
    stride_xd,
    stride_wb,
    stride_wn,
    MEAN: tl.constexpr,
    HAS_W: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """MEAN:  y[j] = sum_{n in S_j} w[n] x[n] / den[j],  den[j] = sum_{n in S_j} w[n]
              (w = 1 without HAS_W; a one-token segment copies its token exactly);
    else:  y[j] = sum_{n in S_j} x[n]  (0 for an empty segment).
    Members are added in position order, in ACC_DTYPE."""
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
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=ACC_DTYPE)
    den = tl.zeros((BLOCK_P,), dtype=ACC_DTYPE)
    x0 = acc
    # the members, up to the longest segment of the tile; x0 keeps the first one
    for k in range(0, tl.max(length, axis=0)):
        active = (k < length) & j_mask
        n = tl.load(PERM_ptr + b * N + start + k, mask=active, other=0).to(tl.int64)
        xv = tl.load(
            x_base + n[:, None] * stride_xn, mask=active[:, None] & d_mask[None, :], other=0.0
        )
        xv = xv.to(ACC_DTYPE)
        x0 = tl.where((k == 0) & active[:, None], xv, x0)
        if MEAN:
            if HAS_W:
                wv = tl.load(W_ptr + b * stride_wb + n * stride_wn, mask=active, other=0.0)
                wv = wv.to(ACC_DTYPE)
            else:
                wv = active.to(ACC_DTYPE)
            den += wv
            acc += xv * wv[:, None]
        else:
            acc += xv
    if MEAN:
        # empty segments only occur in padding lanes here: divide them by 1, not 0
        den_safe = tl.where(length > 0, den, 1.0)
        acc = tl.where((length == 1)[:, None], x0, acc / den_safe[:, None])
        tl.store(
            DEN_ptr + b * NOUT + j, den.to(DEN_ptr.dtype.element_ty), mask=j_mask & (pid_d == 0)
        )
    y_ptrs = Y_ptr + (b * NOUT + j[:, None]) * D + d[None, :]
    tl.store(y_ptrs, acc.to(Y_ptr.dtype.element_ty), mask=j_mask[:, None] & d_mask[None, :])


@triton.jit
def _unmerge_rows_kernel(
    Y_ptr,  # [B, NOUT, D] any strides
    INDEX_ptr,  # [B, N] int64, valid in [0, NOUT)
    W_ptr,  # [B, N] any float dtype (WEIGHTED and HAS_W only)
    DEN_ptr,  # [B, NOUT] (WEIGHTED only)
    OUT_ptr,  # [B, N, D] contiguous
    N,
    NOUT,
    D,
    stride_yb,
    stride_yn,
    stride_yd,
    stride_wb,
    stride_wn,
    WEIGHTED: tl.constexpr,
    HAS_W: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[n] = y[index[n]] * (w[n] / den[index[n]] if WEIGHTED else 1), and NaN for an index
    outside [0, NOUT): never read out of bounds, never a silent zero row."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n_mask = n < N
    mask = n_mask[:, None] & (d < D)[None, :]
    idx = tl.load(INDEX_ptr + b * N + n, mask=n_mask, other=0)
    valid = n_mask & (idx >= 0) & (idx < NOUT)
    y_ptrs = Y_ptr + b * stride_yb + idx[:, None] * stride_yn + d[None, :] * stride_yd
    out = tl.load(y_ptrs, mask=mask & valid[:, None], other=0.0).to(ACC_DTYPE)
    if WEIGHTED:
        if HAS_W:
            w = tl.load(W_ptr + b * stride_wb + n * stride_wn, mask=valid, other=0.0)
            w = w.to(ACC_DTYPE)
        else:
            w = tl.full((BLOCK_N,), 1.0, dtype=ACC_DTYPE)
        den = tl.load(DEN_ptr + b * NOUT + idx, mask=valid, other=1.0).to(ACC_DTYPE)
        out = out * (w / den)[:, None]
    out = tl.where(valid[:, None], out, float("nan"))
    tl.store(
        OUT_ptr + (b * N + n[:, None]) * D + d[None, :], out.to(OUT_ptr.dtype.element_ty), mask=mask
    )


# D is tiled across programs; capping it at 512 leaves a 4K-element GPU tile >= 8 rows tall
_MAX_BLOCK_D = 512
# the matching's row passes (norms, score rows) loop over 128-wide chunks: 32-row GPU tiles
_MAX_BLOCK_C = 128
# counting kernels: elements per program and per compared chunk (the interpreter wants few,
# big programs; a GPU a [64, 64] compare tile over 8 warps: 16 lanes a thread, no spills)
_COUNT_BLOCK, _COUNT_BLOCK_K = (1024, 1024) if triton_interpreter() else (64, 64)
_COUNT_WARPS = 8


def _count_blocks(n: int) -> tuple[int, int]:
    """(BLOCK, BLOCK_K) of a counting kernel over `n` elements."""
    block = max(16, min(triton.next_power_of_2(max(n, 1)), _COUNT_BLOCK))
    return block, max(16, min(triton.next_power_of_2(max(n, 1)), _COUNT_BLOCK_K))


def _split(n: int, protected: int) -> tuple[int, int, int, int]:
    """(first source, first destination, |A|, |Bd|) of the unprotected tokens."""
    src0 = protected + protected % 2
    dst0 = protected + 1 - protected % 2
    return src0, dst0, (n - src0 + 1) // 2, (n - dst0 + 1) // 2


def _den_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sizes accumulate like the values: fp64 for fp64 tokens, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weight_args(weight: Tensor | None) -> tuple:
    """(W, stride_wb, stride_wn) of an optional [B, N] weight: no copy, no default tensor."""
    return (weight, *weight.stride()) if weight is not None else (None, 0, 0)


def _launch_csr(index: Tensor, n_out: int) -> tuple[Tensor, Tensor]:
    """Launch `_csr_kernel`: (perm [B, N] int32, offsets [B, n_out + 1] int32)."""
    b, n = index.shape
    index = index.contiguous()  # kernels address [B, N] rows as b * N + n
    perm = torch.empty(b, n, dtype=torch.int32, device=index.device)
    offsets = torch.empty(b, n_out + 1, dtype=torch.int32, device=index.device)
    block, block_k = _count_blocks(n)
    _csr_kernel[(triton.cdiv(max(n, n_out + 1), block), b)](
        index, perm, offsets, n, n_out, BLOCK=block, BLOCK_K=block_k, num_warps=_COUNT_WARPS
    )
    return perm, offsets


def _launch_segment_reduce(
    x: Tensor, index: Tensor, n_out: int, weight: Tensor | None, mean: bool
) -> tuple[Tensor, Tensor | None]:
    """Launch `_csr_kernel` and `_segment_reduce_kernel`; returns (y, den), den (in the
    accumulation dtype) None unless `mean`."""
    b, n, d = x.shape
    y = torch.empty(b, n_out, d, dtype=x.dtype, device=x.device)
    den = torch.empty(b, n_out, dtype=_den_dtype(x.dtype), device=x.device) if mean else None
    if b * n_out == 0:
        return y, den
    perm, offsets = _launch_csr(index, n_out)
    w, stride_wb, stride_wn = _weight_args(weight)
    block_p, block_d, num_warps = tile_shape(n_out, d, _MAX_BLOCK_D)
    grid = (triton.cdiv(n_out, block_p), triton.cdiv(max(d, 1), block_d), b)
    _segment_reduce_kernel[grid](
        x, w, perm, offsets, y, den, n, n_out, d, *x.stride(), stride_wb, stride_wn,
        MEAN=mean, HAS_W=weight is not None, ACC_DTYPE=acc_dtype(x.dtype), BLOCK_P=block_p,
        BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return y, den


def _launch_unmerge_rows(
    y: Tensor, index: Tensor, weight: Tensor | None, den: Tensor | None
) -> Tensor:
    """Launch `_unmerge_rows_kernel`: [B, NOUT, D] -> [B, N, D], weighted when `den` is given."""
    b, n_out, d = y.shape
    n = index.shape[1]
    out = torch.empty(b, n, d, dtype=y.dtype, device=y.device)
    if out.numel() == 0:
        return out
    index = index.contiguous()  # e.g. the expanded arange of a merge that merged nothing
    den = den.contiguous() if den is not None else None
    w, stride_wb, stride_wn = _weight_args(weight)
    block_n, block_d, num_warps = tile_shape(n, d, _MAX_BLOCK_D)
    grid = (triton.cdiv(n, block_n), triton.cdiv(d, block_d), b)
    _unmerge_rows_kernel[grid](
        y, index, w, den, out, n, n_out, d, *y.stride(), stride_wb, stride_wn,
        WEIGHTED=den is not None, HAS_W=weight is not None, ACC_DTYPE=acc_dtype(y.dtype),
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return out


# ---- sts::bipartite_match_triton --------------------------------------------------------------


# The bmm matcher's bounds: a cost model, not a measurement (no GPU here; bench/vtc.py labels
# its rows with the matcher that ran, to confirm or move them). Against the tiled kernel the
# bmm path trades a faster GEMM (cuBLAS) for writing and re-reading its fp32 scores, 8 B per
# score against the score's 2C FLOP. That pays while the scores stay on chip: N <= 1024
# keeps them at <= 1 MiB a sample (0.33 MB at LLaVA-1.5's N = 576), a batch of 32 within an
# H100's 50 MB L2 (beyond, they grow as N^2 and the tiled kernel never stores them); and
# while the GEMM outweighs their traffic: C >= 256, 64 FLOP per score byte.
_BMM_MAX_N = 1024
_BMM_MIN_C = 256


def match_path(n: int, c: int, dtype: torch.dtype, device: torch.device) -> str:
    """ "bmm" or "tiled": the matcher `sts::bipartite_match_triton` runs for a [B, n, c] metric.

    The bmm path only where its GEMM computes the dot products the tiled kernel would: fp32
    when fp32 matmuls are IEEE (not TF32: `torch.backends.cuda.matmul.allow_tf32`, or a CPU
    precision below "highest"); fp16/bf16 where the GEMM can write fp32 (a CUDA torch.bmm
    with `out_dtype`, torch >= 2.8; elsewhere from fp32 copies), fp16 unless cuBLAS may
    accumulate in fp16 (`allow_fp16_accumulation`). fp64 metrics are scored in fp32 by the
    tiled kernel."""
    if n > _BMM_MAX_N or c < _BMM_MIN_C:
        return "tiled"
    if dtype == torch.float32:
        exact = _fp32_matmul_is_ieee(device)
    elif dtype in (torch.float16, torch.bfloat16):
        exact = "dtype" in torch.ops.aten.bmm.overloads() or device.type != "cuda"
        if dtype == torch.float16:
            exact &= not getattr(torch.backends.cuda.matmul, "allow_fp16_accumulation", False)
    else:
        exact = False
    return "bmm" if exact else "tiled"


def _fp32_matmul_is_ieee(device: torch.device) -> bool:
    """Whether an fp32 matmul on `device` is IEEE fp32 (not TF32 / bf16). torch >= 2.9 keeps
    the setting per backend in `fp32_precision` (once it is set that way, reading the legacy
    `allow_tf32` / `get_float32_matmul_precision()` raises); older torch has only the legacy
    flags. A state that cannot be read counts as not IEEE: the tiled kernel is exact anyway."""
    backend = torch.backends.cuda.matmul if device.type == "cuda" else torch.backends.mkldnn.matmul
    try:
        precision = getattr(backend, "fp32_precision", None)
        if precision is not None:
            return precision in ("ieee", "none")
        if device.type == "cuda":
            return not torch.backends.cuda.matmul.allow_tf32
        return torch.get_float32_matmul_precision() == "highest"
    except RuntimeError:
        return False


def _dots(a: Tensor, b: Tensor) -> Tensor:
    """[B, NA, C] x [B, NB, C] -> [B, NA, NB] fp32 dot products: an IEEE fp32 GEMM for fp32,
    tensor cores with fp32 accumulation and output for fp16/bf16 (whose products are exact
    in fp32)."""
    if a.dtype == torch.float32:
        return torch.bmm(a, b.transpose(1, 2))
    if a.device.type == "cuda":
        return torch.bmm(a, b.transpose(1, 2), out_dtype=torch.float32)
    # no fp16/bf16 -> fp32 bmm off CUDA (the interpreter's CPU tensors): the same exact products
    return torch.bmm(a.float(), b.float().transpose(1, 2))


def _launch_sqnorm(metric: Tensor) -> Tensor:
    """Launch `_sqnorm_kernel`: [B, N, C] -> [B, N] fp32 squared norms."""
    b, n, c = metric.shape
    sq = torch.empty(b, n, dtype=torch.float32, device=metric.device)
    block_n, block_c, num_warps = tile_shape(n, c, _MAX_BLOCK_C)
    _sqnorm_kernel[(triton.cdiv(n, block_n), b)](
        metric, sq, n, c, *metric.stride(), BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps
    )
    return sq


@torch.library.custom_op("sts::bipartite_match_triton", mutates_args=())
@on_input_device
def _bipartite_match_triton(metric: Tensor, protected: int) -> tuple[Tensor, Tensor]:
    b, n, c = metric.shape
    src0, dst0, na, nb = _split(n, protected)
    best = torch.empty(b, na, dtype=torch.float32, device=metric.device)
    dst = torch.empty(b, na, dtype=torch.int64, device=metric.device)
    if b * na == 0:
        return best, dst
    if n * c >= 2**31:
        raise ValueError(
            f"sts::bipartite_match_triton: a sample of {n} x {c} is past 2^31 elements"
        )
    if (n - 1) * metric.stride(1) + (c - 1) * metric.stride(2) >= 2**31:
        # `_match_kernel` offsets within a sample in int32 (int64 tiles spill on sm_80): a
        # layout whose rows lie further apart (e.g. a permuted [N, B, C]) is packed first
        metric = metric.contiguous()
    sq = _launch_sqnorm(metric)
    if match_path(n, c, metric.dtype, metric.device) == "bmm":
        dots = _dots(metric[:, src0::2], metric[:, dst0::2])  # [B, NA, NB] fp32
        block_a, block_b, num_warps = tile_shape(na, nb, _MAX_BLOCK_C)
        _rowmax_kernel[(triton.cdiv(na, block_a), b)](
            dots, sq, best, dst, na, nb, n, src0, dst0,
            EPS=1e-12, BLOCK_A=block_a, BLOCK_B=block_b, num_warps=num_warps,
        )  # fmt: skip
        return best, dst
    # tensor cores for fp16/bf16 on a GPU; fp32 (and the interpreter) take the IEEE FMA dot
    lowp_dot = not triton_interpreter() and metric.dtype in (torch.float16, torch.bfloat16)
    _match_kernel[lambda meta: (triton.cdiv(na, meta["BLOCK_A"]), b)](
        metric, sq, best, dst, na, nb, c, n, src0, dst0, *metric.stride(),
        triton.next_power_of_2(n), EPS=1e-12, LOWP_DOT=lowp_dot,
    )  # fmt: skip
    return best, dst


@_bipartite_match_triton.register_fake
def _(metric: Tensor, protected: int) -> tuple[Tensor, Tensor]:
    b, n, _ = metric.shape
    na = _split(n, protected)[2]
    return (
        metric.new_empty(b, na, dtype=torch.float32),
        metric.new_empty(b, na, dtype=torch.int64),
    )


# ---- sts::merge_index_triton ----------------------------------------------------------------------


@torch.library.custom_op("sts::merge_index_triton", mutates_args=())
@on_input_device
def _merge_index_triton(best: Tensor, dst: Tensor, n: int, protected: int, r: int) -> Tensor:
    b, na = best.shape
    src0, dst0, _, _ = _split(n, protected)
    index = torch.empty(b, n, dtype=torch.int64, device=best.device)
    if b * n == 0:
        return index
    best, dst = best.contiguous(), dst.contiguous()
    merged = torch.empty(b, na, dtype=torch.int8, device=best.device)
    block, block_k = _count_blocks(na)
    _select_kernel[(triton.cdiv(na, block), b)](
        best, merged, na, r, BLOCK_A=block, BLOCK_K=block_k, num_warps=_COUNT_WARPS
    )
    block_n = _count_blocks(n)[0]
    _index_kernel[(triton.cdiv(n, block_n), b)](
        merged, dst, index, n, na, protected, src0, dst0, protected + na - r,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=_COUNT_WARPS,
    )  # fmt: skip
    return index


@_merge_index_triton.register_fake
def _(best: Tensor, dst: Tensor, n: int, protected: int, r: int) -> Tensor:
    return best.new_empty(best.shape[0], n, dtype=torch.int64)


# ---- sts::merge_wavg_triton and its backward ----------------------------------------------------


@torch.library.custom_op("sts::merge_wavg_triton", mutates_args=())
@on_input_device
def _merge_wavg_triton(
    x: Tensor, weight: Tensor | None, index: Tensor, n_out: int
) -> tuple[Tensor, Tensor]:
    return _launch_segment_reduce(x, index, n_out, weight, mean=True)


@_merge_wavg_triton.register_fake
def _(x: Tensor, weight: Tensor | None, index: Tensor, n_out: int) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape[0], n_out, x.shape[2]), x.new_empty(
        x.shape[0], n_out, dtype=_den_dtype(x.dtype)
    )


@torch.library.custom_op("sts::merge_wavg_backward_triton", mutates_args=())
@on_input_device
def _merge_wavg_backward_triton(
    grad: Tensor, weight: Tensor | None, index: Tensor, den: Tensor
) -> Tensor:
    return _launch_unmerge_rows(grad, index, weight, den)


@_merge_wavg_backward_triton.register_fake
def _(grad: Tensor, weight: Tensor | None, index: Tensor, den: Tensor) -> Tensor:
    return grad.new_empty(grad.shape[0], index.shape[1], grad.shape[2])


def _merge_wavg_setup(ctx, inputs, output) -> None:
    _, weight, index, _ = inputs
    ctx.save_for_backward(weight, index, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for den


def _merge_wavg_grad(ctx, grad_y: Tensor | None, _grad_den: Tensor | None):
    weight, index, den = ctx.saved_tensors
    if grad_y is None:
        return None, None, None, None
    return _merge_wavg_backward_triton(grad_y, weight, index, den), None, None, None


def _merge_wavg_backward_setup(ctx, inputs, output) -> None:
    _, weight, index, den = inputs
    ctx.save_for_backward(weight, index)
    ctx.n_out = den.shape[1]


def _merge_wavg_backward_grad(ctx, grad_dx: Tensor):
    # the forward is linear in x (y = A x, the backward is A^T g), so the backward's own
    # gradient is A again: double backward is exact
    weight, index = ctx.saved_tensors
    return _merge_wavg_triton(grad_dx, weight, index, ctx.n_out)[0], None, None, None


_merge_wavg_triton.register_autograd(_merge_wavg_grad, setup_context=_merge_wavg_setup)
_merge_wavg_backward_triton.register_autograd(
    _merge_wavg_backward_grad, setup_context=_merge_wavg_backward_setup
)


# ---- sts::unmerge_triton and its backward (adjoint of each other) -------------------------------


@torch.library.custom_op("sts::unmerge_triton", mutates_args=())
@on_input_device
def _unmerge_triton(y: Tensor, index: Tensor) -> Tensor:
    return _launch_unmerge_rows(y, index, None, None)


@_unmerge_triton.register_fake
def _(y: Tensor, index: Tensor) -> Tensor:
    return y.new_empty(y.shape[0], index.shape[1], y.shape[2])


@torch.library.custom_op("sts::unmerge_backward_triton", mutates_args=())
@on_input_device
def _unmerge_backward_triton(grad: Tensor, index: Tensor, n_out: int) -> Tensor:
    return _launch_segment_reduce(grad, index, n_out, None, mean=False)[0]


@_unmerge_backward_triton.register_fake
def _(grad: Tensor, index: Tensor, n_out: int) -> Tensor:
    return grad.new_empty(grad.shape[0], n_out, grad.shape[2])


register_adjoint_autograd("sts::unmerge_triton", "sts::unmerge_backward_triton", row_dim=1)


# ---- public API ---------------------------------------------------------------------------


def _check_size_values(size: Tensor | None) -> None:
    """`size` must be positive (a zero gives 0/0 rows). Checked where it costs no device sync
    (CPU tensors; CUDA with STS_DEBUG=1)."""
    if size is not None and check_values(size) and not bool((size > 0).all()):
        bad = size[~(size > 0)]
        raise ValueError(
            f"size must be positive (> 0, not NaN) everywhere, got {bad.numel()} entries like "
            f"{bad[0].item()} (size: {tuple(size.shape)})"
        )


def _check_index_values(index: Tensor, n_out: int) -> None:
    """`index` must lie in [0, n_out). Checked where it costs no device sync (CPU tensors;
    CUDA with STS_DEBUG=1); elsewhere the Triton gather writes NaN rows for bad entries."""
    if check_values(index) and index.numel() and not bool(((index >= 0) & (index < n_out)).all()):
        lo, hi = int(index.min()), int(index.max())
        raise ValueError(
            f"index must lie in [0, {n_out}) (y has {n_out} rows), got values in [{lo}, {hi}]"
        )


def bipartite_merge(
    x: Tensor,
    r: int,
    metric: Tensor | None = None,
    size: Tensor | None = None,
    protected: int = 0,
) -> MergeResult:
    """Merge the `r` most redundant tokens of each sample (STS_SPEC.md §1)."""
    _checks.bipartite_merge(x, r, metric, size, protected)
    _check_size_values(size)
    # fp64 stays exact: the Triton path accumulates weights and values in fp64 for fp64 x
    if select("bipartite_merge", x.device) != "triton":
        return reference.bipartite_merge(x, r, metric, size, protected)
    b, n, _ = x.shape
    r = min(r, (n - protected) // 2)
    if r <= 0:  # nothing moves (as the reference: sizes come back detached)
        size = (
            torch.ones(b, n, dtype=torch.float32, device=x.device)
            if size is None
            else size.detach()
        )
        return MergeResult(x, size, torch.arange(n, device=x.device).expand(b, n))
    # the matching gets no gradient: metric (x by default) only chooses the pairs
    best, dst = _bipartite_match_triton((x if metric is None else metric).detach(), protected)
    index = _merge_index_triton(best, dst, n, protected, r)
    weight = None if size is None else size.detach()
    y, den = _merge_wavg_triton(x, weight, index, n - r)
    size_dtype = torch.float32 if size is None else size.dtype
    return MergeResult(y, den if den.dtype == size_dtype else den.to(size_dtype), index)


def unmerge(y: Tensor, index: Tensor) -> Tensor:
    """`[B, N_out, D]` -> `[B, N, D]`: each original token gets its merged token's value."""
    _checks.unmerge(y, index)
    _check_index_values(index, y.shape[1])
    if select("unmerge", y.device) == "triton":
        return _unmerge_triton(y, index)
    return reference.unmerge(y, index)
