"""token_pool: mean over non-overlapping windows of the visual-token grid.

Triton kernels (forward and backward, one pass over their input each), registered as the
custom ops `sts::token_pool_triton` / `sts::token_pool_backward_triton` so `torch.compile` sees one opaque
node, and the public `token_pool` that validates and dispatches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks, reference
from .._backend import select
from .._triton import tl, triton
from ._common import acc_dtype, on_input_device, tile_shape


@triton.jit
def _token_pool_fwd_kernel(
    X_ptr,  # [B, H*W, D] any strides
    Y_ptr,  # [B, OH*OW, D] contiguous
    P,  # OH*OW output tokens per sample
    D,
    H,
    W,
    OW,
    stride_xb,
    stride_xn,
    stride_xd,
    KH: tl.constexpr,
    KW: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """y[b, p, :] = (1 / c_p) * sum_{(i, j) in window p, inside the grid} x[b, (oh*KH+i)*W + ow*KW+j, :]

    with p = oh*OW + ow and c_p = min(KH, H - oh*KH) * min(KW, W - ow*KW) the number of real
    tokens in the (possibly clipped) edge window. Each input token is read exactly once.
    """
    pid_p = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    # output tokens and features of this tile
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    p_mask = p < P
    d_mask = d < D
    h0 = (p // OW) * KH
    w0 = (p % OW) * KW
    x_base = X_ptr + b * stride_xb + d[None, :] * stride_xd
    # sum the window, skipping positions past the grid's bottom/right edge
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=ACC_DTYPE)
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            inside = p_mask & (h0 + i < H) & (w0 + j < W)
            n = (h0 + i) * W + (w0 + j)
            mask = inside[:, None] & d_mask[None, :]
            acc += tl.load(x_base + n[:, None] * stride_xn, mask=mask, other=0.0).to(ACC_DTYPE)
    # divide by the number of real tokens in each window
    count = tl.minimum(H - h0, KH) * tl.minimum(W - w0, KW)
    y = acc / tl.maximum(count, 1).to(ACC_DTYPE)[:, None]
    y_ptrs = Y_ptr + (b * P + p[:, None]) * D + d[None, :]
    tl.store(y_ptrs, y.to(Y_ptr.dtype.element_ty), mask=p_mask[:, None] & d_mask[None, :])


@triton.jit
def _token_pool_bwd_kernel(
    G_ptr,  # [B, OH*OW, D] any strides: gradient of the pooled tokens
    DX_ptr,  # [B, H*W, D] contiguous
    N,
    D,
    H,
    W,
    OW,
    stride_gb,
    stride_gp,
    stride_gd,
    KH: tl.constexpr,
    KW: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dx[b, n, :] = g[b, p(n), :] / c_{p(n)}, p(n) = (h // KH) * OW + w // KW for n = h*W + w."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    # input tokens and features of this tile
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (n < N)[:, None] & (d < D)[None, :]
    # the window each input token belongs to, and its number of real tokens
    h0 = (n // W) // KH * KH
    w0 = (n % W) // KW * KW
    p = (h0 // KH) * OW + w0 // KW
    count = tl.minimum(H - h0, KH) * tl.minimum(W - w0, KW)
    g_ptrs = G_ptr + b * stride_gb + p[:, None] * stride_gp + d[None, :] * stride_gd
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
    dx = g / tl.maximum(count, 1).to(ACC_DTYPE)[:, None]
    tl.store(
        DX_ptr + (b * N + n[:, None]) * D + d[None, :], dx.to(DX_ptr.dtype.element_ty), mask=mask
    )


# D is tiled across programs; capping it at 512 leaves a 4K-element GPU tile >= 8 tokens tall
_MAX_BLOCK_D = 512


def _check_geometry(h: int, w: int, kh: int, kw: int, n: int, p: int | None = None) -> None:
    """The raw ops' ints (the public op checks them first): a wrong grid would read or write
    past the tensors, a zero window divide by zero. `n` input tokens, `p` pooled ones."""
    bad = min(h, w) < 0 or min(kh, kw) < 1 or h * w != n
    if bad or (p is not None and -(-h // kh) * -(-w // kw) != p):
        raise ValueError(
            f"sts::token_pool_triton: grid ({h}, {w}) must hold the N={n} tokens and window "
            f"({kh}, {kw}) be positive and pool them into the P={p} outputs"
        )


@torch.library.custom_op("sts::token_pool_triton", mutates_args=())
@on_input_device
def _token_pool_triton(x: Tensor, h: int, w: int, kh: int, kw: int) -> Tensor:
    b, n, d = x.shape
    _check_geometry(h, w, kh, kw, n)
    ow = triton.cdiv(w, kw)
    p = triton.cdiv(h, kh) * ow
    y = torch.empty(b, p, d, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_p, block_d, num_warps = tile_shape(p, d, _MAX_BLOCK_D)
    grid = (triton.cdiv(p, block_p), triton.cdiv(d, block_d), b)
    _token_pool_fwd_kernel[grid](
        x, y, p, d, h, w, ow, *x.stride(),
        KH=kh, KW=kw, ACC_DTYPE=acc_dtype(x.dtype), BLOCK_P=block_p, BLOCK_D=block_d,
        num_warps=num_warps,
    )  # fmt: skip
    return y


@_token_pool_triton.register_fake
def _(x: Tensor, h: int, w: int, kh: int, kw: int) -> Tensor:
    p = triton.cdiv(h, kh) * triton.cdiv(w, kw)
    return x.new_empty(x.shape[0], p, x.shape[2])


@torch.library.custom_op("sts::token_pool_backward_triton", mutates_args=())
@on_input_device
def _token_pool_backward_triton(grad: Tensor, h: int, w: int, kh: int, kw: int) -> Tensor:
    b, _, d = grad.shape
    n = h * w
    _check_geometry(h, w, kh, kw, n, grad.shape[1])
    dx = torch.empty(b, n, d, dtype=grad.dtype, device=grad.device)
    if dx.numel() == 0:
        return dx
    block_n, block_d, num_warps = tile_shape(n, d, _MAX_BLOCK_D)
    grid = (triton.cdiv(n, block_n), triton.cdiv(d, block_d), b)
    _token_pool_bwd_kernel[grid](
        grad, dx, n, d, h, w, triton.cdiv(w, kw), *grad.stride(),
        KH=kh, KW=kw, ACC_DTYPE=acc_dtype(grad.dtype), BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps,
    )  # fmt: skip
    return dx


@_token_pool_backward_triton.register_fake
def _(grad: Tensor, h: int, w: int, kh: int, kw: int) -> Tensor:
    return grad.new_empty(grad.shape[0], h * w, grad.shape[2])


def _setup_context(ctx, inputs, output) -> None:
    _, ctx.h, ctx.w, ctx.kh, ctx.kw = inputs


def _token_pool_grad(ctx, grad: Tensor):
    return _token_pool_backward_triton(grad, ctx.h, ctx.w, ctx.kh, ctx.kw), None, None, None, None


def _token_pool_backward_grad(ctx, grad: Tensor):
    # the backward is the adjoint of the (linear) forward, so its own gradient is the forward
    return _token_pool_triton(grad, ctx.h, ctx.w, ctx.kh, ctx.kw), None, None, None, None


_token_pool_triton.register_autograd(_token_pool_grad, setup_context=_setup_context)
_token_pool_backward_triton.register_autograd(
    _token_pool_backward_grad, setup_context=_setup_context
)


def token_pool(x: Tensor, grid: tuple[int, int], window: tuple[int, int] | int = (2, 2)) -> Tensor:
    """`[B, H*W, D]` -> `[B, ceil(H/kh)*ceil(W/kw), D]` window means (STS_SPEC.md §1)."""
    h, w, kh, kw = _checks.token_pool(x, grid, window)
    # a window past the grid's edge pools the tokens inside it: clipped to the grid it gives
    # the same windows, and the kernel (unrolled over the window) stays H x W at most
    kh, kw = min(kh, h), min(kw, w)
    if select("token_pool", x.device) == "triton":
        return _token_pool_triton(x, h, w, kh, kw)
    return reference.token_pool(x, (h, w), (kh, kw))
