"""Training steps of real-architecture VLM shapes (random weights built from configs, no
download) under dense / VTC / LDS / VTC+LDS, side by side and interleaved as in bench/demo.py.

    python -m bench.e2e --shape llava-1.5-7b          # alignment: projector trained, LM and
                                                      # tower frozen, gradient checkpointing
    python -m bench.e2e --shape qwen2.5-vl-3b         # full fine-tuning
    python -m bench.e2e --shape llava-1.5-7b --lora   # instruct stage, LoRA r=128 on the LM
    python -m bench.e2e --shape tiny --steps 4        # CPU, seconds
    ... --layers 16 --batch 4 --seq 128 --steps 20 --budget-s 200

bf16 on a GPU (fp32 on CPU), SDPA attention (flash_attention_2 when flash_attn imports).
One model serves every setting, so that a 7B LM fits one GPU once, not four times: a step
patches it with the setting's `apply_sts` (untimed), times forward + backward + optimizer step
(synchronised wall clock), then removes the patch. Round r runs one step of each setting,
starting at setting r mod 4. Per setting: median step time over the timed rounds, tokens/s
(the batch's tokens before compression), MFU = model FLOPs (bench/flops.py, without
checkpointing's recompute) / step time / the device's peak dense bf16 FLOP/s (PEAK_BF16; none
on a CPU), peak memory (CUDA max_memory_allocated during the step: weights, optimizer state
and activations), `ideal` = the FLOP model's step ratio to dense at the setting's measured
visual tokens and layer fraction, `meas.` = median over rounds of step time / dense's in the
same round. JSON with every step time is rewritten after each round under bench/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import flops
from .demo import compare_to_dense, device_tag
from .plan import SHAPES, add_workload_args, sts_options, training

# peak dense bf16 tensor-core FLOP/s by device name (first substring match wins)
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


@dataclass
class Result:
    setting: str
    step_times_ms: list = field(default_factory=list)  # one per round, in round order
    losses: list = field(default_factory=list)
    visual_tokens: list = field(default_factory=list)  # per image the LM saw, per step
    layer_fractions: list = field(default_factory=list)  # decoder rows run / dense, per step
    peak_memory_mb: float | None = None  # max over steps (CUDA only)
    step_time_ms: float = 0.0  # median over timed rounds
    tokens_per_s: float = 0.0
    model_tflop: float = 0.0  # FLOP model, measured sparsity, no recompute
    mfu: float | None = None
    ideal_ratio: float = 1.0
    measured_ratio: float = 1.0
    ratio_iqr: tuple = (1.0, 1.0)


def build_model(config, device: torch.device, dtype: torch.dtype, seed: int):
    import transformers as tf

    classes = {
        "llava": tf.LlavaForConditionalGeneration,
        "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration,
    }
    flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    torch.manual_seed(seed)
    with torch.device(device):
        model = classes[config.model_type]._from_config(
            config, dtype=dtype, attn_implementation="flash_attention_2" if flash else "sdpa"
        )
    return model.train()


def parts_of(model) -> dict[str, list[torch.nn.Module]]:
    """The modules of tower / projector / LM (the LM with its embeddings and head)."""
    inner = model.model
    if hasattr(inner, "visual"):  # Qwen2.5-VL: the merger is the projector
        tower = [m for name, m in inner.visual.named_children() if name != "merger"]
        projector = [inner.visual.merger]
    else:
        tower, projector = [inner.vision_tower], [inner.multi_modal_projector]
    return {"tower": tower, "projector": projector, "lm": [inner.language_model, model.lm_head]}


def prepare(model, train: flops.Training):
    """Freeze what the stage freezes, LoRA on the LM's linear layers (peft), gradient
    checkpointing; returns the model to call (a PeftModel under LoRA)."""
    if train.checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    parts = parts_of(model)
    if train.lm == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=train.lora_rank, lora_alpha=2 * train.lora_rank, target_modules=LORA_TARGETS
        )
        model = get_peft_model(model, lora)  # freezes everything but the adapters
    for name, modules in parts.items():
        mode = getattr(train, name)
        for module in modules:
            if mode != "lora":
                module.requires_grad_(mode == "trained")
    return model


def special_ids(config) -> list[int]:
    names = ("image_token_index", "image_token_id", "video_token_id", "vision_start_token_id")
    return [v for v in (getattr(config, n, None) for n in names) if isinstance(v, int)]


def make_inputs(config, model: flops.Vlm, work: flops.Workload, device, dtype, seed: int) -> dict:
    """Random text ids (below every special id) with each image's placeholder run after the
    first token, labels on the text; pixels in the model's layout. Qwen2.5-VL: each run
    wrapped in vision start / end, flat 2-frame patches and their [1, h, w] grids."""
    gen = torch.Generator().manual_seed(seed)
    high = min([config.text_config.vocab_size, *special_ids(config)])
    b, n = work.batch, model.tower.visual_tokens(work.resolution)
    text = torch.randint(3, high, (b, work.text_tokens), generator=gen)  # [B, text]
    qwen = config.model_type == "qwen2_5_vl"
    image_id = config.image_token_id if qwen else config.image_token_index
    run = torch.full((b, n), image_id)  # [B, n] one image's placeholders
    if qwen:
        start, end = config.vision_start_token_id, config.vision_end_token_id
        run = torch.cat([torch.full((b, 1), start), run, torch.full((b, 1), end)], 1)
    ids = torch.cat([text[:, :1], *[run] * work.images, text[:, 1:]], 1)  # [B, T]
    images = b * work.images
    if qwen:
        gh, gw = model.tower.grid(work.resolution)
        # [B * images * gh * gw, C * 2 * p * p]
        pixels = torch.randn(images * gh * gw, model.tower.patch_inputs, generator=gen)
        extra = {
            "image_grid_thw": torch.tensor([[1, gh, gw]] * images),
            "mm_token_type_ids": (ids == image_id).long(),
        }
    else:
        pixels = torch.randn(images, 3, *work.resolution, generator=gen)  # [B * images, 3, H, W]
        extra = {}
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.masked_fill(ids >= high, -100),
        "pixel_values": pixels.to(dtype),
        **extra,
    }
    return {k: v.to(device) for k, v in inputs.items()}


class Bench:
    """The shared model, its optimizer and inputs, and one Result per setting."""

    def __init__(self, args, device: torch.device):
        shape = SHAPES[args.shape]
        config = shape.config()
        if args.layers:
            config.text_config.num_hidden_layers = args.layers
        resolution = args.resolution or shape.resolution
        if config.model_type == "llava":  # CLIP's position table follows the image size
            config.vision_config.image_size = resolution
        self.args, self.device, self.config = args, device, config
        self.stage = "lora" if args.lora else (args.stage or shape.stage)
        self.train = training(self.stage, args)
        self.options = sts_options(args)
        self.cost = flops.from_hf_config(config)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        given = flops.Workload(
            args.batch or shape.batch, args.text or shape.text, args.images, (resolution,) * 2
        )
        self.inputs = make_inputs(config, self.cost, given, device, dtype, args.seed)
        # the LM's non-visual tokens: the text plus Qwen's vision start / end
        visual = given.images * self.cost.tower.visual_tokens(given.resolution)
        other = self.inputs["input_ids"].shape[1] - visual
        self.work = flops.Workload(given.batch, other, given.images, given.resolution)
        self.model = prepare(build_model(config, device, dtype, args.seed), self.train)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=1e-5)
        self.results = [Result(s) for s in args.settings.split(",")]

    def step(self, result: Result, seed: int) -> None:
        """One timed training step of `result.setting` (patched before, unpatched after)."""
        from sts_kernels import apply_sts

        handle, cuda = None, self.device.type == "cuda"
        if result.setting != "dense":
            skip = {**self.options.skip(), "seed": seed}
            handle = apply_sts(
                self.model,
                compress=self.options.compress() if "vtc" in result.setting else False,
                skip=skip if "lds" in result.setting else False,
            )
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        loss = self.model(**self.inputs).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(self.device)
        result.step_times_ms.append(1e3 * (time.perf_counter() - start))
        result.losses.append(loss.item())
        if cuda:
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            result.peak_memory_mb = max(result.peak_memory_mb or 0.0, peak)
        kept, fraction = self.cost.tower.visual_tokens(self.work.resolution), 1.0
        if handle is not None:
            images = self.work.batch * self.work.images
            kept = (handle.report.visual_tokens_kept or kept * images) / images
            fraction = handle.report.layer_fraction
            handle.remove()
        result.visual_tokens.append(kept)
        result.layer_fractions.append(fraction)

    def summarise(self, warmup: int) -> None:
        """Medians, FLOP-model figures and ratios over the rounds after `warmup`."""
        timed = max(0, min(warmup, len(self.results[0].step_times_ms) - 1))
        peak = peak_flops(self.device)
        dense = flops.total(flops.step_flops(self.cost, self.work, self.train))
        tokens = self.inputs["input_ids"].numel()
        for r in self.results:
            sparsity = flops.Sparsity(
                statistics.fmean(r.visual_tokens), statistics.fmean(r.layer_fractions)
            )
            parts = flops.step_flops(self.cost, self.work, self.train, sparsity)
            r.step_time_ms = statistics.median(r.step_times_ms[timed:])
            r.tokens_per_s = tokens / (r.step_time_ms / 1e3)
            r.model_tflop = flops.total(parts, recompute=False) / 1e12
            r.mfu = r.model_tflop * 1e12 / (r.step_time_ms / 1e3) / peak if peak else None
            r.ideal_ratio = flops.total(parts) / dense
        compare_to_dense(self.results, timed)


def format_table(results: list[Result]) -> str:
    head = (
        f"{'setting':<9}{'step ms':>10}{'tok/s':>9}{'MFU %':>7}{'peak GB':>9}{'vis tok':>8}"
        f"{'LM rows':>8}{'ideal':>7}{'meas.':>7}{'IQR':>12}{'meas/ideal':>11}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        mfu = "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}"
        mem = "n/a" if r.peak_memory_mb is None else f"{r.peak_memory_mb / 1024:.1f}"
        rows.append(
            f"{r.setting:<9}{r.step_time_ms:>10.1f}{r.tokens_per_s:>9.0f}{mfu:>7}{mem:>9}"
            f"{statistics.fmean(r.visual_tokens):>8.0f}{statistics.fmean(r.layer_fractions):>8.2f}"
            f"{r.ideal_ratio:>7.2f}{r.measured_ratio:>7.2f}"
            f"{f'{r.ratio_iqr[0]:.2f}-{r.ratio_iqr[1]:.2f}':>12}"
            f"{r.measured_ratio / r.ideal_ratio:>11.2f}"
        )
    return "\n".join(rows)


def git_commit() -> str:
    """STS_COMMIT when set (a copy of the tree without .git), else `git rev-parse HEAD`."""
    if os.environ.get("STS_COMMIT"):
        return os.environ["STS_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record(bench: Bench, title: str, rounds: int, done: bool) -> dict:
    from sts_kernels.env import collect

    versions = {k: str(v) for k, v in collect().items()}
    if bench.train.lm == "lora":
        import peft

        versions["peft"] = peft.__version__
    return {
        "title": title,
        "complete": done,
        "rounds_done": rounds,
        "args": vars(bench.args),
        "stage": bench.stage,
        "training": asdict(bench.train),
        "workload": asdict(bench.work),
        "flop_model": asdict(bench.cost),
        "trainable_params": bench.trainable,
        "device": device_tag(bench.device),
        "peak_bf16_flops": peak_flops(bench.device),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "env": versions,
        "table": format_table(bench.results) if rounds else "",
        "results": [asdict(r) for r in bench.results],
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n\n")[0])
    add_workload_args(p)
    p.set_defaults(shape="tiny")
    p.add_argument("--stage", choices=sorted(flops.STAGES), help="default: the shape's")
    p.add_argument("--layers", type=int, help="LM decoder layers (default: the config's)")
    p.add_argument("--steps", type=int, default=20, help="rounds (one step of every setting)")
    p.add_argument("--warmup", type=int, default=2, help="rounds left out of the medians")
    p.add_argument("--budget-s", type=float, default=0.0, help="start no round past this")
    p.add_argument("--settings", default=",".join(flops.SETTINGS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    unknown = set(args.settings.split(",")) - set(flops.SETTINGS)
    if unknown or "dense" not in args.settings.split(","):
        p.error(f"--settings: dense plus any of {flops.SETTINGS}; unknown {sorted(unknown)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device)
    t0 = time.perf_counter()
    bench = Bench(args, device)
    shape, work = SHAPES[args.shape], bench.work
    title = (
        f"STS e2e: {shape.title}, stage {bench.stage} ({bench.trainable / 1e6:.3g}M parameters trained"
        f"{', checkpointing' if bench.train.checkpointing else ''}), LM {bench.cost.lm.layers} "
        f"layers, batch {work.batch} x ({work.images} image(s) {work.resolution[0]} px + "
        f"{work.text_tokens} tokens), {device_tag(device)}, settings interleaved"
    )
    print(f"{title}\nbuilt in {time.perf_counter() - t0:.0f}s", flush=True)
    path = None
    if args.out:
        date = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(args.out) / f"e2e_{args.shape}_{bench.stage}_{device_tag(device)}_{date}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
    rounds, start = 0, time.perf_counter()
    n = len(bench.results)
    for i in range(args.steps):
        elapsed = time.perf_counter() - t0
        per_round = (time.perf_counter() - start) / rounds if rounds else 0.0
        if args.budget_s and rounds > args.warmup and elapsed + per_round > args.budget_s:
            print(f"stopping after {rounds} rounds: --budget-s {args.budget_s:.0f} reached")
            break
        for k in range(n):
            bench.step(bench.results[(i + k) % n], seed=args.seed + i)
        rounds += 1
        per_round = (time.perf_counter() - start) / rounds
        print(
            f"round {rounds}/{args.steps}: {per_round:.2f} s/round, "
            f"ETA {per_round * (args.steps - rounds):.0f}s",
            flush=True,
        )
        bench.summarise(args.warmup)
        if path:
            path.write_text(json.dumps(record(bench, title, rounds, False), indent=1))
    bench.summarise(args.warmup)
    out = record(bench, title, rounds, True)
    if path:
        path.write_text(json.dumps(out, indent=1))
    print(f"\n{title}\n{out['table']}")
    print(
        "MFU = FLOP-model FLOPs (no recompute) / step time / peak dense bf16; ideal = projected "
        "FLOP ratio to dense at the measured visual tokens and layer fraction; meas. = median "
        "over rounds of step time / dense's in the same round (IQR 25-75th percentile)."
    )
    if path:
        print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
