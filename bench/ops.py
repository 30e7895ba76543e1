"""Op microbenchmarks: `python -m bench.ops [--device cuda] [--only vtc,lds,routing]`.

Each suite module (`bench/vtc.py`, `bench/lds.py`, `bench/routing.py`) yields `Case`s from
`cases(device, quick, compile_baseline)`; this driver measures the device's copy bandwidth
once, times every case (bench/timing.py: L2 flushed on GPU, CUDA graphs for launch-bound ops)
and rewrites the JSON under bench/results/ after every row, so a run cut short keeps what it
measured. The same cases run under pytest-benchmark: `pytest bench/ --benchmark-only`.
One plot per op (bench/results/<run>-<op>.png) when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from bench.timing import compiled, copy_bandwidth_gbs, measure, result_row

SUITES = ("vtc", "lds", "routing")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Case:
    """One row to measure. `setup()` builds the inputs and returns `(fn, info)`: the call to
    time and extra fields for the row (e.g. what torch.compile made of the baseline)."""

    op: str
    shape: str
    impl: str
    pass_: str
    setup: Callable[[], tuple[Callable[[], object], dict]]
    nbytes: int | None = None  # bytes an ideal kernel moves (None: not memory-bound)
    graph: bool = False  # launch-bound: on a GPU, time a CUDA graph replay
    reps: int = 20

    @property
    def id(self) -> str:
        return f"{self.op}[{self.shape}]-{self.impl}-{self.pass_}".replace(" ", "_")


def autograd_cases(
    op: str,
    shape: str,
    impls: dict[str, Callable[..., torch.Tensor]],
    make_inputs: Callable[[], tuple],
    nbytes: dict[str, int | None],
    graph: bool = False,
    reps: int = 20,
) -> Iterator[Case]:
    """Cases for `fn(*make_inputs())` of every impl and every pass in `nbytes` ("fwd", "bwd",
    "fwd+bwd"); the inputs made with `requires_grad` get gradients. The impl named "compile" is
    compiled by `bench.timing.compiled` for each pass's inputs (a fresh Dynamo state each)."""
    for impl, fn in impls.items():
        for pass_, n in nbytes.items():
            setup = partial(_autograd_setup, fn, impl == "compile", make_inputs, pass_)
            yield Case(op, shape, impl, pass_, setup, n, graph, reps)


def _autograd_setup(fn, compile_it: bool, make_inputs, pass_: str):
    args = make_inputs()
    if pass_ == "fwd":  # no autograd graph: the inputs do not require grad
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    info = {}
    if compile_it:
        fn, info["compile_status"] = compiled(fn, *args)
    if pass_ == "fwd":
        return partial(fn, *args), info
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    out = fn(*args)
    grad = torch.randn_like(out)
    if pass_ == "bwd":
        return partial(torch.autograd.grad, out, leaves, grad, retain_graph=True), info
    return lambda: torch.autograd.grad(fn(*args), leaves, grad), info


def suite_cases(names: list[str], device: torch.device, quick: bool, compile_baseline: bool):
    """The cases of the named suites, in order."""
    for name in names:
        yield from importlib.import_module(f"bench.{name}").cases(device, quick, compile_baseline)


def run_case(case: Case, device: torch.device, copy_gbs: float) -> dict:
    fn, info = case.setup()
    timing = measure(fn, device, reps=case.reps, graph=case.graph)
    return result_row(
        case.op, case.shape, case.impl, case.pass_, timing, case.nbytes, copy_gbs, **info
    )


def device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu{os.cpu_count()}"


def environment(device: torch.device) -> dict:
    """Device, versions (torch, Triton, CUDA, ...) and the git commit of the measured code
    (`STS_COMMIT` overrides it for a copy of the tree, as on the lent GPU machines)."""
    from sts_kernels.env import collect

    root = Path(__file__).resolve().parents[1]
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=root).stdout
    return {
        **collect(),
        "device": device_tag(device),
        "commit": os.environ.get("STS_COMMIT") or git("rev-parse", "--short", "HEAD").strip(),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no").strip()),
    }


class ResultsFile:
    """A JSON results file rewritten (atomically) after every row."""

    def __init__(self, path: Path, device: torch.device, copy_gbs: float, method: str):
        self.path = path
        self.head = {"env": environment(device), "copy_gbs": copy_gbs, "method": method}
        self.rows: list[dict] = []
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.head, "rows": self.rows}, indent=1, default=str))
        tmp.replace(self.path)


def results_path(out: Path, device: torch.device, prefix: str = "ops") -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return out / f"{prefix}-{device_tag(device)}-{stamp}.json"


COLUMNS = ("op", "shape", "impl", "pass", "median_ms", "min_ms", "gbs", "pct_copy", "timing")
COLUMNS += ("note",)


def format_row(row: dict, widths: tuple[int, ...] = (15, 30, 12, 7, 9, 9, 8, 8, 14, 0)) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}" if v < 100 else f"{v:.1f}"
        return "-" if v is None else str(v)

    note = row.get("compile_status") or row.get("note")
    values = [cell(row.get(c)) for c in COLUMNS[:-1]] + [cell(note) if note else ""]
    return "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()


def format_table(rows: list[dict]) -> str:
    return "\n".join([format_row(dict(zip(COLUMNS, COLUMNS)))] + [format_row(r) for r in rows])


def plot(rows: list[dict], stem: Path) -> list[Path]:
    """One bar chart per op (median ms per shape/pass, a bar per impl); nothing without
    matplotlib (the lent GPU machines have none)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for op in dict.fromkeys(r["op"] for r in rows):
        op_rows = [r for r in rows if r["op"] == op]
        groups = list(dict.fromkeys(f"{r['shape']} {r['pass']}" for r in op_rows))
        impls = list(dict.fromkeys(r["impl"] for r in op_rows))
        size = (9, 1.5 + 0.3 * len(groups) * len(impls))
        fig, ax = plt.subplots(figsize=size, layout="constrained")
        height = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            ms = {f"{r['shape']} {r['pass']}": r["median_ms"] for r in op_rows if r["impl"] == impl}
            ys = [g + i * height for g in range(len(groups))]
            ax.barh(ys, [ms.get(g, 0.0) for g in groups], height, label=impl)
        ax.set_yticks([g + 0.4 - height / 2 for g in range(len(groups))], groups, fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("median ms, log scale (lower is better)")
        ax.set_title(op)
        ax.legend(fontsize=7)
        path = stem.parent / f"{stem.name}-{op}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


METHOD = (
    "median of reps; GPU: CUDA events, L2 flushed (256 MB write) before every rep, CUDA graph "
    "replay for launch-bound ops; CPU: wall clock. gbs = ideal bytes / median; pct_copy = gbs "
    "/ measured copy bandwidth. compile = torch.compile of the eager reference, fresh Dynamo "
    "state per shape (compile_status says when it fell back)."
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", default=",".join(SUITES), help="comma-separated suites")
    parser.add_argument("--full", action="store_true", help="all shapes (default on GPU)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile baselines (default: on GPU only; each shape compiles afresh)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    quick = device.type != "cuda" and not args.full
    compile_baseline = device.type == "cuda" if args.compile is None else args.compile
    copy_gbs = copy_bandwidth_gbs(device, nbytes=1 << (30 if device.type == "cuda" else 26))
    print(f"device {device_tag(device)}: measured copy bandwidth {copy_gbs:.1f} GB/s")
    results = ResultsFile(results_path(args.out, device), device, copy_gbs, METHOD)
    print(format_table([]), flush=True)
    for case in suite_cases(args.only.split(","), device, quick, compile_baseline):
        row = run_case(case, device, copy_gbs)
        results.add(row)
        print(format_row(row), flush=True)
    plots = plot(results.rows, results.path.with_suffix(""))
    print(f"wrote {results.path}" + (f" and {len(plots)} plots" if plots else ""))


if __name__ == "__main__":
    main()
