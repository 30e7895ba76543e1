"""Timing, bandwidth and memory measurement shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    peak_mb: float | None  # peak device memory above the starting point (CUDA only)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int = 3,
    reps: int = 20,
    cpu_memory: bool = False,
) -> Timing:
    """Median wall time of `fn()` in ms (CUDA events on GPU) and its peak extra memory (on CPU
    only with `cpu_memory`: one more untimed call under the profiler)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if cpu_memory:
            peak = peak_memory_mb(fn, device)
    return Timing(statistics.median(times), peak)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second), GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, warmup=3, reps=10)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def gbs(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def result_row(
    op: str,
    shape: str,
    impl: str,
    pass_: str,
    timing: Timing,
    nbytes: int | None = None,
    copy_gbs: float | None = None,
    **extra: object,
) -> dict:
    """One benchmark result; GB/s and % of copy bandwidth only for memory-bound ops (`nbytes`
    = the bytes an ideal kernel moves)."""
    rate = gbs(nbytes, timing.median_ms) if nbytes else None
    return {
        "op": op,
        "shape": shape,
        "impl": impl,
        "pass": pass_,
        "median_ms": timing.median_ms,
        "gbs": rate,
        "pct_copy": 100 * rate / copy_gbs if rate is not None and copy_gbs else None,
        "peak_mb": timing.peak_mb,
        **extra,
    }


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory `fn()` allocates above what was allocated before it, in MiB.

    CUDA: the caching allocator's peak. CPU: the allocation timeline recorded by the profiler
    (PyTorch keeps no peak counter for CPU tensors).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:  # allocations are positive, frees negative
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20
