"""Count what a call would cost on a GPU, on the CPU: Triton launches, aten ops that launch a
kernel, and host synchronisations.

Under TRITON_INTERPRET=1 a Triton launch goes through `JITFunction.run` (wrapped here); aten
ops are seen by a TorchDispatchMode. Views and metadata-only ops launch nothing and are not
counted; `.item()`, `nonzero`, `is_nonzero` and `equal` read device memory on the host and
count as syncs (they also launch, so they count as kernels too).

    with count_kernels() as c:
        y = op(x)
    assert c.kernels <= 8 and c.syncs == 0, c
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# ops that allocate or change metadata only: no kernel on a GPU
_FREE = {
    aten.empty.memory_format,
    aten.empty_strided.default,
    aten.empty_like.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
    aten.detach.default,
    aten.lift_fresh.default,
    aten.set_.source_Storage_storage_offset,
}
_SYNC = {
    aten._local_scalar_dense.default,
    aten.item.default,  # what `.item()` inside a package op (re-entered mode) shows as
    aten.nonzero.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.masked_select.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.repeat_interleave.Tensor,
}


# the op's CPU kernel, called from inside the mode without re-entering Python dispatch
_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def _is_view_or_meta(func) -> bool:
    schema = func._schema
    if func in _FREE:
        return True
    if torch.Tag.view_copy in func.tags:
        return False
    # an op whose every output aliases an input (views, in-place metadata changes)
    return bool(schema.returns) and all(
        r.alias_info is not None and not r.alias_info.is_write for r in schema.returns
    )


@dataclass
class Counts:
    triton: int = 0
    aten: int = 0
    syncs: int = 0
    triton_names: Counter = field(default_factory=Counter)
    aten_names: Counter = field(default_factory=Counter)
    sts_names: Counter = field(default_factory=Counter)  # the package's ops that ran
    in_launch: bool = False

    @property
    def kernels(self) -> int:
        return self.triton + self.aten

    def __str__(self) -> str:
        return (
            f"{self.kernels} kernels ({self.triton} triton {dict(self.triton_names)}, "
            f"{self.aten} aten {dict(self.aten_names)}), {self.syncs} syncs"
        )


class _Mode(TorchDispatchMode):
    def __init__(self, counts: Counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "sts":
            # the package's own op: count what its implementation launches (Triton kernels
            # and aten ops, seen with this mode re-entered); a compiled C++/CUDA op with no
            # visible launch inside counts as one kernel
            before = self.counts.kernels
            with self:
                out = func.redispatch(_CPU, *args, **kwargs)
            self.counts.sts_names[func.__name__] += 1
            if self.counts.kernels == before:
                self.counts.aten += 1
                self.counts.aten_names[func.__name__] += 1
            return out
        out = func(*args, **kwargs)
        if self.counts.in_launch:  # the interpreter's own copies around a Triton launch
            return out
        if func in _SYNC:
            self.counts.syncs += 1
        if func is aten._to_copy.default:
            src = args[0]
            moves = kwargs.get("dtype", src.dtype) != src.dtype or (
                "device" in kwargs and torch.device(kwargs["device"]) != src.device
            )
            if not moves:
                return out
        elif _is_view_or_meta(func):
            return out
        self.counts.aten += 1
        self.counts.aten_names[str(func.overloadpacket.__name__)] += 1
        return out


def _launcher_classes() -> list[type]:
    """Triton's kernel classes whose `run` is one launch: the compiled JIT function and, under
    TRITON_INTERPRET=1, the interpreted one."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:  # no Triton: only aten / C++ work to count
        return []
    return [JITFunction, InterpretedFunction]


@contextlib.contextmanager
def _counting_launches(cls: type, counts: Counts) -> Iterator[None]:
    original = cls.run

    def run(self, *args, **kwargs):
        if not kwargs.get("warmup", False):
            counts.triton += 1
            counts.triton_names[getattr(self.fn, "__name__", "kernel")] += 1
        counts.in_launch = True
        try:
            return original(self, *args, **kwargs)
        finally:
            counts.in_launch = False

    cls.run = run
    try:
        yield
    finally:
        cls.run = original


@contextlib.contextmanager
def count_kernels() -> Iterator[Counts]:
    """Counts of the kernels and host syncs of the code run inside the block (CPU tensors;
    Triton kernels run under the interpreter and are counted once per launch)."""
    counts = Counts()
    patches = contextlib.ExitStack()
    for cls in _launcher_classes():
        patches.enter_context(_counting_launches(cls, counts))
    with patches, _Mode(counts):
        yield counts
