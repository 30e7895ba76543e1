"""Ahead-of-time compile of every Triton kernel of `sts_kernels` for real GPU targets, on a
machine without a GPU.

    python tests/aot_compile.py --arch 90 --json out.json    # one target, one process
    python tests/aot_compile.py --write                      # both targets -> bench/results/

A stand-in Triton driver reports `GPUTarget("cuda", ARCH, 32)` and `JITFunction.run` is
patched to compile only (`warmup=True`), so calling the package's public ops (forward and
backward) with CPU tensors of LLaVA-1.5 shapes compiles exactly the specialisations a GPU run
would. ptxas (shipped in the triton wheel) prints registers, spills and stack per kernel;
Triton's metadata has the shared memory. TRITON_INTERPRET must be unset (the kernels are then
JITFunctions): `tests/budgets/test_aot_compile.py` runs this file in subprocesses.

Kernel outputs are never computed: after compiling, every integer tensor argument the workload
did not create itself (index outputs, temporaries) is zero-filled, so the index glue between
kernels sees in-range values. Values never change what is compiled (only dtypes, alignment,
integer divisibility by 16 and constexprs do), so inputs are `torch.empty`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import inspect
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ARCHS = (80, 90)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# opt-in maximum dynamic shared memory per block (CUDA programming guide, compute capabilities)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def kernel_name(obj: object) -> str | None:
    """`module.qualname` of a Triton kernel (jit, interpreted, autotuned, heuristics), or None."""
    from triton.runtime.jit import KernelInterface

    if not isinstance(obj, KernelInterface):
        return None
    while isinstance(obj, KernelInterface):
        obj = obj.fn
    return f"{obj.__module__}.{obj.__qualname__}"


def _defined_kernels() -> dict[str, object]:
    """module.qualname -> kernel object of every Triton kernel defined in a module of
    sts_kernels (imports them all)."""
    import sts_kernels

    found: dict[str, object] = {}
    for info in pkgutil.walk_packages(sts_kernels.__path__, "sts_kernels."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            name = kernel_name(value)
            if name is not None and name.startswith(info.name + "."):
                found[name] = value
    return found


def discover() -> list[str]:
    """Every Triton kernel defined in a module of sts_kernels (imports them all). A jit function
    that another one calls (a device helper such as `_row_slots`) is compiled into its caller,
    so it is not a kernel of its own; one that nothing calls and nothing launches still is, and
    fails as never compiled."""
    from triton.runtime.jit import KernelInterface

    found: dict[str, str] = {}  # module.qualname -> source
    for name, fn in _defined_kernels().items():
        while isinstance(fn, KernelInterface):
            fn = fn.fn
        found[name] = inspect.getsource(fn)
    called = {
        name
        for name in found
        for other, source in found.items()
        if other != name and f"{name.rsplit('.', 1)[1]}(" in source
    }
    return sorted(set(found) - called)


def autotune_configs() -> dict[str, list[str]]:
    """kernel -> its `@triton.autotune` configs, each as "NAME=value ... num_warps=W" (the
    words of a compiled binary's `_specialisation`)."""
    from triton.runtime.autotuner import Autotuner

    return {
        name: [
            " ".join([*(f"{k}={v}" for k, v in c.kwargs.items()), f"num_warps={c.num_warps}"])
            for c in kernel.configs
        ]
        for name, kernel in _defined_kernels().items()
        if isinstance(kernel, Autotuner)
    }


# ---------------------------------------------------------------------------------------------
# the workloads: public ops at LLaVA-1.5 shapes, forward and backward


_kept: set[int] = set()  # storages the workload made itself; never zero-filled


def _keep(*tensors: torch.Tensor) -> None:
    _kept.update(t.untyped_storage().data_ptr() for t in tensors)


def _inputs(*shape: int, dtype: torch.dtype, grad: bool = True) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype).requires_grad_(grad)  # values never matter
    _keep(t)
    return t


def _backward(out: torch.Tensor, *inputs: torch.Tensor) -> None:
    grad = torch.empty_like(out)
    _keep(grad)
    torch.autograd.grad(out, inputs, grad)


def _mask(mask_shape: tuple[int, ...]) -> torch.Tensor:
    mask = torch.zeros(mask_shape, dtype=torch.bool)
    mask.view(-1)[::2] = True  # half the rows run the layer
    return mask


def _plan(mask_shape: tuple[int, ...]):
    import sts_kernels

    mask = _mask(mask_shape)
    plan = sts_kernels.reference.route(mask)  # a compile-only Triton route would give K = 0
    _keep(mask, plan.index, plan.counts, plan.offsets)
    return plan


def workloads(dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], None]]]:
    """(name, call) pairs; every call runs a public op forward and backward."""
    import sts_kernels as sts

    def pool(b: int, side: int, d: int) -> None:
        x = _inputs(b, side * side, d, dtype=dtype)
        _backward(sts.token_pool(x, (side, side), 2), x)

    def merge(b: int, n: int, d: int) -> None:
        x = _inputs(b, n, d, dtype=dtype)
        size = torch.ones(b, n)  # the op checks its values
        _keep(size)
        merged = sts.bipartite_merge(x, n // 2, size=size, protected=1)
        _keep(merged.index)
        _backward(sts.unmerge(merged.x, merged.index), x)

    def rows(mask_shape: tuple[int, ...], padded: bool) -> None:
        plan = _plan(mask_shape)
        x = _inputs(8, 4096, 4096, dtype=dtype)
        _backward(sts.gather_rows(x, plan, padded=padded), x)

    def glue(mask_shape: tuple[int, ...], padded: bool) -> None:
        # the skipper's gather + combine: the gather's backward adds rows in place (add_rows)
        from sts_kernels.ops.skip_glue import gather_for_layer

        plan = _plan(mask_shape)
        x = _inputs(8, 4096, 4096, dtype=dtype)
        rows, combine = gather_for_layer(x, plan, padded)
        _backward(combine(rows), x)

    def skip(mask_shape: tuple[int, ...], padded: bool, gate: bool, stats: bool, **kw) -> None:
        plan = _plan(mask_shape)
        x = _inputs(8, 4096, 4096, dtype=dtype)
        k = plan.num_active
        slots = (8, plan.max_count) if padded else (k,)  # padded [B, Kmax] or packed [K]
        delta = _inputs(*slots, *x.shape[len(mask_shape) :], dtype=dtype)
        g = _inputs(k, dtype=torch.float32) if gate else None
        out = sts.skip_residual(x, delta, plan, g, stats=stats, **kw)
        out = out[0] if stats else out
        _backward(out, *(t for t in (x, delta, g) if t is not None))

    # VTC: B=32 LLaVA-1.5 grids (24x24 = 576 tokens), D = 1024 (CLIP) and 4096 (LLM);
    # N = 9216 (96x96) for the large-N paths (B only sets the grid: 4 keeps memory low)
    for d in (1024, 4096):
        yield f"token_pool B32 N576 D{d}", lambda d=d: pool(32, 24, d)
        yield f"bipartite_merge+unmerge B32 N576 D{d}", lambda d=d: merge(32, 576, d)
    yield "token_pool B4 N9216 D1024", lambda: pool(4, 96, 1024)
    yield "bipartite_merge+unmerge B4 N9216 D1024", lambda: merge(4, 9216, 1024)
    # LDS: decoder rows B*T = 8*4096 = 32k, D = 4096; sample mode ([B] plan), token mode ([B, T])
    yield "route sample", lambda: sts.route(_mask((8,)))
    yield "route token", lambda: sts.route(_mask((8, 4096)))
    yield "skipper glue sample", lambda: glue((8,), padded=False)
    yield "skipper glue token padded", lambda: glue((8, 4096), padded=True)
    yield "gather_rows sample", lambda: rows((8,), padded=False)
    yield "gather_rows token padded", lambda: rows((8, 4096), padded=True)
    yield "skip_residual sample gate stats", lambda: skip((8,), False, True, True)
    yield "skip_residual sample", lambda: skip((8,), False, False, False)
    yield "skip_residual token gate", lambda: skip((8, 4096), False, True, False)
    yield "skip_residual token padded gate stats", lambda: skip((8, 4096), True, True, True)
    if "from_output" in inspect.signature(sts.skip_residual).parameters:
        # the output form: the layer's output y instead of the update y - x
        yield (
            "skip_residual sample from_output",
            lambda: skip((8,), False, True, False, from_output=True),
        )
        yield (
            "skip_residual token padded from_output",
            lambda: skip((8, 4096), True, True, True, from_output=True),
        )


# ---------------------------------------------------------------------------------------------
# compiling through a stand-in driver


class StandInDriver:
    """Just enough of a Triton driver to compile for `GPUTarget("cuda", arch, 32)`."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_benchmarker(self):
        # autotuning "times" every config by compiling it: all configs tie, all get compiled
        return lambda kernel_call, quantiles: (kernel_call(), [1.0] * len(quantiles))[1]


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def _ptxas_stats(log: str, kernel, arch: int) -> dict[str, int | None]:
    """Registers, spills and stack from the ptxas log Triton printed while building `kernel`;
    a Triton that prints none (older knobs) gets its PTX assembled once more with `ptxas -v`."""
    if _PTXAS["registers"].search(log) is None:
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
            ptx.write(kernel.asm["ptx"])
            ptx.flush()
            cmd = [get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}"]
            log = subprocess.run(
                [*cmd, ptx.name, "-o", os.devnull], capture_output=True, text=True, check=True
            ).stderr
    return {k: int(m.group(1)) if (m := r.search(log)) else None for k, r in _PTXAS.items()}


def _specialisation(kernel) -> str:
    """The compiled variant in short: its constexpr arguments and num_warps."""
    fn = kernel.src.fn
    consts = {k[0]: v for k, v in kernel.src.constants.items() if k[0] in fn.constexprs}
    parts = [f"{fn.arg_names[i]}={v}" for i, v in sorted(consts.items())]
    return " ".join([*parts, f"num_warps={kernel.metadata.num_warps}"])


def compile_all(arch: int) -> dict:
    """Run every workload at every dtype with kernels compiled for `arch`, never launched."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the kernels must be JITFunctions")
    import triton
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    import sts_kernels

    driver.set_active(StandInDriver(arch))
    triton.knobs.nvidia.dump_ptxas_log = True
    # CPU tensors reach the Triton path only when the backend believes Triton runs there
    sts_kernels._backend.triton_runs_on = lambda device: True
    # the matcher's bmm (aten, not Triton) would compute for seconds on the CPU: its values
    # never matter, only its output's shape and dtype
    merge = importlib.import_module("sts_kernels.ops.bipartite_merge")
    merge._dots = lambda a, b: a.new_empty(a.shape[0], a.shape[1], b.shape[1], dtype=torch.float32)

    stats: dict[str, dict] = {}  # compiled-kernel hash -> stats of that binary
    cases: dict[tuple[str, str], dict] = {}  # (kernel, dtype) -> {"workloads", "binaries"}
    errors: list[dict] = []
    current = {"dtype": "", "workload": ""}
    original_run = JITFunction.run

    def record_error(kernel: str | None, error: Exception) -> None:
        # a kernel's compile error is recorded once, not again by the workload it broke
        if not (errors and errors[-1].items() >= current.items()):
            errors.append(
                {"kernel": kernel, **current, "error": f"{type(error).__name__}: {error}"}
            )

    def compile_only(self, *args, grid, warmup, **kwargs):
        name = kernel_name(self)
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as error:
            record_error(name, error)
            raise
        if kernel.hash not in stats:
            shared = kernel.metadata.shared
            stats[kernel.hash] = {
                **_ptxas_stats(log.getvalue(), kernel, arch),
                "shared": shared,
                "shared_over_limit": shared > SHARED_LIMIT[arch],
                "specialisation": _specialisation(kernel),
            }
        case = cases.setdefault((name, current["dtype"]), {"workloads": [], "binaries": []})
        if current["workload"] not in case["workloads"]:
            case["workloads"].append(current["workload"])
        if kernel.hash not in case["binaries"]:
            case["binaries"].append(kernel.hash)
        # the launch never happens: give integer outputs and temporaries (indices, offsets)
        # in-range values for the glue that reads them
        for arg in (*args, *kwargs.values()):
            if (
                isinstance(arg, torch.Tensor)
                and not arg.is_floating_point()
                and arg.untyped_storage().data_ptr() not in _kept
            ):
                arg.zero_()
        return kernel

    JITFunction.run = compile_only
    try:
        with sts_kernels.use_backend("triton"):
            for dtype in DTYPES:
                current["dtype"] = str(dtype).removeprefix("torch.")
                for workload, call in workloads(dtype):
                    current["workload"] = workload
                    _kept.clear()
                    try:
                        call()
                    except Exception as error:  # one broken workload must not hide the others
                        record_error(None, error)
    finally:
        JITFunction.run = original_run
    rows = [
        _row(name, dtype, arch, [stats[h] for h in case["binaries"]], case["workloads"])
        for (name, dtype), case in sorted(cases.items())
    ]
    return {
        "arch": f"sm_{arch}",
        "kernels": discover(),
        "configs": autotune_configs(),
        "rows": rows,
        "errors": errors,
    }


def _row(kernel: str, dtype: str, arch: int, binaries: list[dict], workloads: list[str]) -> dict:
    """One kernel x dtype x target: the worst of its compiled variants."""
    worst = lambda key: max(b[key] or 0 for b in binaries)
    return {
        "kernel": kernel,
        "dtype": dtype,
        "arch": f"sm_{arch}",
        **{key: worst(key) for key in ("registers", "spill_stores", "spill_loads", "stack")},
        "shared": worst("shared"),
        "shared_over_limit": any(b["shared_over_limit"] for b in binaries),
        "binaries": binaries,
        "workloads": workloads,
    }


def format_table(rows: list[dict]) -> str:
    cols = ("kernel", "dtype", "arch", "registers", "spill_stores", "spill_loads", "stack")
    cols += ("shared", "binaries")
    cell = lambda r, c: str(len(r[c])) if c == "binaries" else str(r[c])
    table = [cols] + [tuple(cell(r, c).removeprefix("sts_kernels.") for c in cols) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in table)


def run_targets(archs=ARCHS, timeout: float = 600, cache_dir: str | None = None) -> dict:
    """Compile for every arch in parallel subprocesses (without TRITON_INTERPRET)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        env["TRITON_CACHE_DIR"] = cache_dir or os.path.join(tmp, "cache")  # fresh: ptxas runs
        procs = {
            arch: subprocess.Popen(
                [sys.executable, __file__, "--arch", str(arch), "--json", f"{tmp}/{arch}.json"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for arch in archs
        }
        results = {}
        for arch, proc in procs.items():
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for other in procs.values():
                    other.kill()
                raise
            if proc.returncode != 0:
                raise RuntimeError(
                    f"AOT compile for sm_{arch} failed (rc {proc.returncode}):\n{out}"
                )
            results[arch] = json.loads(Path(f"{tmp}/{arch}.json").read_text())
    # STS_COMMIT names the commit of a copy of the tree without .git
    commit = (
        os.environ.get("STS_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=RESULTS
        ).stdout.strip()
    )
    return {
        "commit": commit,
        "triton": importlib.metadata.version("triton"),
        "torch": torch.__version__,
        "kernels": results[archs[0]]["kernels"],
        "configs": results[archs[0]]["configs"],
        "rows": [r for a in archs for r in results[a]["rows"]],
        "errors": [e | {"arch": f"sm_{a}"} for a in archs for e in results[a]["errors"]],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--arch", type=int, help="one target, in this process")
    which.add_argument("--write", action="store_true", help="all targets -> bench/results/")
    parser.add_argument("--json", type=Path, help="where to write the result")
    args = parser.parse_args(argv)
    result = compile_all(args.arch) if args.arch is not None else run_targets()
    print(format_table(result["rows"]))
    for error in result["errors"]:
        print("ERROR", error)
    path = args.json or (RESULTS / f"aot-triton-{result['triton']}.json" if args.write else None)
    if path is not None:
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
