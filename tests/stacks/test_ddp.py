"""LayerDynamicSkipper and apply_sts under DistributedDataParallel with its default flags (gloo,
2 CPU processes).

A rank whose samples all skip a layer runs none of it; the skipper still joins the layer's
parameters to the autograd graph with zero gradients, so plain
`DistributedDataParallel(model)` (`find_unused_parameters=False`) sees every parameter used on
every rank and its all-reduce completes. Gradients then equal a single-process step on the
concatenated batch with the same skip decisions: for the plain skipper, and for a tiny HF LLaVA
patched by `apply_sts` (VTC + LDS), where a single process runs both ranks' micro-batches.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from sts_kernels.nn import LayerDynamicSkipper

pytestmark = pytest.mark.slow

WORLD, PER_RANK, T, D, CLASSES, LAYERS = 2, 3, 5, 16, 4, 4
TIMEOUT_S = 120  # spawn + 2 steps take ~5-40 s on 2 shared cores; a hang takes forever

# keep decisions per step, per layer (None: always-dense first/last layer), per global sample;
# step 0: rank 0 skips layer 1 entirely, step 1: rank 1 skips layer 2 entirely and nobody
# runs layer 1 (globally unused)
DECISIONS = [
    [None, [0, 0, 0, 1, 1, 0], [1, 0, 1, 1, 1, 1], None],
    [None, [0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], None],
]


class Block(nn.Module):
    """A residual MLP block: returns x + f(x), like a decoder layer."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.up = nn.Linear(D, 2 * D)
        self.down = nn.Linear(2 * D, D)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(D, D)
        self.skipper = LayerDynamicSkipper(
            nn.ModuleList(Block() for _ in range(LAYERS)), D, p_max=0.5
        )
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):  # [B, T, D] -> [B, CLASSES]
        return self.head(self.skipper(self.embed(x))).mean(1)


def fixed_decisions(skipper: LayerDynamicSkipper, samples: slice) -> list[int]:
    """Replace the skipper's random draws with DECISIONS for `samples`; returns a step counter."""
    step = [0]

    def decide(idx, hidden_states):
        keep = DECISIONS[step[0]][idx]
        if keep is None:
            return None, None
        keep = torch.tensor(keep, dtype=torch.bool)[samples]
        p = skipper._schedule_p(idx)
        return keep, torch.full(keep.shape, 1.0 / (1.0 - p))

    skipper.decide = decide
    return step


def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(WORLD * PER_RANK, T, D, generator=gen)
    y = torch.randint(0, CLASSES, (WORLD * PER_RANK,), generator=gen)
    return x, y


def copy_grad(param: nn.Parameter) -> torch.Tensor:
    return param.grad.clone() if param.grad is not None else torch.zeros_like(param)


def train_steps(model, step, x, y, grad_of=copy_grad) -> list[dict[str, torch.Tensor]]:
    """Gradients of every step (`grad_of(param)`: a copy, zeros for parameters that got none),
    no optimizer."""
    grads = []
    for i in range(len(DECISIONS)):
        step[0] = i
        F.cross_entropy(model(x), y).backward()
        grads.append({n: grad_of(p) for n, p in unwrap(model).named_parameters()})
        model.zero_grad(set_to_none=True)
    return grads


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def join_group(rank: int, port: int) -> None:
    """Join the 2-rank gloo group (one thread per rank: 2 cores)."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    torch.set_num_threads(1)


def start_rank(rank: int, port: int, state: dict):
    """Join the gloo group; this rank's copy of the net, its samples and its fixed decisions."""
    join_group(rank, port)
    net = Net()
    net.load_state_dict(state)
    samples = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return net, samples, fixed_decisions(net.skipper, samples)


def finish_rank(model: nn.Module, train, step, samples: slice, rank: int, out_dir: str) -> None:
    """Train this rank's samples with `train(model, step, x, y)`, save the gradients, leave."""
    x, y = data()
    grads = train(model, step, x[samples], y[samples])
    torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    # tear the wrapper down while the process group is alive: destroying DDP's reducer after
    # destroy_process_group() intermittently hangs at interpreter exit
    del model
    dist.barrier()
    dist.destroy_process_group()


def worker(rank: int, port: int, state: dict, out_dir: str) -> None:
    net, samples, step = start_rank(rank, port, state)
    model = nn.parallel.DistributedDataParallel(net)  # default flags
    del net  # finish_rank must hold the last reference
    finish_rank(model, train_steps, step, samples, rank, out_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(target, state: dict, out_dir: str, timeout_s: float = TIMEOUT_S) -> None:
    """Run `target(rank, port, state, out_dir)` on every rank; fail (killing them) on a hang."""
    ctx = mp.spawn(target, args=(free_port(), state, out_dir), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"DDP workers still running after {timeout_s} s (hang)")


def assert_ranks_match(out_dir, expected: list[dict], rtol: float = 1e-5) -> None:
    for rank in range(WORLD):
        got = torch.load(out_dir / f"rank{rank}.pt")
        for i, (g_step, e_step) in enumerate(zip(got, expected, strict=True)):
            assert g_step.keys() == e_step.keys()
            for name in e_step:
                torch.testing.assert_close(
                    g_step[name], e_step[name], rtol=rtol, atol=1e-6, msg=f"step {i} {name}"
                )


def expected_grads():
    """(initial state of Net, single-process gradients on the whole batch)."""
    torch.manual_seed(0)
    net = Net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    step = fixed_decisions(net.skipper, slice(None))
    x, y = data()
    expected = train_steps(net, step, x, y)
    assert expected[1]["skipper.layers.1.layer.up.weight"].abs().sum() == 0  # globally unused
    return state, expected


def test_ddp_skipped_layers_match_single_process(tmp_path):
    state, expected = expected_grads()
    spawn(worker, state, str(tmp_path))
    assert_ranks_match(tmp_path, expected)


# ---------------------------------------------------------------------------------------------
# a patched Hugging Face LLaVA

HF_ROWS = [[[5, 6], "image", [7, 8, 9]]] * (2 * WORLD)  # 2 rows per rank, one image each
# per step, the keep mask of each eligible decoder layer (1 and 2 of 4) over the global rows:
# step 0: rank 0 skips layer 1 entirely; step 1: nobody runs layer 1, rank 1 skips layer 2
HF_DECISIONS = [{1: [0, 0, 1, 1], 2: [1, 0, 1, 1]}, {1: [0, 0, 0, 0], 2: [1, 1, 0, 0]}]
HF_TIMEOUT_S = 240  # the spawn: transformers imports in each rank, 15-60 s on 2 shared cores


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
    # LLaVA takes features from the tower's hidden states, never through CLIP's post_layernorm:
    # default DDP needs such parameters frozen, patched or not
    model.model.vision_tower.post_layernorm.requires_grad_(False)
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


def hf_grads(model, where, steps_rows: list[list[slice]], grad_of=copy_grad) -> list[dict]:
    """Per step: backward of the mean of the losses of `rows` micro-batches; the gradients
    (`grad_of(param)`, default a copy; zeros for none)."""
    grads = []
    for step, micro in enumerate(steps_rows):
        where["step"] = step
        loss = 0
        for rows in micro:
            where["rows"] = rows
            loss = loss + model(**hf_batch(rows)).loss / len(micro)
        loss.backward()
        grads.append({n: grad_of(p) for n, p in unwrap(model).named_parameters()})
        model.zero_grad(set_to_none=True)
    return grads


def expected_hf_grads():
    """(initial state, single-process gradients of both ranks' micro-batches per step)."""
    model, where = patched_llava()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    both = [rank_rows(r) for r in range(WORLD)]
    expected = hf_grads(model, where, [both] * len(HF_DECISIONS))
    layer1 = "model.language_model.layers.1.mlp.up_proj.weight"
    assert expected[1][layer1].abs().sum() == 0  # globally skipped
    assert expected[0][layer1].abs().sum() > 0
    return state, expected


def hf_worker(rank: int, port: int, state: dict, out_dir: str) -> None:
    join_group(rank, port)
    model, where = patched_llava(state)
    ddp = nn.parallel.DistributedDataParallel(model)  # default flags
    grads = hf_grads(ddp, where, [[rank_rows(rank)]] * len(HF_DECISIONS))
    torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    del ddp  # DDP's reducer before the process group (exit hang otherwise)
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_default_flags_over_patched_llava_match_single_process(tmp_path):
    state, expected = expected_hf_grads()
    spawn(hf_worker, state, str(tmp_path), HF_TIMEOUT_S)
    assert_ranks_match(tmp_path, expected, rtol=1e-4)
