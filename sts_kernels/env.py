"""`python -m sts_kernels.env`: versions, devices, the backends this install can use and the
torch / CUDA architectures its build was made for."""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import subprocess

import torch

from . import _backend


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "not found"
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] if out else nvcc


def collect() -> dict[str, object]:
    """Everything `main` prints, as a dict (bench results embed it)."""
    info: dict[str, object] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "nvcc": _nvcc(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton_interpreter": _backend.triton_interpreter(),
        "requested_backend": _backend.requested_backend(),
        "backends_cpu": _backend.available_backends("cpu"),
        "backends_cuda": _backend.available_backends("cuda") if torch.cuda.is_available() else [],
    }
    # what the installed build was made for (torch, CUDA archs, PTX), readable even when the
    # extension cannot load into this torch
    info["build"] = _backend.build_record() or "no build record (a checkout never built)"
    ext = _backend.extension()
    if ext is not None:
        info["extension"] = dict(ext.build_info())
    else:
        info["extension"] = "not loaded" if _backend.has_built_extension() else "not built"
    return info


def main() -> None:
    for key, value in collect().items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:<20} {v}")
        else:
            print(f"{key:<20} {value}")


if __name__ == "__main__":
    main()
