"""A patched tiny HF LLaVA (VTC + LDS) under DeepSpeed ZeRO-3 (gloo, 2 CPU processes).

ZeRO-3 partitions every parameter across the ranks and gathers a module's parameters when the
module is called (a collective: every rank must call the same modules in the same order).
A rank whose samples all skip a decoder layer would not call it: the ranks' gathers then
mismatch (gloo aborts, "Received data size doesn't match expected size") or, where they
happen to line up, ZeRO-3 refuses the `[0]`-shaped zero gradients of the still-partitioned
parameters. The skipper instead runs such a layer on one sample with a zero output gradient
when its parameters carry ZeRO-3's `ds_id`, so the gathers match and the gradients are exact
zeros of the full shape. Gradients (`safe_get_full_grad` after `engine.backward`) then equal a
single process running both ranks' micro-batches with the same decisions, over two steps:
rank 0 skips layer 1 entirely, then nobody runs layer 1 and rank 1 skips layer 2 entirely.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
from test_ddp import (
    HF_DECISIONS,
    assert_ranks_match,
    expected_hf_grads,
    hf_batch,
    join_group,
    patched_llava,
    rank_rows,
    spawn,
)

# found, not imported: importing deepspeed picks its accelerator, which a rank sets first
if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("deepspeed is not installed (pip install -e .[test])", allow_module_level=True)
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed without gloo", allow_module_level=True)

pytestmark = pytest.mark.slow

TIMEOUT_S = 300  # the spawn: transformers and deepspeed import in each rank, 20-90 s on 2 cores
ZERO3 = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    # partition every parameter: by default those under 1e5 elements (all of this tiny
    # model's) stay whole on every rank, and nothing would need gathering
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,  # torch's SGD
    "steps_per_print": 1_000_000,
}


def start_deepspeed(rank: int):
    """The deepspeed module, on the CPU accelerator, without its shared-memory allreduce (a
    C++ extension compiled on first use, ~40 s on 2 cores, that gloo does not need)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ["LOCAL_RANK"] = str(rank)  # what deepspeed's launcher would set
    import deepspeed

    # by module name: the attribute `deepspeed.comm.torch` is PyTorch itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


def full_grad(param: torch.nn.Parameter, safe_get_full_grad) -> torch.Tensor:
    """The whole gradient of a ZeRO-3 parameter (a collective for a trainable one: every rank
    asks for the same parameters in the same order), zeros for a frozen one."""
    grad = safe_get_full_grad(param) if param.requires_grad else None
    return torch.zeros(param.ds_shape) if grad is None else grad.clone()


def zero3_worker(rank: int, port: int, state: dict, out_dir: str) -> None:
    deepspeed = start_deepspeed(rank)
    from deepspeed.utils import safe_get_full_grad

    join_group(rank, port)
    model, where = patched_llava(state)
    # lr 0: the step runs ZeRO-3's optimizer path and clears the gradients, the weights stay
    # those the single-process reference uses at every step
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=sgd, config=ZERO3)
    layers = model.model.language_model.layers
    assert all(p.numel() == 0 for p in layers.parameters())  # partitioned between calls
    grads = []
    for step in range(len(HF_DECISIONS)):
        where["step"], where["rows"] = step, rank_rows(rank)
        engine.backward(engine(**hf_batch(rank_rows(rank))).loss)
        grads.append({n: full_grad(p, safe_get_full_grad) for n, p in model.named_parameters()})
        engine.step()
    torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_zero3_over_patched_llava_matches_single_process(tmp_path):
    state, expected = expected_hf_grads()
    spawn(zero3_worker, state, str(tmp_path), TIMEOUT_S)
    assert_ranks_match(tmp_path, expected, rtol=1e-4)
