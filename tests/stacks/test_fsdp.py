"""LayerDynamicSkipper under FSDP2 (`fully_shard`, gloo, 2 CPU processes), default flags.

A rank whose samples all skip a layer runs none of it, but the skipper joins the layer's
parameters to the graph with zero gradients, so every rank reduce-scatters every parameter
(no `set_reduce_scatter_unused_params` needed). `fully_shard` each `SkippableLayer`
(`skipper.layers[i]`), not the layer it wraps: the wrapper is called on every rank every step,
so every rank all-gathers the layer's parameters, whereas the inner layer is not called at all
on a rank that skips it entirely (its all-gather would be missing there and the ranks hang).
Gradients then equal a single-process step on the concatenated batch with the same decisions.

The same over a tiny HF LLaVA patched by `apply_sts` (VTC + LDS): `fully_shard` each decoder
layer (the patched layer is called on every rank; only its inner work is skipped), then the
root, which gathers the vision tower and projector (FSDP2 prepends its pre-forward hook, so it
runs before the patch's, which calls the tower). Do not shard a transformers `PreTrainedModel`
inside (e.g. the vision tower) on its own: FSDP2 renames its class and transformers then records
no `hidden_states` for it (its output-capture registry is keyed by class name), which LLaVA
needs. Gradients equal a single process running both ranks' micro-batches.
"""

from __future__ import annotations

import os
import time
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_ddp import (
    HF_DECISIONS,
    WORLD,
    Net,
    assert_ranks_match,
    expected_grads,
    expected_hf_grads,
    finish_rank,
    free_port,
    hf_grads,
    join_group,
    patched_llava,
    rank_rows,
    start_rank,
    train_steps,
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

TIMEOUT_S = 240  # the whole spawn: 3-40 s (plain), 15-60 s (LLaVA) on 2 shared cores
SETUP_ERROR = "setup_error.txt"  # written by a worker whose torch cannot shard on CPU


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
    finish_rank(model, partial(train_steps, grad_of=full_grad), step, samples, rank, out_dir)


def run_workers(state: dict, out_dir: str, target=worker) -> None:
    """Spawn the ranks; fail on a hang (kills them), skip if CPU sharding is unsupported."""
    ctx = mp.spawn(target, args=(free_port(), state, out_dir), nprocs=WORLD, join=False)
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
    state, expected = expected_grads()
    run_workers(state, str(tmp_path))
    assert_ranks_match(tmp_path, expected)


# ---------------------------------------------------------------------------------------------
# a patched Hugging Face LLaVA (helpers shared with test_ddp.py)


def hf_worker(rank: int, port: int, state: dict, out_dir: str) -> None:
    join_group(rank, port)
    model, where = patched_llava(state)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.language_model.layers:
        fsdp.fully_shard(layer, mesh=mesh)
    fsdp.fully_shard(model, mesh=mesh)  # default flags: skipped layers join with zeros
    grads = hf_grads(model, where, [[rank_rows(rank)]] * len(HF_DECISIONS), full_grad)
    torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp_over_patched_llava_matches_single_process(tmp_path):
    state, expected = expected_hf_grads()
    run_workers(state, str(tmp_path), target=hf_worker)
    assert_ranks_match(tmp_path, expected, rtol=1e-4)
