"""Routing benchmarks: `route`, `gather_rows` (fwd) and its backward `scatter_rows` (bwd).

Ours ("cpp": the extension; "triton": the Triton kernels, GPU only; its route is one launch and
one host read, so it is timed eagerly, not in a CUDA graph) against eager PyTorch
(`nonzero`/`index_select`/`index_copy_`) and `torch.compile` of the eager gather/scatter.
GB/s counts the bytes an ideal kernel moves; `pct_copy` relates it to the device's measured
copy bandwidth. Run through `python -m bench.ops --only routing`.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch

from bench.ops import Case
from bench.timing import compiled
from sts_kernels import _backend, reference, route

KEEP = 0.5  # fraction of rows that run the layer


def _shapes(device: torch.device, quick: bool) -> tuple[int, int, int, torch.dtype]:
    """(B, T, D, dtype): B * T rows of D features (32k x 4096 decoder rows on a GPU)."""
    if device.type == "cuda":
        return 8, 4096, 4096, torch.bfloat16
    if quick:
        return 8, 1024, 1024, torch.float32
    return 16, 4096, 1024, torch.float32


def _inputs(device: torch.device, quick: bool):
    b, t, d, dtype = _shapes(device, quick)
    mask = torch.rand(b, t, device=device) < KEEP
    plan = route(mask)
    x = torch.randn(b * t, d, device=device, dtype=dtype)  # [R, D]
    grad = torch.randn(plan.num_active, d, device=device, dtype=dtype)  # [K, D]
    return mask, plan.index, x, grad


def eager_gather(x, index):
    return x.index_select(0, index)


def eager_scatter(grad, index, num_rows):
    return grad.new_zeros(num_rows, grad.shape[1]).index_copy_(0, index, grad)


_GATHER = {
    "cpp": lambda x, index: torch.ops.sts.gather_rows(x, index),
    "triton": lambda x, index: torch.ops.sts.gather_rows_triton(x, index),
}
_ROUTE = {
    "reference": reference.route,
    "cpp": lambda mask: torch.ops.sts.route(mask),
    "triton": lambda mask: torch.ops.sts.route_triton(mask),
}
_SCATTER = {
    "cpp": lambda grad, index, rows: torch.ops.sts.scatter_rows(grad, index, rows),
    "triton": lambda grad, index, rows: torch.ops.sts.scatter_rows_triton(grad, index, rows),
}


def _setup(kind: str, impl: str, device, quick):
    mask, index, x, grad = _inputs(device, quick)
    if kind == "route":
        return partial(_ROUTE[impl], mask), {}
    args = (x, index) if kind == "gather" else (grad, index, x.shape[0])
    fn = {
        "gather": {**_GATHER, "eager": eager_gather},
        "scatter": {**_SCATTER, "eager": eager_scatter},
    }
    info = {}
    if impl == "compile":
        call, info["compile_status"] = compiled(fn[kind]["eager"], *args)
    else:
        call = fn[kind][impl]
    return partial(call, *args), info


def cases(device: torch.device, quick: bool, compile_baseline: bool) -> Iterator[Case]:
    b, t, d, dtype = _shapes(device, quick)
    rows, k = b * t, round(b * t * KEEP)  # K is random around this; the model uses it
    row_bytes = d * dtype.itemsize
    shape = f"{rows}x{d} {str(dtype).removeprefix('torch.')} K~{k}"
    ours = [name for name in ("cpp", "triton") if name in _backend.available_backends(device)]
    # a Triton op only on a GPU (on the CPU it is the interpreter)
    ours = [name for name in ours if name != "triton" or device.type == "cuda"]
    baselines = ["eager"] + (["compile"] if compile_baseline else [])

    # route: read the mask, write the plan: K ids, row_to_k (R), the padded ids (B * Kmax,
    # ~K), counts and offsets (the reference builds the last three only when asked)
    route_bytes = rows + 8 * (2 * k + rows + 2 * b + 1)
    for impl in ["reference"] + ours:
        setup = partial(_setup, "route", impl, device, quick)
        yield Case("route", f"{b}x{t}", impl, "fwd", setup, route_bytes, graph=True)
    gather_bytes = 2 * k * row_bytes + 8 * k  # read + write K rows, read K ids
    scatter_bytes = rows * row_bytes + 2 * k * row_bytes + 8 * k  # zero fill + K rows
    for impl in ours + baselines:
        setup = partial(_setup, "gather", impl, device, quick)
        yield Case("gather_rows", shape, impl, "fwd", setup, gather_bytes)
        setup = partial(_setup, "scatter", impl, device, quick)
        yield Case("gather_rows", shape, impl, "bwd", setup, scatter_bytes)
