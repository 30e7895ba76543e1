"""`_backend.TABLE` is the one source of which backend runs which op: every op it names has
the custom ops it lists, by the naming rule (`sts::<kernel>` in the extension,
`sts::<kernel>_triton` for Triton), no `sts::` op exists outside it, and `select` answers as
the per-call-site preference tuples it replaced did, on every combination of device,
requested backend, Triton, interpreter and extension build."""

from __future__ import annotations

import itertools

import pytest
import torch

import sts_kernels  # noqa: F401  (registers the ops)
from sts_kernels import _backend, use_backend
from sts_kernels._backend import TABLE

PUBLIC_OPS = {"token_pool", "bipartite_merge", "unmerge", "route", "gather_rows", "skip_residual"}


def _op_names(backend: str) -> set[str]:
    suffix = "_triton" if backend == "triton" else ""
    return {
        f"sts::{kernel}{suffix}"
        for entry in TABLE.values()
        if backend in entry.backends
        for kernel in entry.kernels
    }


def test_table_covers_the_public_ops():
    assert set(TABLE) >= PUBLIC_OPS
    for op, entry in TABLE.items():
        assert entry.impls and len(set(entry.backends)) == len(entry.backends), op
        assert set(entry.backends) <= {"triton", "cpp"}, op
        for impl in entry.impls:
            assert impl.devices and set(impl.devices) <= {"cpu", "cuda"}, (op, impl)


def test_every_op_in_the_table_has_its_named_implementations():
    for name in _op_names("triton"):
        assert torch._C._dispatch_has_kernel(name), name
    ext = _backend.extension()
    if ext is None:
        pytest.skip("sts_kernels._C is not built")
    with_cuda = ext.build_info()["with_cuda"]
    for op, entry in TABLE.items():
        for impl in entry.impls:
            if impl.backend != "cpp":
                continue
            for kernel in entry.kernels:
                name = f"sts::{kernel}"
                assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
                if with_cuda:
                    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
                    assert has_cuda == ("cuda" in impl.devices), (op, name)


def test_no_sts_op_outside_the_table():
    """The naming rule, both ways: each registered `sts::` op is a kernel of the table, named
    `<kernel>_triton` for Triton and `<kernel>` in the extension."""
    registered = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("sts::")}
    expected = _op_names("triton")
    if _backend.extension() is not None:
        expected |= _op_names("cpp")
    assert registered == expected


# ---- select against the preference tuples it replaced -------------------------------------

# what the 7 call sites passed before the table (gather_rows twice: the plain and the skipper's
# gather), and `skip_residual.backend_for`, which sent the CPU-only C++ op's GPU choice to the
# reference
_OLD_TUPLES = {
    "token_pool": ("triton",),
    "bipartite_merge": ("triton",),
    "unmerge": ("triton",),
    "route": ("triton", "cpp"),
    "gather_rows": ("cpp", "triton"),
    "skip_residual": ("triton", "cpp"),
}


def _old_select(op: str, device: torch.device, implemented: tuple[str, ...]) -> str:
    """`_backend.select` before the table (verbatim logic, errors included)."""
    want = _backend.requested_backend()
    if want == "reference":
        return "reference"
    if want != "auto" and want in implemented:
        if want == "triton" and not _backend.triton_runs_on(device):
            raise RuntimeError(f"{op}: backend 'triton' was requested but cannot run")
        if want == "cpp" and not _backend.has_extension(device.type):
            raise RuntimeError(f"{op}: backend 'cpp' was requested but the extension")
        return want
    if device.type == "cuda":
        for name in implemented:
            if (name == "triton" and _backend.triton_runs_on(device)) or (
                name == "cpp" and _backend.has_extension("cuda")
            ):
                return name
        return "reference"
    if device.type == "cpu" and "cpp" in implemented and _backend.has_extension("cpu"):
        return "cpp"
    return "reference"


def _old_choice(op: str, device: torch.device) -> str:
    impl = _old_select(op, device, _OLD_TUPLES[op])
    if op == "skip_residual" and impl == "cpp" and device.type != "cpu":
        return "reference"  # the old backend_for
    return impl


def _answer(choose, op: str, device: torch.device) -> str:
    try:
        return choose(op, device)
    except RuntimeError:
        return "error"


SETTINGS = list(
    itertools.product(
        ("cpu", "cuda"),
        _backend.BACKENDS,
        (False, True),  # triton importable
        (False, True),  # TRITON_INTERPRET=1
        (False, True),  # extension built (CPU kernels)
        (False, True),  # ... with CUDA kernels
    )
)


@pytest.mark.parametrize(
    "device, want, triton, interpret, ext, ext_cuda",
    [s for s in SETTINGS if s[4] or not s[5]],
    ids=lambda v: str(v),
)
def test_select_answers_as_the_tuples_did(
    monkeypatch, device, want, triton, interpret, ext, ext_cuda
):
    monkeypatch.setattr(_backend, "has_triton", lambda: triton)
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpret else "0")
    monkeypatch.setattr(
        _backend,
        "has_extension",
        lambda device_type="cpu": (
            ext and (device_type == "cpu" or (device_type == "cuda" and ext_cuda))
        ),
    )
    device = torch.device(device)
    with use_backend(want):
        for op in _OLD_TUPLES:
            new = _answer(_backend.select, op, device)
            assert new == _answer(_old_choice, op, device), op


def test_add_rows_choice():
    """The gather backward's row add: Triton on a GPU, the C++ op on the CPU; the CUDA
    extension has no add kernel, so a GPU without Triton takes the reference (index_put_)."""
    assert _backend.TABLE["add_rows"].backends == ("triton", "cpp")
    assert _backend.TABLE["add_rows"].impls[1].devices == ("cpu",)
    cpu = torch.device("cpu")
    with use_backend("auto"):
        expected = "cpp" if _backend.has_extension("cpu") else "reference"
        assert _backend.select("add_rows", cpu) == expected


def test_select_is_a_trace_time_constant():
    """`@torch.compiler.assume_constant_result`: a compiled graph keeps the backend it was
    traced with (dynamo cannot read the ContextVar behind `use_backend`), in one graph."""

    def f(x):
        return x + (1 if _backend.select("token_pool", x.device) == "reference" else 2)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.zeros(2)
    with use_backend("reference"):
        assert torch.equal(compiled(x), x + 1)
    with use_backend("triton"):  # would raise eagerly on the CPU without the interpreter
        assert torch.equal(compiled(x), x + 1)
    torch._dynamo.reset()
