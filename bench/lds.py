"""Layer Dynamic Skipper benchmarks (suite of `python -m bench.ops --only lds`).

1. `skip_residual` (sts-<backend>: the package's backend for the device, e.g. sts-cpp on the
   CPU, sts-triton on a GPU) against eager PyTorch
   (`x.clone().index_add_(0, index, gate * delta)`) and that eager code under torch.compile,
   forward and forward+backward; half the rows active. GB/s counts the bytes the fused kernels
   must move: forward reads x and delta and writes out, (2R + K) F elements; backward reads
   grad_out and delta rows and writes grad_delta, 3 K F (grad_x is grad_out itself).
2. A Llama-style decoder stack (RMSNorm, causal MHA via sdpa, SwiGLU MLP) under the skipper in
   sample mode at 0/25/50/75 % skipped samples (router policy with capacity 1 - rate: exact
   counts), forward+backward time and peak activation memory (CUDA), against the plain stack.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.timing import measure, result_row
from sts_kernels import route, skip_residual
from sts_kernels.nn import LayerDynamicSkipper
from sts_kernels.ops.skip_residual import backend_for

SKIP_RATES = (0.0, 0.25, 0.5, 0.75)


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


def _eager(x, delta, index, gate):
    # [R, F] rows: the clone-then-scatter formulation the fused kernel avoids
    return x.clone().index_add_(0, index, delta * gate[:, None].to(delta.dtype))


def _op_rows(device: torch.device, quick: bool, copy_gbs: float) -> list[dict]:
    gpu = device.type == "cuda"
    batch, seq, dim = (16, 4096, 4096) if gpu else (8, 512, 256)
    dtype = torch.bfloat16 if gpu else torch.float32
    x = torch.randn(batch, seq, dim, device=device, dtype=dtype)
    plan = route(torch.rand(batch, seq, device=device) < 0.5)
    k, rows = plan.num_active, plan.num_rows
    delta = torch.randn(k, dim, device=device, dtype=dtype)
    gate = torch.rand(k, device=device)
    x2 = x.view(rows, dim)
    elt = x.element_size()
    fwd_bytes = (2 * rows + k) * dim * elt
    bwd_bytes = 3 * k * dim * elt
    sts = f"sts-{backend_for(device)}"  # which backend ran
    impls = {
        sts: lambda x, d, g: skip_residual(x, d, plan, g).view(rows, dim),
        "eager": lambda x, d, g: _eager(x, d, plan.index, g),
    }
    if not quick:
        impls["compile"] = torch.compile(impls["eager"])
    shape = f"R={rows} K={k} D={dim} {str(dtype).removeprefix('torch.')}"
    out = []
    reps = 5 if quick else 20
    for impl, fn in impls.items():
        leaves = [t.detach().clone().requires_grad_() for t in (x2.view(x.shape), delta, gate)]
        src = (x, delta, gate) if impl == sts else (x2, delta, gate)
        grad = torch.ones(rows, dim, device=device, dtype=dtype)

        def fwd(fn=fn, src=src):
            with torch.no_grad():
                fn(*src)

        def fwd_bwd(fn=fn, impl=impl, leaves=leaves, grad=grad):
            first = leaves[0] if impl == sts else leaves[0].view(rows, dim)
            fn(first, *leaves[1:]).backward(grad)

        for name, step, nbytes in (
            ("fwd", fwd, fwd_bytes),
            ("fwd+bwd", fwd_bwd, fwd_bytes + bwd_bytes),
        ):
            t = measure(step, device, warmup=2, reps=reps)
            out.append(result_row("skip_residual", shape, impl, name, t, nbytes, copy_gbs))
    return out


def _layer_rows(device: torch.device, quick: bool) -> list[dict]:
    gpu = device.type == "cuda"
    batch, seq, dim, heads, hidden, depth = (
        (16, 1024, 2048, 16, 5632, 4) if gpu else (8, 64, 128, 4, 344, 4)
    )
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.manual_seed(0)
    layers = nn.ModuleList(DecoderLayer(dim, heads, hidden) for _ in range(depth))
    layers = layers.to(device, dtype).train()
    x = torch.randn(batch, seq, dim, device=device, dtype=dtype, requires_grad=True)
    shape = f"B={batch} T={seq} D={dim} L={depth} {str(dtype).removeprefix('torch.')}"
    reps = 3 if quick else 10

    def step(model):
        def run():
            model(x).float().square().mean().backward()

        return run

    def dense(h):
        for layer in layers:
            h = layer(h)
        return h

    out = []
    t = measure(step(dense), device, warmup=1, reps=reps, cpu_memory=True)
    out.append(result_row("decoder_stack", shape, "eager", "fwd+bwd", t, skip_rate=0.0))
    for rate in SKIP_RATES:
        skipper = (
            LayerDynamicSkipper(
                layers, dim, policy="router", capacity=1.0 - rate, keep_first_last=False
            )
            .to(device, dtype)
            .train()
        )
        t = measure(step(skipper), device, warmup=1, reps=reps, cpu_memory=True)
        out.append(
            result_row(
                f"decoder_stack_skip{round(rate * 100)}",
                shape,
                "sts",
                "fwd+bwd",
                t,
                skip_rate=rate,
                executed_fraction=skipper.report.executed_fraction,
            )
        )
    return out


def run(device: torch.device, quick: bool, copy_gbs: float) -> list[dict]:
    return _op_rows(device, quick, copy_gbs) + _layer_rows(device, quick)


if __name__ == "__main__":
    from bench.ops import format_table
    from bench.timing import copy_bandwidth_gbs

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bandwidth = copy_bandwidth_gbs(dev, nbytes=1 << (30 if dev.type == "cuda" else 26))
    print(format_table(run(dev, quick=dev.type != "cuda", copy_gbs=bandwidth)))
