"""End-to-end STS demo: train a small LLaVA, Qwen2.5-VL or another VLM family (random init, built
from a config; `--model`, bench/demo_models.py) on the synthetic task of bench/task.py under dense / VTC / LDS / VTC+LDS with the same seed, data
and steps, and compare step time, throughput, memory, executed LM FLOPs, loss and held-out
accuracy.

The settings train side by side: each round runs one step of every setting (the order rotates
per round), so machine load that changes over the run hits all settings alike. A setting's
`meas.` ratio is the median over rounds of its step time over dense's in the same round; the
table gives that ratio's interquartile range. Losses and accuracies are reproducible from the
seed on the same machine and thread count (tests/bench/test_demo.py runs a short demo twice).

    python -m bench                       # defaults: a few minutes on a 2-core CPU
    python -m bench --model qwen2_5_vl    # the same comparison on a tiny Qwen2.5-VL
    python -m bench --model gemma3        # ... or any family of `--help`'s --model choices
    python -m bench --device cuda --steps 600 --model-size small
    torchrun --nproc-per-node 2 -m bench  # DDP (gloo on CPU), default flags; rank 0 reports

Writes `bench/results/demo_<model>_<device>_<date>.json` and `.png` (loss, accuracy, step time).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from . import detail_task, flops
from .demo_models import END, FAMILIES, PLACEHOLDER, START
from .task import Batch, TaskConfig, answer_accuracy, make_batch
from .timing import peak_memory_mb

SETTINGS = ("dense", "vtc", "lds", "vtc+lds")
MODELS = tuple(FAMILIES)  # --model: bench/demo_models.py's registry
# which STS parts each setting turns on (apply_sts stage presets)
_STAGE = {"vtc": "align", "lds": "instruct", "vtc+lds": None}
# Qwen: vision start / end and placeholder ids inside the task's vocabulary (unused by it)
QWEN_START, QWEN_END, QWEN_IMAGE = START, END, PLACEHOLDER
# --task: (config class, batch maker); both tasks share the vocabulary and the sequence layout
TASKS = {
    "default": (TaskConfig, make_batch),
    "detail": (detail_task.DetailConfig, detail_task.make_batch),
}


@dataclass(frozen=True)
class ModelSize:
    vision_hidden: int
    vision_layers: int
    text_hidden: int
    text_layers: int
    heads: int

    @property
    def vision_intermediate(self) -> int:
        return 2 * self.vision_hidden

    @property
    def text_intermediate(self) -> int:
        return 2 * self.text_hidden


MODEL_SIZES = {
    "tiny": ModelSize(vision_hidden=64, vision_layers=2, text_hidden=256, text_layers=6, heads=4),
    "small": ModelSize(vision_hidden=128, vision_layers=4, text_hidden=512, text_layers=8, heads=8),
}


def build_model(kind: str, size: ModelSize, task: TaskConfig, seed: int):
    """The family `kind` (bench/demo_models.py: e.g. a LLaVA with CLIP tower, 2-layer MLP
    projector and Llama LM, or a Qwen2.5-VL with window-attention tower, 2x2 patch merger and
    Qwen2 LM) with random weights, SDPA attention: the tests' tiny makers (bench/models.py) at
    `size`, with the task's vocabulary and image. Every family feeds the LM task.image_tokens
    visual tokens per image."""
    return FAMILIES[kind].build(size, task, seed)


def model_inputs(kind: str, batch: Batch, task: TaskConfig) -> dict[str, torch.Tensor]:
    """The model's forward arguments for a task batch, laid out as the family's processor
    would (bench/demo_models.py; Qwen: the image's placeholders between vision start / end
    tokens, the pixels cut into the processor's flat patches)."""
    return FAMILIES[kind].inputs(batch.model_inputs(), task)


def pack_rows(inputs: dict[str, torch.Tensor], model) -> dict:
    """The batch as ONE packed row, laid out as `DataCollatorWithFlattening(
    return_flash_attn_kwargs=True)` builds it (bench/packing.py: positions restarting per
    sample, cu_seq_lens_q/k, max_length_q/k, each sample's first label -100, no attention
    mask; Qwen: [4, 1, T] M-RoPE positions), with use_cache=False."""
    from .packing import pack, split_rows

    packed = pack(split_rows(inputs), model)
    return {**packed, "use_cache": False}


def ideal_ratio(model, task: TaskConfig, batch: int, visual_tokens: float, layer_frac: float):
    """Step FLOPs over dense's (bench/flops.py; every part trained, no checkpointing) with
    `visual_tokens` per image reaching the LM and `layer_frac` of the LM's layer rows run.
    Families bench/flops.py does not model (it has LLaVA with CLIP and Qwen2.5-VL): the LM's
    FLOPs only."""
    try:
        cost = flops.from_hf_config(model.config)
    except ValueError:
        cost = flops.from_hf_config(model.config.get_text_config())
    work = flops.Workload(batch, task.seq_len - task.image_tokens, 1, (task.image_size,) * 2)
    sparsity = flops.Sparsity(visual_tokens, layer_frac)
    return flops.ratio(cost, work, flops.STAGES["full"], sparsity)


@dataclass
class Result:
    setting: str
    step_time_ms: float = 0.0  # median over timed rounds
    tokens_per_s: float = 0.0  # the batch's tokens (as given, before compression) per second
    peak_memory_mb: float | None = None  # peak of one forward+backward (activations, grads)
    executed_fraction: float = 1.0  # LM layer-FLOPs executed vs dense (mean over steps)
    visual_tokens_per_image: float = 0.0  # what the LM saw, mean over steps
    layer_fraction: float = 1.0  # skipper's executed fraction (mean over steps)
    final_loss: float = 0.0  # mean of the last 10% of steps
    accuracy: float = 0.0  # held-out answer accuracy, model served dense (unpatched)
    accuracy_compressed_eval: float | None = None  # VTC settings: with the VTC on at eval
    accuracy_by_question: dict = field(default_factory=dict)
    ideal_ratio: float = 1.0  # FLOP ratio vs dense (bench/flops.py)
    measured_ratio: float = 1.0  # median over rounds of step time / dense's in that round
    ratio_iqr: tuple = (1.0, 1.0)  # 25th and 75th percentile of those per-round ratios
    losses: list = field(default_factory=list)
    step_times_ms: list = field(default_factory=list)  # one per round, in round order
    eval_curve: list = field(default_factory=list)  # (step, accuracy)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _world() -> tuple[int, int]:
    """(rank, world size) under torchrun, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Run:
    """One setting: its model (DDP-wrapped under torchrun), optimizer, schedule and records."""

    def __init__(self, setting: str, args, task: TaskConfig, device: torch.device):
        from sts_kernels.integrations.hf import apply_sts

        self.setting, self.args, self.task, self.device = setting, args, task, device
        self.size = MODEL_SIZES[args.model_size]
        self.model = build_model(args.model, self.size, task, args.seed).to(device)
        self.model.train()
        self.handle = None
        rank, world = _world()
        if setting != "dense":
            # explicit arguments override the stage preset, so pass False for the part left out
            compress = {"mode": "pool", "window": (2, 2)}
            skip = {"policy": "schedule", "p_max": args.p_max, "seed": args.seed + rank}
            self.handle = apply_sts(
                self.model,
                compress=compress if "vtc" in setting else False,
                skip=skip if "lds" in setting else False,
                stage=_STAGE[setting],
            )
        self.trained = self.model
        if world > 1:
            self.trained = self.wrap_ddp(task)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=0.0)
        warmup = max(1, args.steps // 10)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: (
                min(1.0, (s + 1) / warmup)
                * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
            ),
        )
        self.result = Result(setting)
        self.fractions, self.layer_fractions, self.kept = [], [], []

    def wrap_ddp(self, task: TaskConfig) -> torch.nn.Module:
        """DDP with its default flags. Parameters a dense step never reaches (LLaVA: the CLIP
        tower's post_layernorm) are frozen first: they would never get a gradient anyway, and
        default DDP waits for every trainable one."""
        self.model.requires_grad_(True)
        with _handle_off(self.handle):
            probe = self.inputs(TASKS[self.args.task][1](task, self.args.seed, [0]))
            self.model(**probe).loss.backward()
        for param in self.model.parameters():
            param.requires_grad_(param.grad is not None)
        self.model.zero_grad(set_to_none=True)
        return torch.nn.parallel.DistributedDataParallel(self.model)

    def inputs(self, batch: Batch, packed: bool = False) -> dict[str, torch.Tensor]:
        """The model's arguments; `packed`: the batch's rows packed into one row (--packed)."""
        inputs = model_inputs(self.args.model, batch.to(self.device), self.task)
        return pack_rows(inputs, self.model) if packed else inputs

    def step(self, batch: Batch) -> None:
        """One timed training step."""
        inputs = self.inputs(batch, self.args.packed)
        _sync(self.device)
        start = time.perf_counter()
        loss = self.trained(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        _sync(self.device)
        self.result.step_times_ms.append(1e3 * (time.perf_counter() - start))
        self.result.losses.append(loss.item())  # after the timed region: its sync is not timed
        report = self.handle.report if self.handle is not None else None
        if report is not None:
            self.fractions.append(report.executed_fraction)
            self.layer_fractions.append(report.layer_fraction)
            n_img = batch.pixel_values.shape[0]
            self.kept.append((report.visual_tokens_kept or self.task.image_tokens * n_img) / n_img)

    def evaluate(self, batches: list[Batch], compressed: bool = False) -> tuple[float, dict]:
        """Held-out answer accuracy, overall and per question type, of the model as served
        (unpatched); `compressed`: with the VTC on at eval instead."""
        return held_out_accuracy(
            self.model, self.handle, batches, self.inputs, self.task.questions, compressed
        )

    def finish(self, probe: Batch, held_out: list[Batch]) -> Result:
        """Peak memory of one forward+backward, held-out accuracy, means over the steps."""
        result, task, args = self.result, self.task, self.args
        inputs = self.inputs(probe, self.args.packed)
        with _quiet():  # the CPU profiler's warnings
            result.peak_memory_mb = peak_memory_mb(
                lambda: self.trained(**inputs).loss.backward(), self.device
            )
        self.optimizer.zero_grad(set_to_none=True)
        result.accuracy, result.accuracy_by_question = self.evaluate(held_out)
        result.eval_curve.append((args.steps, result.accuracy))
        if self.handle is not None and self.handle.compressor is not None:
            result.accuracy_compressed_eval, _ = self.evaluate(held_out, compressed=True)
        result.step_time_ms = statistics.median(result.step_times_ms[args.warmup_steps :])
        result.tokens_per_s = args.batch_size * task.seq_len / (result.step_time_ms / 1e3)
        result.executed_fraction = statistics.fmean(self.fractions) if self.fractions else 1.0
        result.layer_fraction = (
            statistics.fmean(self.layer_fractions) if self.layer_fractions else 1.0
        )
        result.visual_tokens_per_image = (
            statistics.fmean(self.kept) if self.kept else float(task.image_tokens)
        )
        result.final_loss = statistics.fmean(result.losses[-max(1, args.steps // 10) :])
        result.ideal_ratio = ideal_ratio(
            self.model, task, args.batch_size, result.visual_tokens_per_image, result.layer_fraction
        )
        return result


@torch.no_grad()
def held_out_accuracy(model, handle, batches, inputs_fn, questions, compressed=False):
    """(accuracy, {question type: accuracy}) on `batches`. Served: `model.eval()` with the
    patch disabled (the model runs exactly as unpatched); `compressed`: the patch on and its
    compressor enabled in eval (answers read against the shrunk labels the model ran on)."""
    model.eval()
    compressor = handle.compressor if handle is not None else None
    if compressed and compressor is None:
        raise ValueError("compressed eval needs a patch with a compressor")
    if handle is not None:
        handle.enabled = compressed
        if compressed:
            compressor.enabled_in_eval = True
    try:
        correct, kinds = [], []
        for b in batches:
            inputs = inputs_fn(b)
            logits = model(**inputs).logits
            labels = handle.last_inputs["labels"] if compressed else inputs["labels"]
            correct.append(answer_accuracy(logits, labels).cpu())
            kinds.append(b.question_type)
    finally:
        if handle is not None:
            handle.enabled = True
            if compressed:
                compressor.enabled_in_eval = False
        model.train()
    correct, kinds = torch.cat(correct).float(), torch.cat(kinds)
    by_q = {
        q: correct[kinds == i].mean().item() for i, q in enumerate(questions) if (kinds == i).any()
    }
    return correct.mean().item(), by_q


@contextlib.contextmanager
def _handle_off(handle):
    """The unpatched model for the duration (no STS, dense layers)."""
    if handle is None:
        yield
        return
    handle.enabled = False
    try:
        yield
    finally:
        handle.enabled = True


@contextlib.contextmanager
def _quiet():
    """Silence file descriptors 1 and 2 (C++ code such as the profiler writes there)."""
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def train_interleaved(runs: list[Run], train: list[Batch], held_out: list[Batch], steps: int):
    """Round r runs step r of every setting, starting at setting r mod n (each setting goes
    first equally often); a few held-out checks along the way (untimed)."""
    from tqdm import tqdm  # a dependency of transformers

    eval_every = max(1, steps // 4)
    bar = tqdm(
        range(steps), desc="rounds", leave=False, dynamic_ncols=True, disable=_world()[0] > 0
    )
    for step in bar:
        batch = train[step % len(train)]
        for k in range(len(runs)):
            runs[(step + k) % len(runs)].step(batch)
        bar.set_postfix({r.setting: f"{r.result.losses[-1]:.3f}" for r in runs})
        if (step + 1) % eval_every == 0 and step + 1 < steps:
            for run in runs:
                acc, _ = run.evaluate(held_out[:2])
                run.result.eval_curve.append((step + 1, acc))


def compare_to_dense(results: list[Result], warmup: int) -> None:
    """measured_ratio / ratio_iqr from the per-round step-time ratios against dense."""
    dense = next((r for r in results if r.setting == "dense"), None)
    if dense is None:
        return
    for r in results:
        ratios = [a / b for a, b in zip(r.step_times_ms[warmup:], dense.step_times_ms[warmup:])]
        r.measured_ratio = statistics.median(ratios)
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        r.ratio_iqr = (q[0], q[2])


def device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()
    return f"cpu{os.cpu_count()}"


def format_table(results: list[Result]) -> str:
    head = (
        f"{'setting':<9}{'step ms':>9}{'tok/s':>9}{'peak MB':>9}{'vis tok':>8}{'LM FLOP':>9}"
        f"{'loss':>8}{'acc %':>7}{'VTC-on':>7}{'ideal':>7}{'meas.':>7}{'IQR':>12}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        mem = "n/a" if r.peak_memory_mb is None else f"{r.peak_memory_mb:.0f}"
        on = (
            "-" if r.accuracy_compressed_eval is None else f"{100 * r.accuracy_compressed_eval:.1f}"
        )
        rows.append(
            f"{r.setting:<9}{r.step_time_ms:>9.1f}{r.tokens_per_s:>9.0f}{mem:>9}"
            f"{r.visual_tokens_per_image:>8.0f}{r.executed_fraction:>9.2f}{r.final_loss:>8.3f}"
            f"{100 * r.accuracy:>7.1f}{on:>7}{r.ideal_ratio:>7.2f}{r.measured_ratio:>7.2f}"
            f"{f'{r.ratio_iqr[0]:.2f}-{r.ratio_iqr[1]:.2f}':>12}"
        )
    return "\n".join(rows)


def plot(results: list[Result], path: Path, title: str) -> bool:
    """Loss, accuracy and step-time panels as PNG; False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc, ax_time) = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in results:
        k = max(1, len(r.losses) // 25)
        smooth = [statistics.fmean(r.losses[max(0, i - k) : i + 1]) for i in range(len(r.losses))]
        ax_loss.plot(smooth, label=r.setting)
        steps, accs = zip(*r.eval_curve)
        ax_acc.plot(steps, [100 * a for a in accs], marker="o", label=r.setting)
    ax_loss.set(xlabel="step", ylabel="training loss (smoothed)", yscale="log", title="loss")
    ax_acc.set(xlabel="step", ylabel="held-out accuracy %", title="answer accuracy")
    x = range(len(results))
    ax_time.bar(x, [r.measured_ratio for r in results], width=0.4, label="measured")
    ax_time.bar(
        [i + 0.4 for i in x], [r.ideal_ratio for r in results], width=0.4, label="ideal (FLOPs)"
    )
    ax_time.set_xticks([i + 0.2 for i in x], [r.setting for r in results])
    ax_time.set(ylabel="step time / dense", title="step time vs dense")
    for ax in (ax_loss, ax_acc, ax_time):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="training steps per setting")
    p.add_argument(
        "--model",
        choices=MODELS,
        default="llava",
        metavar="MODEL",
        help=f"model family (bench/demo_models.py): {', '.join(MODELS)}",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per process (0: cores / ranks); fixed so results reproduce",
    )
    p.add_argument("--task", choices=sorted(TASKS), default="default")
    p.add_argument(
        "--packed",
        action="store_true",
        help="train on packed rows (DataCollatorWithFlattening layout); eval unpacked",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {SETTINGS}")
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="tiny")
    p.add_argument(
        "--image-size", type=int, default=64, help="pixels; patch 4 -> (size/4)^2 tokens"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--p-max", type=float, default=0.5, help="LDS schedule: deepest layer's skip prob"
    )
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument(
        "--warmup-steps", type=int, default=5, help="rounds left out of the timing median"
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument(
        "--ops", action="store_true", help="run the op benchmarks (bench/ops.py) instead"
    )
    args = p.parse_args(argv)
    unknown = set(args.settings.split(",")) - set(SETTINGS)
    if unknown:
        p.error(f"--settings: unknown {sorted(unknown)}; choose from {SETTINGS}")
    if args.warmup_steps >= args.steps:
        p.error(f"--warmup-steps ({args.warmup_steps}) must be below --steps ({args.steps})")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if "LOCAL_RANK" in os.environ:  # torchrun: one process per rank, DDP with default flags
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rank, world = _world()
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    device = torch.device(args.device)
    task_cls, make_batch = TASKS[args.task]
    task = task_cls(image_size=args.image_size)
    say = print if rank == 0 else lambda *a, **k: None
    say(
        f"generating data: {args.steps} x {args.batch_size} train x {world} ranks, "
        f"{args.eval_samples} held-out samples"
    )
    bs = args.batch_size
    train = [  # rank r trains on its own slice of every global batch
        make_batch(
            task, args.seed, list(range((i * world + rank) * bs, (i * world + rank + 1) * bs))
        )
        for i in range(args.steps)
    ]
    eval_bs = 32
    held_out = [
        make_batch(
            task, args.seed, list(range(i, min(i + eval_bs, args.eval_samples))), split="eval"
        )
        for i in range(0, args.eval_samples, eval_bs)
    ]
    runs = [Run(setting, args, task, device) for setting in args.settings.split(",")]
    train_interleaved(runs, train, held_out, args.steps)
    results = [run.finish(train[0], held_out) for run in runs]
    compare_to_dense(results, args.warmup_steps)
    for r in results:
        say(
            f"{r.setting:>8}: {r.step_time_ms:.1f} ms/step, loss {r.final_loss:.3f}, "
            f"acc {100 * r.accuracy:.1f}%"
        )
    size = MODEL_SIZES[args.model_size]
    tag = device_tag(device) + (f"x{world}" if world > 1 else "")
    family = FAMILIES[args.model]
    title = (
        f"STS demo: {family.title} {args.model_size} ({family.tower} {size.vision_layers}x"
        f"{size.vision_hidden}, {family.lm} {size.text_layers}x{size.text_hidden}), "
        f"{task.image_tokens} image tokens, batch "
        f"{args.batch_size}{f' per rank x {world}' if world > 1 else ''}, {args.steps} steps, "
        f"{tag}, {torch.get_num_threads()} thread(s); {args.steps - args.warmup_steps} timed "
        "rounds, settings interleaved"
        + (f"; task {args.task}" if args.task != "default" else "")
        + ("; packed rows" if args.packed else "")
    )
    table = format_table(results)
    say()
    say(title)
    say(table)
    say(
        "ideal = FLOP ratio vs dense (bench/flops.py: vision + projector + LM, fwd+bwd); meas. = "
        "median over rounds of step time / dense's in the same round, IQR its 25-75th "
        "percentiles; LM FLOP = executed LM layer-FLOP fraction; acc % = held-out answers of the "
        "model as served (eval, patch disabled: unpatched); VTC-on = the same with the VTC on "
        "at eval (VTC settings)."
    )
    from sts_kernels.env import collect

    record = {
        "title": title,
        "args": vars(args),
        "task": asdict(task),
        "model": asdict(size),
        "device": tag,
        "world_size": world,
        "platform": platform.platform(),
        "env": {k: str(v) for k, v in collect().items()},
        "table": table,
        "results": [asdict(r) for r in results],
    }
    if rank == 0 and args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        date = dt.datetime.now().strftime("%Y%m%d-%H%M")
        stem = out / f"demo_{args.model}_{tag}_{date}"
        stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
        if plot(results, stem.with_suffix(".png"), title):
            say(f"wrote {stem}.json and {stem}.png")
        else:
            say(f"wrote {stem}.json (no plot: matplotlib is not installed)")
    if world > 1:
        for run in runs:  # DDP's reducer before the process group (exit hang otherwise)
            del run.trained
        dist.destroy_process_group()
    return record
