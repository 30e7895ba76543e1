"""Smoke test of an *installed* sts_kernels, run by tests/build/test_wheels.py with a fresh
virtualenv's python from outside the source tree: `python wheel_smoke.py KIND`, KIND one of

  pure          the pure-Python wheel: no extension, reference + Triton backends
  cpp           built from the sdist against this (CPU) torch: the C++ extension loads
  cuda          the CUDA wheel next to the torch it was built for (no GPU needed): CUDA kernels
                registered, cubins for sm_80 / sm_90 and compute_90 PTX in the library
  abi-mismatch  the CUDA wheel next to another torch: one clear warning, the extension is not
                loaded, the ops run on the reference / Triton backends

Exits non-zero (AssertionError) on the first failed check; prints what it saw as one JSON line.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

KIND = sys.argv[1]
ROUTING_OPS = ("sts::route", "sts::gather_rows", "sts::scatter_rows")
CUDA_ARCHS = ["sm_80", "sm_90"]
CUDA_PTX = ["compute_90"]

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch

    import sts_kernels as sts
    from sts_kernels import _backend

    backends = sts.available_backends("cpu")  # the extension is loaded (or refused) by now
ours = [str(w.message) for w in caught if "sts_kernels" in str(w.message)]


def installed_here() -> None:
    """The package imported is the installed one, not a source tree on sys.path."""
    site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    where = Path(sts.__file__).resolve().parent
    assert where.parent in site, f"imported {where}, not from this venv's {sorted(site)}"
    assert importlib.metadata.version("sts_kernels") == _backend.build_record()["version"]


def registered(dispatch_key: str) -> list[bool]:
    return [torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key) for op in ROUTING_OPS]


def cuobjdump() -> str:
    """cuobjdump from PATH, the CUDA toolkit, or the copy Triton's NVIDIA backend ships."""
    found = shutil.which("cuobjdump") or shutil.which("cuobjdump", path="/usr/local/cuda/bin")
    if found is None and importlib.util.find_spec("triton") is not None:
        bundled = Path(importlib.util.find_spec("triton").origin).parent
        candidate = bundled / "backends" / "nvidia" / "bin" / "cuobjdump"
        found = str(candidate) if candidate.exists() else None
    assert found is not None, "cuobjdump not found (PATH, /usr/local/cuda/bin, triton)"
    return found


def device_code() -> dict[str, str]:
    """cuobjdump's listing of the cubins (ELF) and PTX inside the installed `_C` library."""
    library = importlib.util.find_spec("sts_kernels._C").origin
    tool = cuobjdump()
    return {
        kind: subprocess.run(
            [tool, f"--list-{kind}", library], capture_output=True, text=True, check=True
        ).stdout
        for kind in ("elf", "ptx")
    }


def ops_agree_on_every_backend() -> None:
    """One small call of each op family per available CPU backend, equal to the reference."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, generator=gen)  # [B, 4*4 grid, D]
    mask = torch.tensor([True, False])  # sample 0 runs the layer, sample 1 skips it
    delta = torch.randn(1, 16, 8, generator=gen)  # [K, N, D]

    def run() -> list[torch.Tensor]:
        plan = sts.route(mask)
        return [
            sts.token_pool(x, grid=(4, 4), window=(2, 2)),  # [2, 4, 8]
            plan.index,
            sts.gather_rows(x, plan),  # [1, 16, 8]
            sts.skip_residual(x, delta, plan),  # [2, 16, 8]
        ]

    with sts.use_backend("reference"):
        expected = run()
    for backend in backends:
        with sts.use_backend(backend):
            for got, want in zip(run(), expected):
                torch.testing.assert_close(got, want, msg=lambda m, b=backend: f"{b}: {m}")


installed_here()
record = _backend.build_record()
seen: dict[str, object] = {"kind": KIND, "record": record, "backends": backends}
if KIND == "pure":
    assert record["extension"] is False and not _backend.has_built_extension(), record
    assert ours == [], ours
    assert backends == ["reference", "triton"], backends  # run with TRITON_INTERPRET=1
elif KIND == "cpp":
    assert record["extension"] and not record["cuda_kernels"], record
    assert record["torch"] == torch.__version__, record
    assert ours == [], ours
    assert "cpp" in backends and registered("CPU") == [True] * 3, backends
elif KIND == "cuda":
    assert record["cuda_kernels"] and record["torch"] == torch.__version__, record
    assert (record["cuda_archs"], record["ptx"]) == (CUDA_ARCHS, CUDA_PTX), record
    assert ours == [], ours
    info = _backend.extension().build_info()
    assert info["with_cuda"] and sorted(set(info["cuda_archs"])) == CUDA_ARCHS, info
    assert registered("CUDA") == [True] * 3 and registered("CPU") == [True] * 3
    code = device_code()
    assert all(f"sm_{a[3:]}" in code["elf"] for a in CUDA_ARCHS), code["elf"]
    assert "sm_90" in code["ptx"], code["ptx"]  # cuobjdump names PTX files by arch too
    seen["cuobjdump"] = code
elif KIND == "abi-mismatch":
    assert record["extension"] and record["torch"] != torch.__version__, record
    assert len(ours) == 1 and "ABI-bound" in ours[0], ours
    assert "sts_kernels._C" not in sys.modules, "the mismatched library was loaded"
    assert "cpp" not in backends, backends
    seen["warning"] = ours[0]
else:
    raise SystemExit(f"unknown KIND {KIND!r}")
ops_agree_on_every_backend()
env = subprocess.run(
    [sys.executable, "-m", "sts_kernels.env"], capture_output=True, text=True, check=True
).stdout
assert "build:" in env and record["version"] in env, env  # the build record is printed
assert all(arch in env for arch in record.get("cuda_archs", [])), env
seen["env"] = env
print(json.dumps(seen))
