"""The cases of `python -m bench.ops`, timed by pytest-benchmark (see bench/conftest.py).

pytest-benchmark times with the host clock, so on a GPU every round ends with a synchronize
and starts after an untimed L2 flush (plus synchronize); launch-bound cases replay a CUDA
graph, as in `python -m bench.ops`. The row (median, GB/s, % of copy bandwidth) goes to the
benchmark's `extra_info` and to the incremental results file.
"""

import torch

from bench.timing import L2Flush, Timing, as_graph, result_row


def test_op(benchmark, case, device, copy_gbs, results):
    fn, info = case.setup()
    mode = "wall"
    if device.type == "cuda":
        if case.graph:
            fn, mode = as_graph(fn, device)
        flush, sync = L2Flush(device), lambda: torch.cuda.synchronize(device)
        mode = f"pytest-benchmark {mode}+sync+flush"

        def setup():
            flush()
            sync()

        def target():
            fn()
            sync()

    else:
        setup, target, mode = None, fn, "pytest-benchmark wall"
    benchmark.pedantic(target, setup=setup, rounds=case.reps, warmup_rounds=3, iterations=1)
    stats = benchmark.stats.stats
    timing = Timing(stats.median * 1e3, stats.min * 1e3, case.reps, mode)
    row = result_row(
        case.op, case.shape, case.impl, case.pass_, timing, case.nbytes, copy_gbs, **info
    )
    benchmark.extra_info.update(row)
    results.add(row)
