"""Timing, bandwidth, memory and torch.compile baselines shared by the benchmarks.

GPU timing follows `triton.testing.do_bench`: every repetition starts with a 256 MB write that
evicts the L2 (50 MB on an H100), so no input is served from cache; CUDA events bracket only
the timed call. Launch-bound ops (`graph=True`) are captured once in a CUDA graph and each
repetition replays it, so the timing holds the kernels, not Python and launch overhead; an op
that synchronises with the host cannot be captured and is timed eagerly (the row says which).
CPU timing is the wall clock.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

L2_FLUSH_BYTES = 256 << 20


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    reps: int
    mode: str  # how it was timed: "cpu-wall", "events+flush", "graph+flush"
    peak_mb: float | None = None  # peak memory above the starting point


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class L2Flush:
    """`flush()` overwrites a 256 MB buffer: the next kernel finds none of its inputs in L2."""

    def __init__(self, device: torch.device):
        self.buffer = (
            torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
            if device.type == "cuda"
            else None
        )

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.zero_()


def cuda_graph(fn: Callable[[], object], device: torch.device) -> Callable[[], object] | None:
    """`fn` captured in a CUDA graph (replayed by the returned callable), or None when it
    cannot be captured (a host sync, a CPU op)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    # one call outside the capture warms the allocator; a host sync there means no graph
    # (a sync inside a capture would invalidate it)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(stream):
            fn()
    except RuntimeError:
        return None
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        torch.cuda.synchronize(device)
        return None
    return graph.replay


def as_graph(fn: Callable[[], object], device: torch.device) -> tuple[Callable[[], object], str]:
    """(CUDA graph replay of `fn`, "graph"), or (`fn`, "events (host sync: no graph)")."""
    replay = cuda_graph(fn, device)
    return (replay, "graph") if replay is not None else (fn, "events (host sync: no graph)")


def measure(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int = 3,
    reps: int = 20,
    graph: bool = False,
    cpu_memory: bool = False,
) -> Timing:
    """Median and minimum time of `fn()` in ms, and its peak extra memory (CUDA always; CPU
    with `cpu_memory`: one more untimed call under the profiler)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        peak = peak_memory_mb(fn, device) if cpu_memory else None
        return Timing(statistics.median(times), min(times), reps, "cpu-wall", peak)

    fn, mode = as_graph(fn, device) if graph else (fn, "events")
    mode += "+flush"
    flush = L2Flush(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(reps)
    ]
    for start, end in events:
        flush()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    times = [start.elapsed_time(end) for start, end in events]
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return Timing(statistics.median(times), min(times), reps, mode, peak)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second), GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, warmup=3, reps=10)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def compiled(fn: Callable, *example: object) -> tuple[Callable, str]:
    """`torch.compile(fn)` with a fresh Dynamo state, compiled now on `example`, and what Dynamo
    made of it: "compiled", "compiled with N graph breaks", or "eager fallback: ...". A shared
    Dynamo cache would hit the recompile limit after a few shapes and silently run eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled_fn = torch.compile(fn, dynamic=False)
    try:
        compiled_fn(*example)
    except Exception as error:  # the baseline is reported as missing, not timed as eager
        return fn, f"eager fallback: {type(error).__name__}: {str(error)[:120]}"
    graphs = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    if graphs == 0:
        return compiled_fn, "eager fallback: Dynamo captured no graph"
    return compiled_fn, f"compiled with {breaks} graph breaks" if breaks else "compiled"


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
        "min_ms": timing.min_ms,
        "reps": timing.reps,
        "timing": timing.mode,
        "ideal_bytes": nbytes,
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
