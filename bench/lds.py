"""Layer Dynamic Skipper benchmarks (suite of `python -m bench.ops --only lds`).

1. `skip_residual` (sts-<backend>: the package's backend for the device, e.g. sts-cpp on the
   CPU, sts-triton on a GPU) against eager PyTorch
   (`x.clone().index_add_(0, index, gate * delta)`) and that eager code under torch.compile,
   forward and forward+backward, half the tokens active. GB/s counts the bytes the fused
   kernels must move: forward reads x and delta and writes out, (2R + K) F elements; backward
   reads grad_out and delta rows and writes grad_delta, 3 K F (grad_x is grad_out itself).
   Where the op has `from_output`, also its output form ("-y": the layer's output y).
2. `skip_layer`: the skipper's own work per skipped layer (route, gather_rows, skip_residual and
   the glue between them) around an identity layer, sample and token mode, forward+backward
   time, and the bytes its ops move against the ideal model
   `ideal_bytes` below (printed as `bytes/ideal`): bytes moved =
   every output an op writes plus every input it reads in full (an upper bound), except row
   gathers and adds, which read only the rows they write (`add_rows`, `gather_rows`: only
   the ids >= 0), and skip_residual, which reads its update at the K active slots.
3. A Llama-style decoder stack (RMSNorm, causal MHA via sdpa, SwiGLU MLP) under the skipper in
   sample mode at 0/25/50/75 % skipped samples (router policy with capacity 1 - rate: exact
   counts), forward+backward time (and peak memory on a GPU), against the plain stack.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench.ops import Case, autograd_cases
from sts_kernels import route, skip_residual
from sts_kernels._backend import select
from sts_kernels.nn import LayerDynamicSkipper

SKIP_RATES = (0.0, 0.25, 0.5, 0.75)


def ideal_bytes(
    num_rows: int, num_active: int, row_bytes: int, backward: bool = True, gate_grad: bool = False
) -> int:
    """Least memory traffic (bytes) of the skipper's glue around one skipped layer, the layer's
    own work excluded: route K of R rows of `row_bytes` into the layer (`gather_rows`) and
    combine its output `y` back (`skip_residual(from_output=True)`). The one byte model:
    `_layer_cases` below prints bytes moved / this, and tests/budgets/test_lds_bytes.py bounds that ratio.

    forward   gather: read K rows of x, write K rows                          2K
              combine: read R (x) + K (y), write R (out)                       2R + K
    backward  before the layer's backward: read the K active rows of
              grad_out, write K (grad_y = g * grad_out)                        2K
              after it: read R (grad_out) + K (the layer's gradient of its
              input), write R (grad_x)                                         2R + K
              (+ 2K: the x and y rows, read for the gate's gradient)
    so 2R + 3K rows each way. The backward cannot be one pass: grad_y is the layer backward's
    input and grad_x needs that backward's result. Plan metadata (mask, ids, offsets: a few
    bytes per row) is not counted.

    What the package moves (`BytesMoved`, no gate gradient). Sample mode: the forward
    is ideal; the backward writes grad_x and grad_y in one pass over R (read R, write R + K)
    and adds the layer's gradient into grad_x in place (`add_rows`: read 2K, write K), 2R + 4K:
    4R + 7K forward+backward, 1.07x at K = R/2. Token mode's padded layout has S = B * Kmax >= K
    slots, and the padding is written twice, as zeros: by the gather (the layer must see finite
    rows) and in grad_y (padding must not feed the layer's parameter gradients): 4R + 5K + 2S,
    ~1.09x at K = R/2 with S ~ 1.06 K (B = 8, T = 512).
    """
    rows = 2 * num_rows + 3 * num_active
    if backward:
        rows += 2 * num_rows + 3 * num_active + (2 * num_active if gate_grad else 0)
    return rows * row_bytes


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class DecoderLayer(nn.Module):
    """Pre-norm Llama block: y = h + MLP(norm(h)), h = x + Attn(norm(x)); returns y."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = RMSNorm(dim), RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, -1).unbind(2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )  # [B, H, T, Dh]
        h = x + self.out(attn.transpose(1, 2).reshape(b, t, d))
        gate, up = self.gate_up(self.mlp_norm(h)).chunk(2, dim=-1)
        return h + self.down(F.silu(gate) * up)


def _shape(device: torch.device, quick: bool) -> tuple[int, int, int, torch.dtype]:
    """(B, T, D, dtype) of the decoder rows: B * T = 32k rows of 4096 on a GPU."""
    if device.type == "cuda" and not quick:
        return 8, 4096, 4096, torch.bfloat16
    return 8, 512, 256, torch.float32


def _eager(x, delta, gate, index):
    # [R, F] rows: the clone-then-scatter formulation the fused kernel avoids
    rows = x.reshape(-1, x.shape[-1])
    return rows.clone().index_add_(0, index, delta * gate[:, None].to(delta.dtype))


def _skip_inputs(b, t, d, k, dtype, device):
    make = lambda *s: torch.randn(s, device=device, dtype=dtype, requires_grad=True)
    return make(b, t, d), make(k, d), torch.rand(k, device=device, requires_grad=True)


def _op_cases(device, quick, compile_baseline) -> Iterator[Case]:
    b, t, d, dtype = _shape(device, quick)
    plan = route(torch.rand(b, t, device=device) < 0.5)
    k, rows = plan.num_active, plan.num_rows
    elt = dtype.itemsize
    fwd_bytes, bwd_bytes = (2 * rows + k) * d * elt, 3 * k * d * elt
    impls = {
        f"sts-{select('skip_residual', device)}": lambda x, delta, g: skip_residual(
            x, delta, plan, g
        ),
        "eager": partial(_eager, index=plan.index),
    }
    if compile_baseline:
        impls["compile"] = impls["eager"]
    shape = f"R={rows} K={k} D={d} {str(dtype).removeprefix('torch.')}"
    inputs = partial(_skip_inputs, b, t, d, k, dtype, device)
    reps = 5 if quick else 20
    yield from autograd_cases(
        "skip_residual",
        shape,
        impls,
        inputs,
        {"fwd": fwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes},
        reps=reps,
    )
    if "from_output" in inspect.signature(skip_residual).parameters:
        # the output form (the layer's output y instead of y - x): its backward walks the R
        # rows (grad_x = grad_out, scaled by 1 - gate on the active rows) and reads x, y rows
        # for the gate: 2R + 3K rows
        output_form = lambda x, y, g: skip_residual(x, y, plan, g, from_output=True)
        yield from autograd_cases(
            "skip_residual",
            shape,
            {f"sts-{select('skip_residual', device)}-y": output_form},
            inputs,
            {"fwd": fwd_bytes, "fwd+bwd": fwd_bytes + (2 * rows + 3 * k) * d * elt},
            reps=reps,
        )


# ---- the skipper's work per skipped layer ---------------------------------------------------


_GATHERS = ("index_select", "index.Tensor")  # read only the rows they write
_ROW_GATHERS = "gather_rows"  # sts::gather_rows(_triton): -1 ids write a zero row, read none
_ROW_ADDS = ("index_add_", "index_put_")  # in place: read and write only the rows they add
_ADD_ROWS = "add_rows"  # sts::add_rows(_triton): also skips the ids outside dst, rows unread


def _nbytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches in `t`."""
    return t.nbytes


def _read_args(schema, args: tuple, kwargs: dict | None) -> list:
    """The arguments an op reads: all of them, except skip_residual's (forward and backward):
    its kernels read the `update` only at the K active slots (not a padded layout's padding),
    and the backward reads the layer input `x` and the `update` only to form the gate's
    gradient (under NEED_GRAD_GATE), then at the K active rows."""
    named = dict(zip((a.name for a in schema.arguments), args)) | (kwargs or {})
    if "update" not in named:
        return list(named.values())
    if named.get("need_grad_gate") is False:
        return [v for name, v in named.items() if name not in ("x", "update")]
    active = named["index"].numel()
    named["update"] = named["update"].flatten(0, -2)[:active]  # [K, F] of the slots
    if "grad_out" in named and named.get("x") is not None:
        named["x"] = named["x"][:active]  # the backward's gate gradient reads K rows of x
    return list(named.values())


class BytesMoved(TorchDispatchMode):
    """Sums the bytes every kernel-launching op reads and writes (views and allocations
    move nothing)."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        aliases = bool(schema.returns) and all(
            r.alias_info is not None and not r.alias_info.is_write for r in schema.returns
        )
        if aliases or schema.name.split("::")[1].startswith(("empty", "detach", "lift")):
            return out
        outputs = sum(_nbytes(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        inputs = [t for t in tree_leaves(_read_args(schema, args, kwargs)) if torch.is_tensor(t)]
        if _ADD_ROWS in str(func):  # dst[ids] += src on the ids in range: 3x those rows, ids
            dst, ids, src = inputs
            valid = int(((ids >= 0) & (ids < dst.shape[0])).sum())
            self.nbytes += 3 * valid * _nbytes(src) // max(len(src), 1) + _nbytes(ids)
        elif any(name in str(func) for name in _ROW_ADDS):  # self[ids] += src: 3x src, ids
            added = inputs[1:]
            self.nbytes += sum(_nbytes(t) * (1 if t.dtype == torch.int64 else 3) for t in added)
        elif _ROW_GATHERS in str(func):  # out[k] = x[ids[k]]: reads the rows of ids >= 0
            x, ids = inputs
            rows_read = int(((ids >= 0) & (ids < x.shape[0])).sum())
            self.nbytes += outputs + rows_read * outputs // max(ids.numel(), 1) + _nbytes(ids)
        elif any(name in str(func) for name in _GATHERS):
            self.nbytes += 2 * outputs + sum(_nbytes(t) for t in inputs if t.dtype == torch.int64)
        else:
            self.nbytes += outputs + sum(_nbytes(t) for t in inputs)
        return out


def _skipper(mode: str, d: int, device, dtype) -> LayerDynamicSkipper:
    # one eligible identity layer: everything that runs is the skipper's own work
    skipper = LayerDynamicSkipper(
        nn.ModuleList([nn.Identity()]),
        d,
        mode=mode,
        policy="schedule",
        p_max=0.5,
        keep_first_last=False,
        seed=0,
    )
    return skipper.to(device, dtype).train()


def _layer_setup(mode, b, t, d, dtype, device):
    skipper = _skipper(mode, d, device, dtype)
    x = torch.randn(b, t, d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    fwd_bwd = lambda: torch.autograd.grad(skipper(x), x, grad)
    rows = b if mode == "sample" else b * t
    row_bytes = d * dtype.itemsize * (t if mode == "sample" else 1)
    info = {}
    for name, call, backward in (("fwd", lambda: skipper(x), False), ("fwd+bwd", fwd_bwd, True)):
        with BytesMoved() as moved:
            call()
        kept = skipper.report.rows_run[0]  # K of this pass (the draws are random)
        ideal = ideal_bytes(rows, kept, row_bytes, backward)
        info[f"bytes_ratio_{name}"] = moved.nbytes / ideal
    info["note"] = " ".join(f"bytes/ideal {k[12:]} {v:.2f}" for k, v in info.items())
    return fwd_bwd, info


def _layer_cases(device, quick) -> Iterator[Case]:
    b, t, d, dtype = _shape(device, quick)
    for mode in ("sample", "token"):
        rows = b if mode == "sample" else b * t
        yield Case(
            "skip_layer",
            f"{mode} R={rows} T={t} D={d} {str(dtype).removeprefix('torch.')}",
            "sts",
            "fwd+bwd",
            partial(_layer_setup, mode, b, t, d, dtype, device),
            reps=5 if quick else 20,
        )


# ---- a decoder stack under the skipper -----------------------------------------------------


def _stack_setup(rate, device, quick):
    gpu = device.type == "cuda"
    batch, seq, dim, heads, hidden, depth = (
        (16, 1024, 2048, 16, 5632, 4) if gpu and not quick else (8, 64, 128, 4, 344, 4)
    )
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.manual_seed(0)
    layers = nn.ModuleList(DecoderLayer(dim, heads, hidden) for _ in range(depth))
    layers = layers.to(device, dtype).train()
    x = torch.randn(batch, seq, dim, device=device, dtype=dtype, requires_grad=True)
    if rate is None:  # the plain stack

        def forward(h):
            for layer in layers:
                h = layer(h)
            return h

    else:
        forward = LayerDynamicSkipper(
            layers, dim, policy="router", capacity=1.0 - rate, keep_first_last=False
        )
        forward = forward.to(device, dtype).train()
    return lambda: forward(x).float().square().mean().backward(), {"skip_rate": rate or 0.0}


def _stack_cases(device, quick) -> Iterator[Case]:
    gpu = device.type == "cuda" and not quick
    shape = "B=16 T=1024 D=2048 L=4 bf16" if gpu else "B=8 T=64 D=128 L=4 fp32"
    reps = 10 if gpu else 3
    plain = partial(_stack_setup, None, device, quick)
    yield Case("decoder_stack", shape, "eager", "fwd+bwd", plain, reps=reps)
    for rate in SKIP_RATES:
        yield Case(
            "decoder_stack",
            shape,
            f"sts-skip{round(rate * 100)}",
            "fwd+bwd",
            partial(_stack_setup, rate, device, quick),
            reps=reps,
        )


def cases(device: torch.device, quick: bool, compile_baseline: bool) -> Iterator[Case]:
    yield from _op_cases(device, quick, compile_baseline)
    yield from _layer_cases(device, quick)
    yield from _stack_cases(device, quick)
