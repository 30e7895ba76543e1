"""Backend selection: which implementation of an op runs for a given tensor.

Backends:
  reference  plain PyTorch (`sts_kernels.reference`), every op, every device
  triton     Triton kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
  cpp        the compiled extension `sts_kernels._C` (C++/OpenMP on CPU; CUDA kernels for
             routing in a CUDA build)

`TABLE` lists, per op, its compiled backends in order of preference and the device types each
serves; `select(op, device)` reads it and is the only place a backend is chosen. `auto` (the
default) picks the first backend of the op that serves the device and can run here (Triton on
GPUs, the CUDA extension's row copy for gather_rows, the C++ kernels on the CPU), else the
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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

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


@dataclass(frozen=True)
class Impl:
    """One compiled backend of an op: `backend` ("triton" or "cpp") and the device types its
    kernels serve. Triton also runs on the CPU under TRITON_INTERPRET=1, when forced."""

    backend: str
    devices: tuple[str, ...]


TRITON = Impl("triton", ("cuda",))
CPP = Impl("cpp", ("cpu", "cuda"))  # C++/OpenMP kernels and CUDA kernels (in a CUDA build)
CPP_CPU = Impl("cpp", ("cpu",))  # C++/OpenMP kernels only: Triton serves GPUs


@dataclass(frozen=True)
class OpBackends:
    """An op's compiled backends in order of preference (the reference always exists), and
    the `sts::` custom ops (kernels) each backend registers for it: `sts::<kernel>` in the
    extension, `sts::<kernel>_triton` for Triton (see `sts_kernels.ops`)."""

    impls: tuple[Impl, ...]
    kernels: tuple[str, ...]

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(impl.backend for impl in self.impls)


# The one table of which backend runs which op: `select` reads it, nothing else chooses.
TABLE: Mapping[str, OpBackends] = MappingProxyType(
    {
        "token_pool": OpBackends((TRITON,), ("token_pool", "token_pool_backward")),
        "bipartite_merge": OpBackends(
            (TRITON,), ("bipartite_match", "merge_index", "merge_wavg", "merge_wavg_backward")
        ),
        "unmerge": OpBackends((TRITON,), ("unmerge", "unmerge_backward")),
        "route": OpBackends((TRITON, CPP), ("route",)),
        # the CUDA extension's row copy first on a GPU
        "gather_rows": OpBackends((CPP, TRITON), ("gather_rows", "scatter_rows")),
        # the in-place row add of the skipper's gather backward (`ops.skip_glue`)
        "add_rows": OpBackends((TRITON, CPP_CPU), ("add_rows",)),
        "skip_residual": OpBackends((TRITON, CPP_CPU), ("skip_residual", "skip_residual_backward")),
    }
)


def _runs(backend: str, device: torch.device) -> bool:
    """The backend can run on `device` in this process (for some op)."""
    if backend == "triton":
        return triton_runs_on(device)
    return has_extension(device.type)


@torch.compiler.assume_constant_result
def select(op: str, device: torch.device) -> str:
    """The backend ("triton", "cpp" or "reference") that runs `op` on `device`, from `TABLE`.

    Under torch.compile the choice is a trace-time constant (dynamo cannot read the
    ContextVar behind `use_backend`): a compiled graph keeps the backend it was traced with.

    auto: the first of the op's backends that serves `device.type` and runs here, else the
    reference (on the CPU Triton is never chosen automatically, even under the interpreter).
    A forced backend the op does not implement is ignored for it; one the op implements but
    that cannot run here is an error, not a silent fallback, so a test that asks for Triton
    really runs Triton. A forced "cpp" whose extension runs here but has no kernels of this
    op for `device` (skip_residual on a GPU) runs the reference.
    """
    want = requested_backend()
    if want == "reference":
        return "reference"
    impls = TABLE[op].impls
    forced = next((impl for impl in impls if impl.backend == want), None)
    if forced is not None:
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
        return want if want == "triton" or device.type in forced.devices else "reference"
    for impl in impls:
        if device.type in impl.devices and _runs(impl.backend, device):
            return impl.backend
    return "reference"
