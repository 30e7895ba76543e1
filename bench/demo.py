"""End-to-end STS demo: train a small LLaVA (random init, built from a config) on the synthetic
task of bench/task.py under dense / VTC / LDS / VTC+LDS with the same seed, data and steps, and
compare step time, throughput, memory, executed LM FLOPs, loss and held-out accuracy.

    python -m bench                       # defaults: a few minutes on a 2-core CPU
    python -m bench --device cuda --steps 600 --model-size small

Writes `bench/results/demo_<device>_<date>.json` and `.png` (loss, accuracy, step time).
"""

from __future__ import annotations

import argparse
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

from .task import VOCAB_SIZE, Batch, TaskConfig, answer_accuracy, make_batch
from .timing import peak_memory_mb

SETTINGS = ("dense", "vtc", "lds", "vtc+lds")
# which STS parts each setting turns on (apply_sts stage presets)
_STAGE = {"vtc": "align", "lds": "instruct", "vtc+lds": None}


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


def build_model(size: ModelSize, task: TaskConfig, seed: int):
    """A LLaVA (CLIP tower, 2-layer MLP projector, Llama LM) with random weights, SDPA attention."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=size.vision_hidden,
            intermediate_size=size.vision_intermediate,
            num_hidden_layers=size.vision_layers,
            num_attention_heads=size.heads,
            image_size=task.image_size,
            patch_size=task.patch_size,
        ),
        text_config=LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=size.text_hidden,
            intermediate_size=size.text_intermediate,
            num_hidden_layers=size.text_layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.heads,
            max_position_embeddings=max(1024, task.seq_len),
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=3,
        ),
        image_token_index=2,
        vision_feature_layer=-1,  # every vision layer is trained
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


def train_flops(
    size: ModelSize, task: TaskConfig, batch: int, visual_kept: float, layer_frac: float
):
    """Forward+backward FLOPs of one step (3x forward matmul FLOPs; norms etc. ignored).

    `visual_kept`: fraction of image tokens the LM sees; `layer_frac`: fraction of the LM's
    layer rows that run (the skipper's executed fraction)."""
    dv, d = size.vision_hidden, size.text_hidden
    n_img = task.image_tokens
    nv = n_img + 1  # CLS
    vision = (
        size.vision_layers
        * nv
        * (2 * (4 * dv * dv + 2 * dv * size.vision_intermediate) + 4 * nv * dv)
    )
    vision += nv * 2 * 3 * task.patch_size**2 * dv
    projector = n_img * 2 * (dv * d + d * d)
    t = task.seq_len - n_img + n_img * visual_kept
    layer = t * (2 * (4 * d * d + 3 * d * size.text_intermediate) + 4 * t * d)
    lm = size.text_layers * layer * layer_frac + t * 2 * d * VOCAB_SIZE
    return 3 * batch * (vision + projector + lm)


@dataclass
class Result:
    setting: str
    step_time_ms: float = 0.0  # median over steps after warm-up
    tokens_per_s: float = 0.0  # the batch's tokens (as given, before compression) per second
    peak_memory_mb: float | None = None  # peak of one forward+backward (activations, grads)
    executed_fraction: float = 1.0  # LM layer-FLOPs executed vs dense (mean over steps)
    visual_tokens_per_image: float = 0.0  # what the LM saw, mean over steps
    layer_fraction: float = 1.0  # skipper's executed fraction (mean over steps)
    final_loss: float = 0.0  # mean of the last 10% of steps
    accuracy: float = 0.0  # held-out answer accuracy, model used as trained
    accuracy_dense_eval: float | None = None  # VTC settings: accuracy with VTC off at eval
    accuracy_by_question: dict = field(default_factory=dict)
    ideal_ratio: float = 1.0  # FLOP ratio vs dense
    measured_ratio: float = 1.0  # median step time ratio vs dense
    losses: list = field(default_factory=list)
    step_times_ms: list = field(default_factory=list)
    eval_curve: list = field(default_factory=list)  # (step, accuracy)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model, handle, batches: list[Batch], device, questions) -> tuple[float, dict]:
    """Held-out answer accuracy, overall and per question type."""
    was_training = model.training
    model.eval()
    correct, kinds = [], []
    for b in batches:
        inputs = b.to(device).model_inputs()
        logits = model(**inputs).logits
        labels = handle.last_inputs["labels"] if handle is not None else inputs["labels"]
        correct.append(answer_accuracy(logits, labels).cpu())
        kinds.append(b.question_type)
    model.train(was_training)
    correct, kinds = torch.cat(correct).float(), torch.cat(kinds)
    by_q = {
        q: correct[kinds == i].mean().item() for i, q in enumerate(questions) if (kinds == i).any()
    }
    return correct.mean().item(), by_q


def run_setting(setting: str, args, task: TaskConfig, train: list[Batch], held_out: list[Batch]):
    from tqdm import tqdm  # a dependency of transformers

    from sts_kernels.integrations.hf import apply_sts

    device = torch.device(args.device)
    size = MODEL_SIZES[args.model_size]
    model = build_model(size, task, args.seed).to(device)
    model.train()
    handle = None
    if setting != "dense":
        # explicit arguments override the stage preset, so pass False for the part left out
        compress = {"mode": "pool", "window": (2, 2), "enabled_in_eval": True}
        skip = {"mode": "sample", "policy": "schedule", "p_max": args.p_max, "seed": args.seed}
        handle = apply_sts(
            model,
            compress=compress if "vtc" in setting else False,
            skip=skip if "lds" in setting else False,
            stage=_STAGE[setting],
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
        ),
    )
    result = Result(setting)
    fractions, layer_fractions, kept = [], [], []
    eval_every = max(1, args.steps // 4)
    bar = tqdm(range(args.steps), desc=f"{setting:>8}", leave=False, dynamic_ncols=True)
    for step in bar:
        batch = train[step % len(train)].to(device)
        _sync(device)
        start = time.perf_counter()
        loss = model(**batch.model_inputs()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        _sync(device)
        result.step_times_ms.append(1e3 * (time.perf_counter() - start))
        result.losses.append(loss.item())  # after the timed region: its sync is not timed
        if handle is not None:
            fractions.append(handle.report.executed_fraction)
            layer_fractions.append(handle.report.layer_fraction)
            n_img = batch.pixel_values.shape[0]
            kept.append((handle.report.visual_tokens_kept or task.image_tokens * n_img) / n_img)
        bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
        if (step + 1) % eval_every == 0 and step + 1 < args.steps:
            acc, _ = evaluate(model, handle, held_out[:2], device, task.questions)
            result.eval_curve.append((step + 1, acc))
    # after training, so the profiler on CPU costs no timed step; no optimizer step follows
    inputs = train[0].to(device).model_inputs()
    result.peak_memory_mb = peak_memory_mb(lambda: model(**inputs).loss.backward(), device)
    optimizer.zero_grad(set_to_none=True)
    result.accuracy, result.accuracy_by_question = evaluate(
        model, handle, held_out, device, task.questions
    )
    result.eval_curve.append((args.steps, result.accuracy))
    if handle is not None and handle.compressor is not None:
        handle.compressor.enabled_in_eval = False
        result.accuracy_dense_eval, _ = evaluate(model, handle, held_out, device, task.questions)
    timed = result.step_times_ms[min(args.warmup_steps, len(result.step_times_ms) - 1) :]
    result.step_time_ms = statistics.median(timed)
    result.tokens_per_s = args.batch_size * task.seq_len / (result.step_time_ms / 1e3)
    result.executed_fraction = statistics.fmean(fractions) if fractions else 1.0
    result.layer_fraction = statistics.fmean(layer_fractions) if layer_fractions else 1.0
    result.visual_tokens_per_image = statistics.fmean(kept) if kept else float(task.image_tokens)
    tail = max(1, args.steps // 10)
    result.final_loss = statistics.fmean(result.losses[-tail:])
    dense_flops = train_flops(size, task, args.batch_size, 1.0, 1.0)
    flops = train_flops(
        size,
        task,
        args.batch_size,
        result.visual_tokens_per_image / task.image_tokens,
        result.layer_fraction,
    )
    result.ideal_ratio = flops / dense_flops
    return result


def device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()
    return f"cpu{os.cpu_count()}"


def format_table(results: list[Result]) -> str:
    head = (
        f"{'setting':<9}{'step ms':>9}{'tok/s':>9}{'peak MB':>9}{'vis tok':>8}{'LM FLOP':>9}"
        f"{'loss':>8}{'acc %':>7}{'ideal':>7}{'meas.':>7}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        mem = "n/a" if r.peak_memory_mb is None else f"{r.peak_memory_mb:.0f}"
        rows.append(
            f"{r.setting:<9}{r.step_time_ms:>9.1f}{r.tokens_per_s:>9.0f}{mem:>9}"
            f"{r.visual_tokens_per_image:>8.0f}{r.executed_fraction:>9.2f}{r.final_loss:>8.3f}"
            f"{100 * r.accuracy:>7.1f}{r.ideal_ratio:>7.2f}{r.measured_ratio:>7.2f}"
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
        "--warmup-steps", type=int, default=5, help="steps left out of the timing median"
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument(
        "--ops", action="store_true", help="run the op benchmarks (bench/ops.py) instead"
    )
    args = p.parse_args(argv)
    unknown = set(args.settings.split(",")) - set(SETTINGS)
    if unknown:
        p.error(f"--settings: unknown {sorted(unknown)}; choose from {SETTINGS}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    device = torch.device(args.device)
    task = TaskConfig(image_size=args.image_size)
    eval_bs = 32
    print(
        f"generating data: {args.steps} x {args.batch_size} train, {args.eval_samples} held-out samples"
    )
    train = [
        make_batch(task, args.seed, list(range(i * args.batch_size, (i + 1) * args.batch_size)))
        for i in range(args.steps)
    ]
    held_out = [
        make_batch(
            task, args.seed, list(range(i, min(i + eval_bs, args.eval_samples))), split="eval"
        )
        for i in range(0, args.eval_samples, eval_bs)
    ]
    results = []
    settings = args.settings.split(",")
    for setting in settings:
        results.append(run_setting(setting, args, task, train, held_out))
        r = results[-1]
        print(
            f"{setting:>8}: {r.step_time_ms:.1f} ms/step, loss {r.final_loss:.3f}, acc {100 * r.accuracy:.1f}%"
        )
    dense = next((r for r in results if r.setting == "dense"), None)
    if dense is not None:  # ideal_ratio is already relative to dense FLOPs
        for r in results:
            r.measured_ratio = r.step_time_ms / dense.step_time_ms
    tag = device_tag(device)
    date = dt.datetime.now().strftime("%Y%m%d-%H%M")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"demo_{tag}_{date}"
    table = format_table(results)
    size = MODEL_SIZES[args.model_size]
    title = (
        f"STS demo: LLaVA {args.model_size} (CLIP {size.vision_layers}x{size.vision_hidden}, Llama "
        f"{size.text_layers}x{size.text_hidden}), {task.image_tokens} image tokens, batch "
        f"{args.batch_size}, {args.steps} steps, {tag}"
    )
    print()
    print(title)
    print(table)
    print(
        "ideal = FLOP ratio vs dense (vision + projector + LM, fwd+bwd); meas. = median step time "
        "ratio; LM FLOP = executed LM layer-FLOP fraction; acc on held-out samples "
        "(VTC settings evaluated with VTC on)."
    )
    from sts_kernels.env import collect

    record = {
        "title": title,
        "args": vars(args),
        "task": asdict(task),
        "model": asdict(size),
        "device": tag,
        "platform": platform.platform(),
        "env": {k: str(v) for k, v in collect().items()},
        "table": table,
        "results": [asdict(r) for r in results],
    }
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    if plot(results, stem.with_suffix(".png"), title):
        print(f"wrote {stem}.json and {stem}.png")
    else:
        print(f"wrote {stem}.json (no plot: matplotlib is not installed)")
    return record
