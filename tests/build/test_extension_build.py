"""The compiled extension `sts_kernels._C`: its CPU kernels here, and (slow) a CUDA build with a
CUDA build of torch, checked for the CUDA kernels and the compiled architectures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sts_kernels import _backend

ROOT = Path(__file__).resolve().parents[2]
OPS = ("sts::route", "sts::gather_rows", "sts::scatter_rows")
# CPU kernels only, in every build: on a GPU skip_residual runs the Triton kernels
CPU_ONLY_OPS = ("sts::skip_residual", "sts::skip_residual_backward")
CUDA_ARCHS = ["sm_80", "sm_90"]


def test_cpu_extension_registers_cpu_kernels():
    ext = _backend.extension()
    if ext is None:
        pytest.skip("sts_kernels._C is not built (pip install --no-build-isolation -e .)")
    for op in OPS + CPU_ONLY_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op
    info = ext.build_info()
    assert set(info) == {
        "with_cuda",
        "cuda_archs",
        "openmp",
        "omp_max_threads",
        "compiler",
        "torch_version",
    }
    assert info["openmp"], "built without OpenMP: at::parallel_for would run on one thread"
    assert info["omp_max_threads"] >= 1
    assert torch.__version__.startswith(info["torch_version"])
    record = _backend.build_record()  # written by the same build (absent in older checkouts)
    if record is not None:
        assert record["extension"] and record["torch"] == torch.__version__, record
        assert record["cuda_kernels"] == info["with_cuda"], (record, info)
    if not info["with_cuda"]:
        assert info["cuda_archs"] == []


@pytest.mark.gpu
def test_extension_has_cuda_kernels_for_this_gpu():
    """On a GPU machine the installed extension was built with CUDA, for this GPU's arch."""
    ext = _backend.extension()
    if ext is None:
        pytest.skip("sts_kernels._C is not built (pip install --no-build-isolation -e .)")
    info = ext.build_info()
    assert info["with_cuda"], "built without CUDA on a machine with a GPU"
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    for op in CPU_ONLY_OPS:
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    major, minor = torch.cuda.get_device_capability()
    assert f"sm_{major}{minor}" in info["cuda_archs"], info["cuda_archs"]


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    bundled = Path(sys.prefix) / "lib"  # Triton ships one with its NVIDIA backend
    hits = sorted(bundled.glob("python3*/site-packages/triton/backends/nvidia/bin/cuobjdump"))
    return str(hits[0]) if hits else None


@pytest.mark.slow
def test_cuda_build_has_cuda_kernels_for_sm80_sm90(tmp_path):
    python = os.environ.get("STS_CUDA_PYTHON")
    if not python:
        pytest.skip("STS_CUDA_PYTHON is unset (point it to a python with CUDA torch)")
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    repo = tmp_path / "repo"
    shutil.copytree(
        ROOT,
        repo,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.so", "*.egg-info", "__pycache__", ".*_cache", "results"
        ),
    )
    env = dict(os.environ, STS_FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST="8.0;9.0", MAX_JOBS="2")
    env.pop("STS_NO_EXT", None)
    if "CUDA_HOME" not in env and Path("/usr/local/cuda/lib64").is_dir():
        # nvcc may be a wrapper script in /usr/local/bin, from which cpp_extension would guess
        # CUDA_HOME=/usr/local and miss libcudart
        env["CUDA_HOME"] = "/usr/local/cuda"
    start = time.perf_counter()
    build = subprocess.run(
        [python, "setup.py", "build_ext", "--inplace"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    seconds = time.perf_counter() - start
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    print(f"CUDA extension build: {seconds:.0f} s")

    probe = textwrap.dedent(
        f"""
        import json, torch
        import sts_kernels._C as ext
        ops = {list(OPS + CPU_ONLY_OPS)!r}
        print(json.dumps({{
            "cuda": [torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA") for op in ops],
            "cpu": [torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU") for op in ops],
            "info": ext.build_info(),
        }}))
        """
    )
    run = subprocess.run(
        [python, "-c", probe], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    # routing: CPU and CUDA kernels; skip_residual: CPU kernels only, by design
    assert result["cuda"] == [True] * len(OPS) + [False] * len(CPU_ONLY_OPS), result
    assert result["cpu"] == [True] * (len(OPS) + len(CPU_ONLY_OPS)), result
    assert result["info"]["with_cuda"] is True
    assert sorted(result["info"]["cuda_archs"]) == CUDA_ARCHS

    cuobjdump = _cuobjdump()
    if cuobjdump is not None:
        (so,) = (repo / "sts_kernels").glob("_C*.so")
        listing = subprocess.run(
            [cuobjdump, "--list-elf", str(so)], capture_output=True, text=True, check=True
        ).stdout
        assert all(arch in listing for arch in CUDA_ARCHS), listing


def test_unloadable_extension_warns_and_falls_back(tmp_path):
    """An `_C` built against another torch must not fail silently: the package warns and runs
    on the reference / Triton backends."""
    _assert_runs_without_extension(_package_with_broken_extension(tmp_path), "does not load")


def test_extension_built_for_another_torch_is_not_loaded(tmp_path):
    """The build record names another torch (a CUDA wheel next to the CPU torch): a clear ABI
    warning, and the library is not even opened (it could load and crash later)."""
    pkg = _package_with_broken_extension(tmp_path)
    record = {"version": "0.0.0+cu130torch9.9", "extension": True, "torch": "9.9.0+cu130"}
    record.update(torch_cuda="13.0", cuda_kernels=True, cuda_archs=["sm_90"], ptx=[])
    (pkg / "_build.json").write_text(json.dumps(record))
    _assert_runs_without_extension(pkg, "ABI-bound")


def _package_with_broken_extension(tmp_path: Path) -> Path:
    """A copy of the package whose `_C` library is garbage, without a build record."""
    pkg = tmp_path / "sts_kernels"
    shutil.copytree(
        ROOT / "sts_kernels",
        pkg,
        ignore=shutil.ignore_patterns("_C*.so", "_build.json", "__pycache__"),
    )
    (pkg / f"_C{_ext_suffix()}").write_bytes(b"not a shared object")
    return pkg


def _assert_runs_without_extension(pkg: Path, warning: str) -> None:
    """Importing `pkg` warns once with `warning`, and the ops run without the extension."""
    code = textwrap.dedent(
        f"""
        import warnings
        import torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import sts_kernels
            backends = sts_kernels.available_backends("cpu")
        ours = [str(w.message) for w in caught if "sts_kernels" in str(w.message)]
        assert len(ours) == 1 and {warning!r} in ours[0], ours
        assert "cpp" not in backends, backends
        x = torch.randn(2, 3, 4)
        plan = sts_kernels.route(torch.tensor([True, False]))
        assert sts_kernels.gather_rows(x, plan).shape == (1, 3, 4)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "STS_DISABLE_EXT"}
    env["PYTHONPATH"] = str(pkg.parent)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=pkg.parent, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def _ext_suffix() -> str:
    import sysconfig

    return sysconfig.get_config_var("EXT_SUFFIX")
