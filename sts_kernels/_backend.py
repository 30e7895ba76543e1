"""Backend selection: which implementation of an op runs for a given tensor.

Backends:
  reference  plain PyTorch (`sts_kernels.reference`), every op, every device
  triton     Triton kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
  cpp        the compiled extension `sts_kernels._C` (C++/OpenMP on CPU, CUDA on GPU)

`auto` (the default) picks per op and device: on a GPU the op's preferred compiled backend
(Triton or the CUDA extension), on the CPU the C++ extension where the op has one, else the
reference. `STS_BACKEND=<name>` or `with use_backend(name):` forces a backend for the ops that
implement it; the other ops keep their automatic choice.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ._abi import BUILD_FILE, abi_tag
from ._triton import HAS_TRITON

BACKENDS = ("auto", "reference", "triton", "cpp")

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("sts_backend", default=None)


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def requested_backend() -> str:
    """The backend asked for by `use_backend` (innermost) or else `STS_BACKEND` (default auto)."""
    forced = _forced.get()
    if forced is not None:
        return forced
    return _validate(os.environ.get("STS_BACKEND", "auto").strip().lower() or "auto")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force `name` for the ops called inside the block (thread- and task-local)."""
    token = _forced.set(_validate(name))
    try:
        yield
    finally:
        _forced.reset(token)


def has_triton() -> bool:
    """Triton imports (an installed but broken Triton counts as missing)."""
    return HAS_TRITON


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def build_record() -> dict | None:
    """How this install was built, from `_build.json` (written by setup.py): version,
    extension, torch, torch_cuda, cuda_archs, ptx. None in a checkout that was never built."""
    try:
        return json.loads(Path(__file__).with_name(BUILD_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def _abi_mismatch(record: dict) -> str | None:
    """Why the recorded extension build cannot load into this torch, or None if it can."""
    built = abi_tag(record["torch"], record["torch_cuda"])
    here = abi_tag(torch.__version__, torch.version.cuda)
    if built == here:
        return None
    return (
        f"sts_kernels {record['version']} was built for torch {record['torch']} ({built}) but "
        f"this is torch {torch.__version__} ({here}). Its compiled extension sts_kernels._C is "
        "ABI-bound to the torch it was built against, so it is not loaded: the ops run on the "
        f"reference / Triton backends. For the compiled kernels install the wheel tagged +{here}, "
        "or build from source against this torch: pip install --no-build-isolation sts_kernels"
        "-<version>.tar.gz (or the pure-Python wheel to silence this)."
    )


def has_built_extension() -> bool:
    """A compiled `_C` file is installed (whether or not it loads into this torch)."""
    return importlib.util.find_spec(f"{__package__}._C") is not None


@functools.cache
def extension():
    """The compiled module `sts_kernels._C`, or None when it was not built (STS_NO_EXT=1), is
    disabled (STS_DISABLE_EXT=1), or was built for another torch (warns)."""
    if os.environ.get("STS_DISABLE_EXT", "0") == "1":
        return None
    record = build_record()
    if record is not None and record["extension"]:
        # check before importing: a library bound to another torch may fail to load, or load
        # and crash later
        mismatch = _abi_mismatch(record)
        if mismatch is not None:
            warnings.warn(mismatch, RuntimeWarning, stacklevel=2)
            return None
    try:
        from . import _C
    except ImportError as error:
        if has_built_extension():
            # built, but against another torch (e.g. an isolated `pip install .` build env)
            warnings.warn(
                f"sts_kernels._C exists but does not load ({error}); running without the "
                "extension. Rebuild it against this torch: "
                "pip install --no-build-isolation --force-reinstall .",
                RuntimeWarning,
                stacklevel=2,
            )
        return None
    return _C


def has_extension(device_type: str = "cpu") -> bool:
    ext = extension()
    if ext is None:
        return False
    return device_type == "cpu" or (device_type == "cuda" and bool(ext.build_info()["with_cuda"]))


def triton_runs_on(device: torch.device) -> bool:
    return has_triton() and (
        device.type == "cuda" or (device.type == "cpu" and triton_interpreter())
    )


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on `device` in this process."""
    device = torch.device(device)
    names = ["reference"]
    if triton_runs_on(device):
        names.append("triton")
    if has_extension(device.type):
        names.append("cpp")
    return names


@torch.compiler.assume_constant_result
def select(op: str, device: torch.device, implemented: Sequence[str]) -> str:
    """Pick the backend for `op` on `device`.

    Under torch.compile the choice is a trace-time constant (dynamo cannot read the
    ContextVar behind `use_backend`): a compiled graph keeps the backend it was traced with.

    `implemented` lists the op's compiled backends in order of preference on a GPU (the
    reference always exists). A forced backend the op does not implement is ignored for it;
    a forced backend the op implements but that cannot run here is an error, not a silent
    fallback, so a test that asks for Triton really runs Triton.
    """
    want = requested_backend()
    if want == "reference":
        return "reference"
    if want != "auto" and want in implemented:
        if want == "triton" and not triton_runs_on(device):
            raise RuntimeError(
                f"{op}: backend 'triton' was requested but cannot run on {device} "
                f"(triton installed: {has_triton()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})"
            )
        if want == "cpp" and not has_extension(device.type):
            raise RuntimeError(
                f"{op}: backend 'cpp' was requested but the extension sts_kernels._C "
                f"{'is not built' if extension() is None else 'has no ' + device.type + ' kernels'}"
            )
        return want
    if device.type == "cuda":
        for name in implemented:
            if (name == "triton" and triton_runs_on(device)) or (
                name == "cpp" and has_extension("cuda")
            ):
                return name
        return "reference"
    if device.type == "cpu" and "cpp" in implemented and has_extension("cpu"):
        return "cpp"
    return "reference"
