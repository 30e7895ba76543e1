"""Triton launches a kernel on the current CUDA device and its stream, not on the device of the
tensors it is given: every Triton-backed custom op must make its inputs' device current."""

from __future__ import annotations

import importlib

import torch
from torch._library.custom_ops import CustomOpDef

from sts_kernels.ops import _common

OP_MODULES = ("bipartite_merge", "routing", "skip_residual", "token_pool")


def test_every_triton_op_runs_on_its_inputs_device():
    modules = [importlib.import_module(f"sts_kernels.ops.{name}") for name in OP_MODULES]
    ops = [v for m in modules for v in vars(m).values() if isinstance(v, CustomOpDef)]
    assert len(ops) >= 14, [op._qualname for op in ops]
    unguarded = [op._qualname for op in ops if not getattr(op._init_fn, "on_input_device", False)]
    assert not unguarded


def test_on_input_device_passes_cpu_calls_through(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d))
    wrapped = _common.on_input_device(lambda n, x, y=None: (n, x + 1, y))
    n, x, y = wrapped(3, torch.zeros(2), y=4)
    assert (n, x.tolist(), y) == (3, [1.0, 1.0], 4) and not entered
    assert wrapped.__wrapped__.__name__ == "<lambda>"
