"""Hand-built RoutePlans: structural mistakes raise ValueError before any kernel runs, value
mistakes raise ValueError under STS_DEBUG=1, and without it no backend crashes the process
(the C++ ops check on the host, the Triton and CUDA kernels treat out-of-range ids as "no
row"). Layouts PyTorch calls contiguous but a dtype view rejects go through every backend."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from kernel_count import count_kernels

import sts_kernels as sts
from sts_kernels import RoutePlan, _backend, reference

CPP = pytest.mark.skipif(not _backend.has_extension("cpu"), reason="extension not built")
BACKENDS = [pytest.param("cpp", marks=CPP), pytest.param("triton", marks=pytest.mark.interpreter)]


def _token_plan(**changes) -> RoutePlan:
    """rows (0, 0), (0, 2), (1, 1) of a [2, 3] mask, with `changes` applied."""
    fields = dict(
        index=torch.tensor([0, 2, 4]),
        counts=torch.tensor([2, 1]),
        offsets=torch.tensor([0, 2, 3]),
        shape=(2, 3),
    )
    fields.update(changes)
    return RoutePlan(**fields)


def _ops(plan: RoutePlan):
    """Every public op that takes a plan, on [2, 3, 4] activations."""
    x = torch.randn(2, 3, 4)
    k = len(plan.index)
    return {
        "gather": lambda: sts.gather_rows(x, plan),
        "gather_padded": lambda: sts.gather_rows(x, plan, padded=True),
        "skip_residual": lambda: sts.skip_residual(x, torch.randn(k, 4), plan),
        "skip_output": lambda: sts.skip_residual(x, torch.randn(k, 4), plan, from_output=True),
    }


STRUCTURE = {
    "index_int32": (
        dict(index=torch.tensor([0, 2, 4], dtype=torch.int32)),
        "plan.index must be int64",
    ),
    "index_2d": (dict(index=torch.tensor([[0, 2, 4]])), "plan.index must have 1 dims"),
    "index_list": (dict(index=[0, 2, 4]), "plan.index must be a torch.Tensor"),
    "counts_shape": (dict(counts=torch.tensor([2, 1, 0])), r"plan.counts must have shape \(2,\)"),
    "offsets_shape": (dict(offsets=torch.tensor([0, 3])), r"plan.offsets must have shape \(3,\)"),
    "too_many_rows": (dict(index=torch.arange(7)), "plan.index must have at most R=6"),
    "row_map_shape": (dict(row_map=torch.full((5,), -1)), r"plan.row_map must have shape \(6,\)"),
    "bad_shape": (dict(shape=(2, -3)), "plan.shape must be"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(STRUCTURE))
def test_malformed_plan_raises_before_any_kernel(case, backend):
    changes, message = STRUCTURE[case]
    plan = _token_plan(**changes)
    for name, call in _ops(plan).items():
        with (
            sts.use_backend(backend),
            count_kernels() as counted,
            pytest.raises((ValueError, TypeError), match=message),
        ):
            call()
        assert counted.triton == 0 and not counted.sts_names, (name, counted)


VALUES = {
    "index_out_of_range": (dict(index=torch.tensor([0, 2, 9])), r"row ids in \[0, 6\)"),
    "index_negative": (dict(index=torch.tensor([-1, 2, 4])), r"row ids in \[0, 6\)"),
    "index_not_ascending": (dict(index=torch.tensor([2, 0, 4])), "strictly ascending"),
    "counts_wrong": (
        dict(counts=torch.tensor([1, 2]), offsets=torch.tensor([0, 1, 3])),
        "plan.counts",
    ),
    "offsets_wrong": (dict(offsets=torch.tensor([0, 1, 3])), "plan.offsets"),
    "row_map_wrong": (dict(row_map=torch.tensor([0, -1, 1, -1, 1, -1])), "plan.row_map"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(VALUES))
def test_bad_plan_values_raise_in_debug_mode(case, backend, monkeypatch):
    monkeypatch.setenv("STS_DEBUG", "1")
    changes, message = VALUES[case]
    plan = _token_plan(**changes)
    for name, call in _ops(plan).items():
        with (
            sts.use_backend(backend),
            count_kernels() as counted,
            pytest.raises(ValueError, match=message),
        ):
            call()
        assert counted.triton == 0 and not counted.sts_names, (name, counted)


def test_bad_plan_values_never_crash_without_debug_mode():
    """In a subprocess, so a crash fails this test instead of killing pytest: the C++ ops raise
    RuntimeError (checked on the host, outside any parallel region), the Triton kernels stay
    in bounds. Includes the call that segfaulted the first GPU run."""
    script = textwrap.dedent(
        """
        import os
        os.environ["TRITON_INTERPRET"] = "1"
        import torch
        import sts_kernels as sts
        from sts_kernels import RoutePlan, _backend
        results = []
        if _backend.has_extension("cpu"):
            for rows in ([0, 4], [-2, 1], [1 << 40]):
                try:
                    torch.ops.sts.gather_rows(torch.randn(4, 2), torch.tensor(rows))
                    results.append("cpp-gather-ran")
                except RuntimeError as error:
                    results.append("cpp-gather-raised" if "not a row id" in str(error) else repr(error))
        plan = RoutePlan(torch.tensor([0, 2, 1 << 40]), torch.tensor([2, 1]),
                         torch.tensor([0, 2, 3]), (2, 3))
        x = torch.randn(2, 3, 4)
        for backend in ["cpp", "triton"] if _backend.has_extension("cpu") else ["triton"]:
            for name, call in {
                "gather": lambda: sts.gather_rows(x, plan),
                "skip": lambda: sts.skip_residual(x, torch.randn(3, 4), plan, from_output=True),
            }.items():
                try:
                    with sts.use_backend(backend):
                        call()
                    results.append(f"{backend}-{name}-ran")
                except RuntimeError:
                    results.append(f"{backend}-{name}-raised")
        print(" ".join(results))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = done.stdout.split()
    if _backend.has_extension("cpu"):
        assert results[:3] == ["cpp-gather-raised"] * 3
        assert "cpp-gather-raised" in results and "cpp-skip-raised" in results
    assert "triton-gather-ran" in results and "triton-skip-ran" in results


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("padded", [False, True])
def test_size_one_last_dim_with_odd_stride(backend, padded):
    """`randn(2, 1, 4).permute(0, 2, 1)`: contiguous by PyTorch's rules (the size-1 dim's
    stride is 4), rejected by a dtype view unless reshaped first."""
    x = torch.randn(2, 1, 4).permute(0, 2, 1)  # [2, 4, 1], strides (4, 1, 4)
    assert x.is_contiguous() and x.stride(-1) != 1
    plan = reference.route(torch.tensor([[True, False, True, True], [False, True, False, False]]))
    leaf = x.detach().requires_grad_()
    with sts.use_backend(backend):
        out = sts.gather_rows(leaf, plan, padded=padded)
        expected = reference.gather_rows(x, plan, padded=padded)
        assert torch.equal(out, expected)
        grad = torch.randn(out.shape[-1], *out.shape[:-1]).movedim(0, -1)  # odd strides too
        out.backward(grad)
        ref_leaf = x.detach().requires_grad_()
        reference.gather_rows(ref_leaf, plan, padded=padded).backward(grad)
        assert torch.equal(leaf.grad, ref_leaf.grad)
        # skip_residual on the same layout
        y = torch.randn(plan.num_active, 1).t().reshape(plan.num_active, 1)
        got = sts.skip_residual(x, y, plan, from_output=True)
        assert torch.equal(got, reference.skip_residual(x, y, plan, from_output=True))
