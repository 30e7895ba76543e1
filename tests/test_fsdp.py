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
    join_group,
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

TIMEOUT_S = 60  # the whole spawn; a run takes about 3 s (plain) / 15 s (LLaVA) on 2 cores
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


# ---------------------------------------------------------------------------------------------
# a patched Hugging Face LLaVA

HF_ROWS = [[[5, 6], "image", [7, 8, 9]]] * (2 * WORLD)  # 2 rows per rank, one image each
# per step, the keep mask of each eligible decoder layer (1 and 2 of 4) over the global rows:
# step 0: rank 0 skips layer 1 entirely; step 1: nobody runs layer 1, rank 1 skips layer 2
HF_DECISIONS = [{1: [0, 0, 1, 1], 2: [1, 0, 1, 1]}, {1: [0, 0, 0, 0], 2: [1, 1, 0, 0]}]


def rank_rows(rank: int) -> slice:
    return slice(2 * rank, 2 * rank + 2)


def patched_llava(state: dict | None = None):
    """A tiny LLaVA (VTC + LDS) whose skipper follows HF_DECISIONS for `where["rows"]` at
    step `where["step"]`; returns (model, where)."""
    from hf_models import make_llava

    from sts_kernels.integrations.hf import apply_sts

    model = make_llava()
    if state is not None:
        model.load_state_dict(state)
    skipper = apply_sts(model).skipper
    where = {"step": 0, "rows": slice(None)}

    def decide(idx, hidden_states):
        keep = HF_DECISIONS[where["step"]].get(idx)
        if keep is None:
            return None, None
        keep = torch.tensor(keep, dtype=torch.bool)[where["rows"]]
        return keep, torch.full(keep.shape, 1.0 / (1.0 - skipper._schedule_p(idx)))

    skipper.decide = decide
    model.train()
    return model, where


def hf_batch(rows: slice) -> dict:
    from hf_models import llava_batch

    batch = llava_batch(pad_left=False, images=len(HF_ROWS), rows=HF_ROWS)
    return {k: v[rows] for k, v in batch.items()}


def hf_grads(model, where, steps_rows: list[list[slice]]) -> list[dict[str, torch.Tensor]]:
    """Per step: backward of the mean of the losses of `rows` micro-batches; full gradients."""
    grads = []
    for step, micro in enumerate(steps_rows):
        where["step"] = step
        loss = 0
        for rows in micro:
            where["rows"] = rows
            loss = loss + model(**hf_batch(rows)).loss / len(micro)
        loss.backward()
        grads.append({n: full_grad(p) for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    return grads


def hf_worker(rank: int, port: int, state: dict, out_dir: str) -> None:
    join_group(rank, port)
    model, where = patched_llava(state)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.language_model.layers:
        fsdp.fully_shard(layer, mesh=mesh)
    fsdp.fully_shard(model, mesh=mesh)
    model.set_reduce_scatter_unused_params(True)
    grads = hf_grads(model, where, [[rank_rows(rank)]] * len(HF_DECISIONS))
    torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp_over_patched_llava_matches_single_process(tmp_path):
    model, where = patched_llava()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    both = [rank_rows(r) for r in range(WORLD)]
    expected = hf_grads(model, where, [both] * len(HF_DECISIONS))
    layer1 = "model.language_model.layers.1.mlp.up_proj.weight"
    assert expected[1][layer1].abs().sum() == 0  # globally skipped
    assert expected[0][layer1].abs().sum() > 0

    run_workers(state, str(tmp_path), target=hf_worker)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for i, (g_step, e_step) in enumerate(zip(got, expected, strict=True)):
            assert g_step.keys() == e_step.keys()
            for name in e_step:
                torch.testing.assert_close(
                    g_step[name], e_step[name], rtol=1e-4, atol=1e-6, msg=f"step {i} {name}"
                )
