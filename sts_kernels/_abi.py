"""The ABI rule, shared by setup.py (which loads this file alone: the package's __init__
imports torch and the ops) and the extension loader: a compiled `sts_kernels._C` loads only
into the torch it was built against, named by CUDA flavour and major.minor version."""

from __future__ import annotations

BUILD_FILE = "_build.json"  # written by setup.py into the built package


def abi_tag(torch_version: str, torch_cuda: str | None) -> str:
    """('2.14.1+cu130', '13.0') -> 'cu130torch2.14'; ('2.13.0+cpu', None) -> 'cputorch2.13'.
    The local version tag of a wheel with the extension."""
    flavour = "cu" + torch_cuda.replace(".", "") if torch_cuda else "cpu"
    return flavour + "torch" + ".".join(torch_version.split("+")[0].split(".")[:2])
