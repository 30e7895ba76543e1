"""LayerDynamicSkipper and apply_sts under DeepSpeed ZeRO-3 (gloo, 2 CPU processes).

ZeRO-3 partitions every parameter across the ranks and gathers a module's parameters when the
module is called (a collective: every rank must call the same modules in the same order).
A rank whose rows all skip a layer would not call it: the ranks' gathers then mismatch (gloo
aborts, "Received data size doesn't match expected size") or, where they happen to line up,
ZeRO-3 refuses the `[0]`-shaped zero gradients of the still-partitioned parameters. The
skipper instead runs such a layer on one sample with a zero output gradient when its
parameters carry ZeRO-3's `ds_id`, so the gathers match and the gradients are exact zeros of
the full shape. Gradients (`safe_get_full_grad` after `engine.backward`) then equal a single
process with the same decisions, over two steps (rank 0 skips layer 1 entirely, then nobody
runs layer 1 and rank 1 skips layer 2 entirely): for a tiny HF LLaVA patched by `apply_sts`
(VTC + LDS, sample mode) and for the plain skipper in token mode.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_ddp import (
    DECISIONS,
    HF_DECISIONS,
    PER_RANK,
    WORLD,
    D,
    Net,
    assert_ranks_match,
    data,
    expected_hf_grads,
    fixed_decisions,
    hf_batch,
    join_group,
    patched_llava,
    rank_rows,
    spawn,
    train_steps,
)
from torch import nn

from sts_kernels.nn import LayerDynamicSkipper

# found, not imported: importing deepspeed picks its accelerator, which a rank sets first
if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("deepspeed is not installed (pip install -e .[test])", allow_module_level=True)
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed without gloo", allow_module_level=True)

pytestmark = pytest.mark.slow

TIMEOUT_S = 300  # the spawn: deepspeed (and transformers) import in each rank, 10-90 s


def zero3_engine(rank: int, port: int, model: nn.Module, micro_batch: int):
    """Join the gloo group; `model` under ZeRO-3 with every parameter partitioned, on the CPU
    accelerator, without deepspeed's shared-memory allreduce (a C++ extension compiled on
    first use, ~40 s on 2 cores, that gloo does not need)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ["LOCAL_RANK"] = str(rank)  # what deepspeed's launcher would set
    import deepspeed

    # by module name: the attribute `deepspeed.comm.torch` is PyTorch itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    join_group(rank, port)
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        # partition every parameter: by default those under 1e5 elements (all of these tiny
        # models') stay whole on every rank, and nothing would need gathering
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,  # torch's SGD
        "steps_per_print": 1_000_000,
    }
    # lr 0: the step runs ZeRO-3's optimizer path and clears the gradients, the weights stay
    # those the single-process reference uses at every step
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=sgd, config=config)
    assert all(p.numel() == 0 for p in model.parameters())  # partitioned between calls
    return engine


def zero3_grads(engine, loss_of_step, steps: int) -> list[dict[str, torch.Tensor]]:
    """Per step: `engine.backward(loss_of_step(step))`, every parameter's whole gradient (zeros
    for a frozen one), then `engine.step()`."""
    from deepspeed.utils import safe_get_full_grad

    grads = []
    for step in range(steps):
        engine.backward(loss_of_step(step))
        grads.append({})
        for name, param in engine.module.named_parameters():
            # a collective: every rank asks for the same parameters in the same order
            grad = safe_get_full_grad(param) if param.requires_grad else None
            grads[-1][name] = torch.zeros(param.ds_shape) if grad is None else grad.clone()
        engine.step()
    return grads


def save_and_leave(grads: list[dict], rank: int, out_dir: str) -> None:
    torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def hf_worker(rank: int, port: int, state: dict, out_dir: str) -> None:
    model, where = patched_llava(state)
    engine = zero3_engine(rank, port, model, micro_batch=2)

    def loss_of_step(step: int) -> torch.Tensor:
        where["step"], where["rows"] = step, rank_rows(rank)
        return engine(**hf_batch(rank_rows(rank))).loss

    save_and_leave(zero3_grads(engine, loss_of_step, len(HF_DECISIONS)), rank, out_dir)


def test_zero3_over_patched_llava_matches_single_process(tmp_path):
    state, expected = expected_hf_grads()
    spawn(hf_worker, state, str(tmp_path), TIMEOUT_S)
    assert_ranks_match(tmp_path, expected, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# the plain skipper in token mode


def token_net(samples: slice) -> tuple[Net, list[int]]:
    """test_ddp's Net with a token-mode skipper over the same blocks (same state_dict keys),
    following DECISIONS for `samples` on every other token of a kept sample; returns (net,
    step counter)."""
    torch.manual_seed(0)
    net = Net()
    blocks = nn.ModuleList(skippable.layer for skippable in net.skipper.layers)
    net.skipper = LayerDynamicSkipper(blocks, D, mode="token")
    step = fixed_decisions(net.skipper, samples)
    sample_decide = net.skipper.decide

    def decide(idx, hidden_states):
        keep, gate = sample_decide(idx, hidden_states)  # [b] of the samples
        if keep is None:
            return None, None
        every_other = torch.arange(hidden_states.shape[1]) % 2 == 0
        keep = keep[:, None] & every_other  # [b, T]
        return keep, gate[:, None].expand(keep.shape)

    net.skipper.decide = decide
    return net, step


def token_worker(rank: int, port: int, state: dict, out_dir: str) -> None:
    samples = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    net, step = token_net(samples)
    net.load_state_dict(state)
    engine = zero3_engine(rank, port, net, micro_batch=PER_RANK)
    x, y = data()

    def loss_of_step(i: int) -> torch.Tensor:
        step[0] = i
        return F.cross_entropy(engine(x[samples]), y[samples])

    save_and_leave(zero3_grads(engine, loss_of_step, len(DECISIONS)), rank, out_dir)


def test_zero3_token_mode_matches_single_process(tmp_path):
    net, step = token_net(slice(None))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    expected = train_steps(net, step, *data())
    assert WORLD == 2 and not any(DECISIONS[0][1][:PER_RANK])  # rank 0 skips layer 1 entirely
    spawn(token_worker, state, str(tmp_path), TIMEOUT_S)
    assert_ranks_match(tmp_path, expected)
