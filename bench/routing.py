"""Routing benchmarks: `route`, `gather_rows` (fwd) and its backward `scatter_rows` (bwd).

Ours ("cpp": the extension; "triton": the Triton kernels, GPU only) against eager PyTorch
(`nonzero`/`index_select`/`index_copy_`) and `torch.compile` of the eager gather/scatter.
GB/s counts the bytes an ideal kernel moves; `pct_copy` relates it to the device's measured
copy bandwidth. Run through `python -m bench.ops --only routing`.
"""

from __future__ import annotations

import torch

from bench.timing import measure, result_row
from sts_kernels import _backend, reference, route

KEEP = 0.5  # fraction of rows that run the layer


def _shapes(device: torch.device, quick: bool) -> tuple[int, int, int, torch.dtype]:
    """(B, T, D, dtype): B * T rows of D features."""
    if device.type == "cuda":
        return 16, 4096, 4096, torch.bfloat16
    if quick:
        return 8, 1024, 1024, torch.float32
    return 16, 4096, 1024, torch.float32


def run(device: torch.device, quick: bool, copy_gbs: float) -> list[dict]:
    b, t, d, dtype = _shapes(device, quick)
    rows = b * t
    mask = torch.rand(b, t, device=device) < KEEP
    plan = route(mask)
    k = plan.num_active
    x = torch.randn(rows, d, device=device, dtype=dtype)  # [R, D]
    grad = torch.randn(k, d, device=device, dtype=dtype)  # [K, D]
    index = plan.index
    row_bytes = d * x.element_size()
    shape = f"{rows}x{d} {str(dtype).removeprefix('torch.')} K={k}"
    results = []

    # route: read the mask, write K ids (+ B counts and offsets)
    route_bytes = rows + 8 * (k + 2 * b + 1)
    route_impls = {"reference": lambda: reference.route(mask)}
    if _backend.has_extension(device.type):
        route_impls["cpp"] = lambda: torch.ops.sts.route(mask)
    for impl, fn in route_impls.items():
        results.append(
            result_row("route", f"{b}x{t}", impl, "fwd", measure(fn, device), route_bytes, copy_gbs)
        )

    def eager_gather():
        return x.index_select(0, index)

    def eager_scatter():
        return torch.zeros(rows, d, device=device, dtype=dtype).index_copy_(0, index, grad)

    gather_impls = {"eager": eager_gather, "compile": torch.compile(eager_gather)}
    scatter_impls = {"eager": eager_scatter, "compile": torch.compile(eager_scatter)}
    if _backend.has_extension(device.type):
        gather_impls["cpp"] = lambda: torch.ops.sts.gather_rows(x, index)
        scatter_impls["cpp"] = lambda: torch.ops.sts.scatter_rows(grad, index, rows)
    if device.type == "cuda" and _backend.triton_runs_on(device):
        gather_impls["triton"] = lambda: torch.ops.sts.gather_rows_triton(x, index)
        scatter_impls["triton"] = lambda: torch.ops.sts.scatter_rows_triton(grad, index, rows)

    gather_bytes = 2 * k * row_bytes + 8 * k  # read + write K rows, read K ids
    scatter_bytes = rows * row_bytes + 2 * k * row_bytes + 8 * k  # zero fill + K rows
    for impl, fn in gather_impls.items():
        results.append(
            result_row(
                "gather_rows", shape, impl, "fwd", measure(fn, device), gather_bytes, copy_gbs
            )
        )
    for impl, fn in scatter_impls.items():
        results.append(
            result_row(
                "gather_rows", shape, impl, "bwd", measure(fn, device), scatter_bytes, copy_gbs
            )
        )
    return results
