"""LayerDynamicSkipper under FSDP2 (`fully_shard`, gloo, 2 CPU processes).

A rank whose samples all skip a layer never uses that layer's parameters in its backward, so
FSDP2 by default reduce-scatters nothing for them there while the other rank does: gloo then
aborts on a collective mismatch ("Received data size doesn't match expected size"). The
supported setup, tested here:
- `fully_shard` each `SkippableLayer` (`skipper.layers[i]`), not the layer it wraps: the
  wrapper is called on every rank every step, so every rank all-gathers the layer's
  parameters, whereas the inner layer is not called at all on a rank that skips it entirely
  (its all-gather is then missing there and the ranks hang);
- `model.set_reduce_scatter_unused_params(True)` on the root: parameters without a gradient
  on a rank take part in the reduce-scatter with zeros (FSDP2's `find_unused_parameters`).
Gradients then equal a single-process step on the concatenated batch with the same decisions.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_ddp import (
    DECISIONS,
    WORLD,
    Net,
    data,
    finish_rank,
    fixed_decisions,
    free_port,
    start_rank,
)
from torch import nn

fsdp = pytest.importorskip("torch.distributed.fsdp", reason="torch without FSDP")
if not hasattr(fsdp, "fully_shard") or not hasattr(
    getattr(fsdp, "FSDPModule", None), "set_reduce_scatter_unused_params"
):
    pytest.skip(
        "torch without FSDP2 fully_shard / FSDPModule.set_reduce_scatter_unused_params",
        allow_module_level=True,
    )
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed without gloo", allow_module_level=True)

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

pytestmark = pytest.mark.slow

TIMEOUT_S = 20  # the whole spawn; a run takes about 3 s on 2 cores
SETUP_ERROR = "setup_error.txt"  # written by a worker whose torch cannot shard on CPU


def train_steps(model: nn.Module, step: list[int], x, y) -> list[dict[str, torch.Tensor]]:
    """Full (unsharded) gradients of every step (zeros for parameters that got none)."""
    grads = []
    for i in range(len(DECISIONS)):
        step[0] = i
        F.cross_entropy(model(x), y).backward()
        grads.append({n: full_grad(p) for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    return grads


def full_grad(param: nn.Parameter) -> torch.Tensor:
    if param.grad is None:
        return torch.zeros(param.shape)
    grad = param.grad
    # a collective: every rank calls it for the same parameters in the same order
    return grad.full_tensor() if isinstance(grad, DTensor) else grad.clone()


def shard(net: Net) -> Net:
    mesh = init_device_mesh("cpu", (WORLD,))
    for skippable in net.skipper.layers:
        fsdp.fully_shard(skippable, mesh=mesh)
    fsdp.fully_shard(net, mesh=mesh)
    net.set_reduce_scatter_unused_params(True)
    return net


def worker(rank: int, port: int, state: dict, out_dir: str) -> None:
    net, samples, step = start_rank(rank, port, state)
    try:
        model = shard(net)
    except (RuntimeError, NotImplementedError, ValueError) as err:
        with open(os.path.join(out_dir, SETUP_ERROR), "w") as f:
            f.write(f"{type(err).__name__}: {err}")
        raise
    if not all(isinstance(p, DTensor) for p in model.parameters()):
        raise AssertionError("fully_shard left parameters unsharded")
    del net  # the same module as model; finish_rank must hold the last reference
    finish_rank(model, train_steps, step, samples, rank, out_dir)


def run_workers(state: dict, out_dir: str) -> None:
    """Spawn the ranks; fail on a hang (kills them), skip if CPU sharding is unsupported."""
    ctx = mp.spawn(worker, args=(free_port(), state, out_dir), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"FSDP workers still running after {TIMEOUT_S} s (hang)")
    except Exception as err:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
        setup_error = os.path.join(out_dir, SETUP_ERROR)
        if os.path.exists(setup_error):
            with open(setup_error) as f:
                pytest.skip(f"FSDP2 on CPU/gloo unsupported here: {f.read()}")
        pytest.fail(str(err))


def test_fsdp_skipped_layers_match_single_process(tmp_path):
    torch.manual_seed(0)
    net = Net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    step = fixed_decisions(net.skipper, slice(None))
    x, y = data()
    expected = train_steps(net, step, x, y)
    assert expected[1]["skipper.layers.1.layer.up.weight"].abs().sum() == 0  # globally unused

    run_workers(state, str(tmp_path))
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for i, (g_step, e_step) in enumerate(zip(got, expected, strict=True)):
            assert g_step.keys() == e_step.keys()
            for name in e_step:
                torch.testing.assert_close(
                    g_step[name], e_step[name], rtol=1e-5, atol=1e-6, msg=f"step {i} {name}"
                )
