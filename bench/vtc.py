"""Visual Token Compressor benchmarks: token_pool, bipartite_merge and the fused matching.

Ours ("sts": the Triton kernels) against the plain-PyTorch reference run eagerly ("eager")
and through torch.compile ("compile"). On the CPU (quick mode) only the reference is timed:
Triton there is its interpreter, which is checked for correctness once but never timed.
GB/s counts the bytes a fused kernel must move (inputs read once, outputs written once).
"""

from __future__ import annotations

import torch

import sts_kernels
from bench.timing import measure, result_row
from sts_kernels import _backend, reference


def _dtype(device: torch.device) -> torch.dtype:
    """bf16 as trained on a GPU; fp32 on the CPU, where bf16 kernels are emulated."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# (B, H, W, D, window): LLaVA-like 24x24 grids up to 96x96 high-resolution tiles
POOL_GPU = [
    (32, 24, 24, 4096, (2, 2)),
    (32, 24, 24, 1024, (3, 3)),
    (16, 48, 48, 1024, (2, 2)),
    (16, 48, 48, 4096, (3, 3)),
    (8, 96, 96, 1024, (2, 2)),
    (8, 96, 96, 4096, (4, 4)),
]
POOL_CPU = [(2, 24, 24, 256, (2, 2)), (2, 27, 27, 256, (3, 3))]
# (B, N, D, r)
MERGE_GPU = [(32, 576, 4096, 288), (16, 2304, 1024, 1152), (8, 9216, 1024, 4608)]
MERGE_CPU = [(2, 576, 256, 288)]
# (B, N, C): the matching alone, where the eager ToMe version materialises [|A|, |Bd|]
MATCH_GPU = [(8, 2304, 1024), (32, 2304, 1024)]
MATCH_CPU = [(2, 576, 256)]


def _triton(fn):
    def call(*args, **kwargs):
        with sts_kernels.use_backend("triton"):
            return fn(*args, **kwargs)

    return call


def _impls(device: torch.device, ours, ref) -> dict:
    """impl name -> callable: ours only where Triton really compiles, compile only on GPU."""
    if device.type != "cuda":
        return {"eager": ref}
    return {"sts": _triton(ours), "eager": ref, "compile": torch.compile(ref, dynamic=False)}


def _time_passes(
    op: str,
    shape: str,
    impl: str,
    fn,
    x: torch.Tensor,
    device: torch.device,
    fwd_bytes: int,
    bwd_bytes: int,
    copy_gbs: float,
) -> list[dict]:
    """Result rows for fwd, bwd and fwd+bwd of `fn(x) -> Tensor`."""
    leaf = x.detach().requires_grad_(True)
    out = fn(leaf)
    grad = torch.randn_like(out)
    fwd = lambda: fn(x)
    bwd = lambda: torch.autograd.grad(out, leaf, grad, retain_graph=True)
    both = lambda: torch.autograd.grad(fn(leaf), leaf, grad)
    rows = []
    for name, call, nbytes in (
        ("fwd", fwd, fwd_bytes),
        ("bwd", bwd, bwd_bytes),
        ("fwd+bwd", both, fwd_bytes + bwd_bytes),
    ):
        rows.append(result_row(op, shape, impl, name, measure(call, device), nbytes, copy_gbs))
    return rows


def _pool_rows(device, cases, copy_gbs) -> list[dict]:
    rows = []
    for b, h, w, d, window in cases:
        x = torch.randn(b, h * w, d, device=device, dtype=_dtype(device))
        p = -(-h // window[0]) * -(-w // window[1])
        nbytes = b * (h * w + p) * d * x.element_size()  # read N rows, write P rows (each way)
        shape = f"B{b} {h}x{w} D{d} win{window[0]}x{window[1]}"
        impls = _impls(device, sts_kernels.token_pool, reference.token_pool)
        for impl, fn in impls.items():
            pool = lambda t, fn=fn, grid=(h, w), window=window: fn(t, grid, window)
            rows += _time_passes(
                "token_pool", shape, impl, pool, x, device, nbytes, nbytes, copy_gbs
            )
    return rows


def _merge_rows(device, cases, copy_gbs) -> list[dict]:
    rows = []
    for b, n, d, r in cases:
        x = torch.randn(b, n, d, device=device, dtype=_dtype(device))
        row_bytes = b * d * x.element_size()
        # fwd: matching reads x, merge reads x and writes N-r rows; bwd: reads N-r, writes N
        fwd_bytes, bwd_bytes = row_bytes * (3 * n - r), row_bytes * (2 * n - r)
        shape = f"B{b} N{n} D{d} r{r}"
        impls = _impls(device, sts_kernels.bipartite_merge, reference.bipartite_merge)
        for impl, fn in impls.items():
            merge = lambda t, fn=fn, r=r: fn(t, r).x
            rows += _time_passes(
                "bipartite_merge", shape, impl, merge, x, device, fwd_bytes, bwd_bytes, copy_gbs
            )
    return rows


def _match_rows(device, cases, copy_gbs) -> list[dict]:
    rows = []
    for b, n, c in cases:
        metric = torch.randn(b, n, c, device=device, dtype=_dtype(device))
        nbytes = metric.numel() * metric.element_size()
        shape = f"B{b} N{n} C{c}"
        impls = _impls(
            device, lambda m: torch.ops.sts.bipartite_match(m, 0), reference.bipartite_match
        )
        for impl, fn in impls.items():
            t = measure(lambda fn=fn, metric=metric: fn(metric), device)
            rows.append(result_row("bipartite_match", shape, impl, "fwd", t, nbytes, copy_gbs))
    return rows


def _check_interpreter(device: torch.device) -> None:
    """One small Triton-vs-reference comparison where Triton runs as the interpreter."""
    if device.type == "cuda" or not _backend.triton_runs_on(device):
        return
    x = torch.randn(2, 35, 32, device=device)
    torch.testing.assert_close(
        _triton(sts_kernels.token_pool)(x, (5, 7), (2, 2)), reference.token_pool(x, (5, 7), (2, 2))
    )
    ours, ref = (
        _triton(sts_kernels.bipartite_merge)(x, 8, protected=1),
        reference.bipartite_merge(x, 8, protected=1),
    )
    assert torch.equal(ours.index, ref.index)
    torch.testing.assert_close(ours.x, ref.x)


def run(device: torch.device, quick: bool, copy_gbs: float) -> list[dict]:
    gpu = device.type == "cuda" and not quick
    _check_interpreter(device)
    rows = _pool_rows(device, POOL_GPU if gpu else POOL_CPU, copy_gbs)
    rows += _merge_rows(device, MERGE_GPU if gpu else MERGE_CPU, copy_gbs)
    rows += _match_rows(device, MATCH_GPU if gpu else MATCH_CPU, copy_gbs)
    return rows


if __name__ == "__main__":
    from bench.ops import format_table
    from bench.timing import copy_bandwidth_gbs, result_row

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(format_table(run(dev, dev.type != "cuda", copy_bandwidth_gbs(dev, 1 << 26))))
