"""Visual Token Compressor benchmarks: token_pool, bipartite_merge, unmerge and the matching.

Impls: "sts" (the Triton kernels; GPU only: on the CPU Triton is its interpreter, checked for
correctness once but never timed), "eager" (the plain-PyTorch reference,
`sts_kernels.reference`), "compile" (torch.compile of that reference, a fresh Dynamo state per
shape and pass) and, for the merge and the matching, "tome": an eager implementation of the
ToMe algorithm (Bolya et al. 2023: cosine scores of alternate tokens, argsort of each source's
best score, scatter-reduce of the size-weighted tokens), the baseline the fused op must beat.
GB/s counts the bytes a fused kernel must move (inputs read once, outputs written once).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch
from torch import Tensor

import sts_kernels
from bench.ops import Case, autograd_cases
from sts_kernels import _backend, reference
from sts_kernels.ops.bipartite_merge import match_path

# (B, H, W, D, window): LLaVA-1.5 24x24 grids up to 96x96 high-resolution tiles
POOL_GPU = [
    (32, 24, 24, 4096, (2, 2)),
    (32, 24, 24, 1024, (3, 3)),
    (16, 48, 48, 1024, (2, 2)),
    (8, 96, 96, 4096, (4, 4)),
]
POOL_CPU = [(2, 24, 24, 256, (2, 2))]
# (B, N, D, r): LLaVA-1.5 CLIP (D 1024) and LLM (D 4096) widths; large N for the tiled matcher
MERGE_GPU = [(32, 576, 1024, 288), (32, 576, 4096, 288), (8, 9216, 1024, 4608)]
MERGE_CPU = [(2, 576, 256, 288)]


def _dtype(device: torch.device) -> torch.dtype:
    """bf16 as trained on a GPU; fp32 on the CPU, where bf16 kernels are emulated."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def tome_match(metric: Tensor) -> tuple[Tensor, Tensor]:
    """ToMe's bipartite soft matching: for every even ("source") token the best cosine score
    over the odd ("destination") tokens and which destination gives it. [B, N, C] -> [B, N/2]."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    src, dst = metric[:, ::2], metric[:, 1::2]
    return (src @ dst.transpose(1, 2)).max(dim=-1)  # the full [B, N/2, N/2] score matrix


def tome_merge(x: Tensor, r: int, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """ToMe's merge: the r sources with the best scores are averaged (weighted by `size`) into
    their destinations; kept sources (in score order) then destinations. Returns (x, size)."""
    b, n, d = x.shape
    size = x.new_ones(b, n, 1) if size is None else size[..., None].to(x.dtype)
    best, best_dst = tome_match(x)
    order = best.argsort(dim=-1, descending=True)[..., None]  # [B, N/2, 1] sources by score
    merged, kept = order[:, :r], order[:, r:]
    weighted = torch.cat([x * size, size], dim=-1)  # sums of x*size and of size, merged alike
    src, dst = weighted[:, ::2], weighted[:, 1::2]
    dst = dst.scatter_reduce(
        1,
        best_dst[..., None].gather(1, merged).expand(-1, -1, d + 1),
        src.gather(1, merged.expand(-1, -1, d + 1)),
        reduce="sum",
    )
    out = torch.cat([src.gather(1, kept.expand(-1, -1, d + 1)), dst], dim=1)
    return out[..., :d] / out[..., d:], out[..., d]


def _triton(fn):
    def call(*args, **kwargs):
        with sts_kernels.use_backend("triton"):
            return fn(*args, **kwargs)

    return call


def _impls(device: torch.device, compile_baseline: bool, ours, ref, **others) -> dict:
    """impl name -> callable: ours only where Triton is compiled (a GPU)."""
    impls = {"sts": _triton(ours)} if device.type == "cuda" else {}
    impls["eager"] = ref
    impls.update(others)
    if compile_baseline:
        impls["compile"] = ref
    return impls


def _randn(*shape: int, device: torch.device, grad: bool = True) -> tuple[Tensor]:
    return (torch.randn(shape, device=device, dtype=_dtype(device), requires_grad=grad),)


def _pool(fn, grid, window, x):
    return fn(x, grid, window)


def _merged(fn, r, x):
    out = fn(x, r)
    return out[0]  # MergeResult.x or tome's x


def _pool_cases(device, cases, compile_baseline) -> Iterator[Case]:
    for b, h, w, d, window in cases:
        p = -(-h // window[0]) * -(-w // window[1])
        nbytes = b * (h * w + p) * d * _dtype(device).itemsize  # read N rows, write P (each way)
        impls = _impls(device, compile_baseline, sts_kernels.token_pool, reference.token_pool)
        impls = {k: partial(_pool, fn, (h, w), window) for k, fn in impls.items()}
        yield from autograd_cases(
            "token_pool",
            f"B{b} {h}x{w} D{d} win{window[0]}x{window[1]}",
            impls,
            partial(_randn, b, h * w, d, device=device),
            {"fwd": nbytes, "bwd": nbytes, "fwd+bwd": 2 * nbytes},
        )


def _unmerge_inputs(b, n, d, r, device):
    x = torch.randn(b, n, d, device=device, dtype=_dtype(device))
    index = reference.bipartite_merge(x, r).index
    return (*_randn(b, n - r, d, device=device), index)


def _merge_cases(device, cases, compile_baseline) -> Iterator[Case]:
    for b, n, d, r in cases:
        row_bytes = b * d * _dtype(device).itemsize
        # fwd: matching reads x, merge reads x and writes N-r rows; bwd: reads N-r, writes N
        fwd, bwd = row_bytes * (3 * n - r), row_bytes * (2 * n - r)
        # which matcher the "sts" rows ran: the bmm path or the tiled kernel (its threshold
        # is a choice made without a GPU: these rows are what can confirm or move it)
        matcher = match_path(n, d, _dtype(device), device)
        shape = f"B{b} N{n} D{d} r{r}"
        impls = _impls(
            device,
            compile_baseline,
            sts_kernels.bipartite_merge,
            reference.bipartite_merge,
            tome=tome_merge,
        )
        yield from autograd_cases(
            "bipartite_merge",
            f"{shape} {matcher}",
            {k: partial(_merged, fn, r) for k, fn in impls.items()},
            partial(_randn, b, n, d, device=device),
            {"fwd": fwd, "fwd+bwd": fwd + bwd},
            graph=True,
        )
        # the matching alone: reads the metric once (the tiled kernel never stores the
        # [|A|, |Bd|] scores; the bmm path writes and reads them once more: not counted)
        match_impls = _impls(
            device,
            compile_baseline,
            lambda m: torch.ops.sts.bipartite_match_triton(m, 0)[0],
            lambda m: reference.bipartite_match(m)[0],
            tome=lambda m: tome_match(m)[0],
        )
        yield from autograd_cases(
            "bipartite_match",
            f"B{b} N{n} C{d} {matcher}",
            match_impls,
            partial(_randn, b, n, d, device=device, grad=False),
            {"fwd": row_bytes * n},
            graph=True,
        )
        # unmerge: a gather of N rows out of N-r (backward: the segmented sum back)
        unmerge_bytes = row_bytes * (2 * n - r)
        yield from autograd_cases(
            "unmerge",
            shape,
            _impls(device, compile_baseline, sts_kernels.unmerge, reference.unmerge),
            partial(_unmerge_inputs, b, n, d, r, device),
            {"fwd": unmerge_bytes, "fwd+bwd": 2 * unmerge_bytes},
            graph=True,
        )


def check_interpreter(device: torch.device) -> None:
    """One small Triton-vs-reference comparison where Triton runs as the interpreter, and the
    ToMe baseline against the contract (same merged set for protected=0, so same sizes)."""
    x = torch.randn(2, 36, 32, device=device)
    ours, _ = tome_merge(x, 8)
    ref = reference.bipartite_merge(x, 8)
    torch.testing.assert_close(ours.sort(dim=1).values, ref.x.sort(dim=1).values)
    if device.type == "cuda" or not _backend.triton_runs_on(device):
        return
    torch.testing.assert_close(
        _triton(sts_kernels.token_pool)(x, (6, 6), (2, 2)), reference.token_pool(x, (6, 6), (2, 2))
    )
    ours = _triton(sts_kernels.bipartite_merge)(x, 8, protected=1)
    ref = reference.bipartite_merge(x, 8, protected=1)
    assert torch.equal(ours.index, ref.index)
    torch.testing.assert_close(ours.x, ref.x)


def cases(device: torch.device, quick: bool, compile_baseline: bool) -> Iterator[Case]:
    gpu = device.type == "cuda" and not quick
    check_interpreter(device)
    yield from _pool_cases(device, POOL_GPU if gpu else POOL_CPU, compile_baseline)
    yield from _merge_cases(device, MERGE_GPU if gpu else MERGE_CPU, compile_baseline)
