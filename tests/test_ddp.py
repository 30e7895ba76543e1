"""LayerDynamicSkipper under DistributedDataParallel (gloo, 2 CPU processes).

A rank whose samples all skip a layer never uses that layer's parameters in its backward.
Plain DDP then fails on the next iteration ("Expected to have finished reduction in the prior
iteration") because it waits for gradients that never come. The supported setup, tested here:
`DistributedDataParallel(model, find_unused_parameters=True)` (DDP walks the autograd graph
after each forward, marks the parameters it did not reach as ready and reduces zeros for
them), `static_graph=False` (the set of used parameters changes every step). Gradients then
equal a single-process step on the concatenated batch with the same skip decisions.
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
TIMEOUT_S = 45

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


def train_steps(model, step, x, y) -> list[dict[str, torch.Tensor]]:
    """Gradients of every step (zeros for parameters that got none), no optimizer."""
    grads = []
    for i in range(len(DECISIONS)):
        step[0] = i
        F.cross_entropy(model(x), y).backward()
        grads.append(
            {
                n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                for n, p in unwrap(model).named_parameters()
            }
        )
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
    model = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
    del net  # finish_rank must hold the last reference
    finish_rank(model, train_steps, step, samples, rank, out_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_skipped_layers_match_single_process(tmp_path):
    torch.manual_seed(0)
    net = Net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    step = fixed_decisions(net.skipper, slice(None))
    x, y = data()
    expected = train_steps(net, step, x, y)
    assert expected[1]["skipper.layers.1.layer.up.weight"].abs().sum() == 0  # globally unused

    ctx = mp.spawn(worker, args=(free_port(), state, str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"DDP workers still running after {TIMEOUT_S} s (hang)")
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for i, (g_step, e_step) in enumerate(zip(got, expected)):
            assert g_step.keys() == e_step.keys()
            for name in e_step:
                torch.testing.assert_close(
                    g_step[name], e_step[name], rtol=1e-5, atol=1e-6, msg=f"step {i} {name}"
                )
