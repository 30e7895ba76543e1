"""`python -m bench --scheme`: the Sparse Training Scheme end to end on a tiny VLM, against the
same two stages trained dense.

    stage 1 "align"     vision tower and LM frozen, projector trained;  STS: VTC on
    stage 2 "instruct"  vision tower frozen, LM and projector trained;  STS: LDS on

Two arms, "dense" (dense / dense) and "sts" (VTC / LDS), start from the same random weights
and train on the same batches with the same seed and steps, side by side: each round runs one
step of each arm, the order alternating per round, so machine load hits both alike. The STS
arm switches between the stages the way `StsCallback` does: `handle.remove()`, then
`apply_sts(model, stage="instruct", ...)` (a switch that would add parameters is refused, as
there). Each stage gets a fresh AdamW (warmup + cosine). After each stage both arms are
evaluated as served: `model.eval()` with the patch disabled (`handle.enabled = False`: the
model runs exactly as unpatched; tests/bench/test_scheme.py checks it against `remove()`).

Per stage and in total: step-time ratio STS / dense (measured: median over rounds of the
per-round ratio; ideal: bench/flops.py with that stage's frozen parts), peak memory of one
forward+backward, held-out accuracy per question type. `--seeds N` repeats with seeds
seed..seed+N-1 (new weights, new data) and reports mean ± std (min-max).

    python -m bench --scheme --threads 1                   # default task, 1 seed
    python -m bench --scheme --threads 1 --task detail --seeds 3

Writes `bench/results/scheme_<model>_<task>_<device>_<date>.json` (rewritten after every
stage) and `.png` (both stages' loss curves, every seed).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import demo, flops
from .timing import peak_memory_mb

STAGES = ("align", "instruct")


@dataclass(frozen=True)
class ArmSpec:
    """One arm: `compress` (apply_sts VTC arguments) in stage 1 and `skip` (LDS arguments) in
    stage 2, None = dense there. `fork`: the arm starts stage 2 from a copy of that arm's
    stage-1 model (the sweep's LDS variants share one stage 1)."""

    name: str
    compress: dict | None = None
    skip: dict | None = None
    fork: str | None = None


def scheme_arms(args) -> list[ArmSpec]:
    """dense / dense against STS (VTC / LDS): the default comparison."""
    return [ArmSpec("dense"), ArmSpec("sts", dict(args.compress), dict(args.skip))]


@dataclass
class StageRecord:
    """One arm's one stage of one seed."""

    arm: str
    stage: str
    seed: int
    steps: int
    step_times_ms: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    step_time_ms: float = 0.0  # median over timed rounds
    peak_memory_mb: float | None = None
    visual_tokens_per_image: float = 0.0  # what the LM saw, mean over steps
    layer_fraction: float = 1.0  # LM decoder-layer rows run / dense, mean over steps
    final_loss: float = 0.0  # mean of the last 10% of steps
    accuracy: float = 0.0  # held-out, served dense (unpatched), after this stage
    accuracy_by_question: dict = field(default_factory=dict)
    ideal_ratio: float = 1.0  # FLOPs / dense's in this stage (bench/flops.py)
    measured_ratio: float = 1.0  # median over rounds of step time / dense's
    ratio_iqr: tuple = (1.0, 1.0)
    flops_per_step: float = 0.0  # bench/flops.py, this arm's sparsity
    shared_from: str | None = None  # a fork's stage 1: its parent's record, copied

    @property
    def setting(self) -> str:  # demo.compare_to_dense's name for the arm
        return self.arm


def parts(model, kind: str) -> dict[str, list[torch.nn.Parameter]]:
    """The parameters of the tower, the projector and the LM (decoder + head)."""
    inner = model.model
    lm = [*inner.language_model.parameters(), *model.lm_head.parameters()]
    if kind == "llava":
        tower, projector = inner.vision_tower, inner.multi_modal_projector
        return {
            "tower": list(tower.parameters()),
            "projector": list(projector.parameters()),
            "lm": lm,
        }
    merger = {id(p) for p in inner.visual.merger.parameters()}
    return {
        "tower": [p for p in inner.visual.parameters() if id(p) not in merger],
        "projector": list(inner.visual.merger.parameters()),
        "lm": lm,
    }


TRAINED = {"align": ("projector",), "instruct": ("projector", "lm")}


def sts_arguments(stage: str, spec: ArmSpec, seed: int) -> dict | None:
    """apply_sts arguments of `spec` in `stage` (the stage preset with explicit dicts), None:
    dense in that stage."""
    if stage == "align":
        return None if spec.compress is None else {"stage": "align", "compress": spec.compress}
    return None if spec.skip is None else {"stage": "instruct", "skip": {**spec.skip, "seed": seed}}


class Arm:
    """One arm: its model, its live patch (STS), the stage's optimizer and records."""

    def __init__(self, spec: ArmSpec, args, task, device: torch.device, seed: int, model=None):
        self.spec, self.name = spec, spec.name
        self.args, self.task, self.device, self.seed = args, task, device, seed
        size = demo.MODEL_SIZES[args.model_size]
        if model is None:
            model = demo.build_model(args.model, size, task, seed).to(device)
        self.model = model
        self.cost = flops.from_hf_config(model.config)
        from sts_kernels.integrations.hf import sts_handle

        self.handle = sts_handle(model)  # a fork's copy of its parent's patch
        self.record: StageRecord | None = None

    def fork(self, spec: ArmSpec) -> Arm:
        """A new arm on a copy of this arm's model (its patch copied along, bound to the copy)."""
        return Arm(spec, self.args, self.task, self.device, self.seed, copy.deepcopy(self.model))

    def begin(self, stage: str, steps: int) -> None:
        """Switch to `stage`: the patch (STS arm; StsCallback's remove + re-apply), what is
        trained, a fresh optimizer and schedule."""
        from sts_kernels.integrations.hf import apply_sts

        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        sts = sts_arguments(stage, self.spec, self.seed)
        if sts is not None:  # a router skipper's parameters join the stage's new optimizer
            self.handle = apply_sts(self.model, **sts)
        groups = parts(self.model, self.args.model)
        self.model.requires_grad_(False)
        trained = [p for name in TRAINED[stage] for p in groups[name]]
        if self.handle is not None and self.handle.adds_parameters:
            trained += [p for n in self.handle.adds_parameters
                        for p in getattr(self.model, n).parameters()]  # fmt: skip
        for p in trained:
            p.requires_grad_(True)
        self.trained = trained
        self.optimizer = torch.optim.AdamW(trained, lr=self.args.lr, weight_decay=0.0)
        warmup = max(1, steps // 10)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: (
                min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
            ),
        )
        self.model.train()
        self.record = StageRecord(self.name, stage, self.seed, steps)
        self.kept, self.layer_fractions = [], []

    def inputs(self, batch) -> dict:
        return demo.model_inputs(self.args.model, batch.to(self.device), self.task)

    def step(self, batch) -> None:
        inputs = self.inputs(batch)
        demo._sync(self.device)
        start = time.perf_counter()
        loss = self.model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trained, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        demo._sync(self.device)
        self.record.step_times_ms.append(1e3 * (time.perf_counter() - start))
        self.record.losses.append(loss.item())
        n_img = batch.pixel_values.shape[0]
        report = self.handle.report if self.handle is not None else None
        kept = report.visual_tokens_kept if report is not None else None
        self.kept.append((kept or self.task.image_tokens * n_img) / n_img)
        self.layer_fractions.append(report.layer_fraction if report is not None else 1.0)

    def evaluate(self, held_out) -> tuple[float, dict]:
        """Held-out answer accuracy of the model as served: eval mode, patch disabled."""
        return demo.held_out_accuracy(
            self.model, self.handle, held_out, self.inputs, self.task.questions
        )

    def finish(self, probe, held_out) -> StageRecord:
        r, args = self.record, self.args
        inputs = self.inputs(probe)
        with demo._quiet():
            r.peak_memory_mb = peak_memory_mb(
                lambda: self.model(**inputs).loss.backward(), self.device
            )
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.model.parameters():  # frozen parts got no grad; drop any left
            p.grad = None
        r.accuracy, r.accuracy_by_question = self.evaluate(held_out)
        warm = min(args.warmup_steps, r.steps - 1)
        r.step_time_ms = statistics.median(r.step_times_ms[warm:])
        r.visual_tokens_per_image = statistics.fmean(self.kept)
        r.layer_fraction = statistics.fmean(self.layer_fractions)
        r.final_loss = statistics.fmean(r.losses[-max(1, r.steps // 10) :])
        work = flops.Workload(
            args.batch_size,
            self.task.seq_len - self.task.image_tokens,
            1,
            (self.task.image_size,) * 2,
        )
        sparsity = flops.Sparsity(r.visual_tokens_per_image, r.layer_fraction)
        training = flops.STAGES[r.stage]
        r.flops_per_step = flops.total(flops.step_flops(self.cost, work, training, sparsity))
        r.ideal_ratio = flops.ratio(self.cost, work, training, sparsity)
        return r


class Progress:
    """Rounds done / total over all seeds and stages, with a rough ETA from the pace so far."""

    def __init__(self, total_rounds: int, say):
        self.total, self.done, self.say = total_rounds, 0, say
        self.start = time.perf_counter()

    def tick(self, label: str, round_: int, rounds: int) -> None:
        self.done += 1
        every = max(1, rounds // 5)
        if (round_ + 1) % every and round_ + 1 != rounds:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        self.say(
            f"  {label} round {round_ + 1}/{rounds}  [{self.done}/{self.total} rounds, "
            f"{elapsed / 60:.1f} min, ETA ~{eta / 60:.1f} min]",
            flush=True,
        )


def run_seed(args, task, device, seed: int, specs, progress: Progress, on_stage) -> list:
    """Both stages for every arm of `specs` with `seed` (forks join in stage 2); returns the
    StageRecords, stage-major."""
    make_batch = demo.TASKS[args.task][1]
    bs = args.batch_size
    held_out = [
        make_batch(task, seed, list(range(i, min(i + 32, args.eval_samples))), split="eval")
        for i in range(0, args.eval_samples, 32)
    ]
    arms = [Arm(spec, args, task, device, seed) for spec in specs if spec.fork is None]
    records, first = [], 0
    for stage, steps in zip(STAGES, (args.align_steps, args.instruct_steps)):
        if stage != STAGES[0]:
            by_name = {arm.name: arm for arm in arms}
            forks = [by_name[spec.fork].fork(spec) for spec in specs if spec.fork is not None]
            parents = {r.arm: r for r in records}
            for fork in forks:  # the stage 1 it shares
                shared = replace(parents[fork.spec.fork], arm=fork.name)
                records.append(replace(shared, shared_from=fork.spec.fork))
            order = {spec.name: i for i, spec in enumerate(specs)}
            arms = sorted(arms + forks, key=lambda arm: order[arm.name])
        for arm in arms:
            arm.begin(stage, steps)
        train = [make_batch(task, seed, list(range((first + i) * bs, (first + i + 1) * bs)))
                 for i in range(steps)]  # fmt: skip
        first += steps
        for r in range(steps):
            for k in range(len(arms)):
                arms[(r + k) % len(arms)].step(train[r])
            progress.tick(f"seed {seed} {stage}", r, steps)
        done = [arm.finish(train[0], held_out) for arm in arms]
        demo.compare_to_dense(done, min(args.warmup_steps, steps - 1))
        records += done
        on_stage(records)
    return records


def _stats(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def total_ratios(records: list[StageRecord], arm: str = "sts") -> dict[int, dict]:
    """Per seed: total step-time ratio of the scheme (both stages). measured: sum over stages
    of steps x dense median step time x measured ratio, over the dense sum (each stage's
    ratio from its own interleaved rounds, weighted by dense's share of the time); ideal:
    FLOPs summed over the steps."""
    out = {}
    for seed in sorted({r.seed for r in records}):
        by = {(r.arm, r.stage): r for r in records if r.seed == seed}
        stages = [s for s in STAGES if (arm, s) in by and ("dense", s) in by]
        if len(stages) < len(STAGES):
            continue
        dense_ms = sum(by["dense", s].steps * by["dense", s].step_time_ms for s in stages)
        sts_ms = sum(
            by["dense", s].steps * by["dense", s].step_time_ms * by[arm, s].measured_ratio
            for s in stages
        )
        dense_fl = sum(by["dense", s].steps * by["dense", s].flops_per_step for s in stages)
        sts_fl = sum(by[arm, s].steps * by[arm, s].flops_per_step for s in stages)
        out[seed] = {"measured": sts_ms / dense_ms, "ideal": sts_fl / dense_fl}
    return out


def summarize(records: list[StageRecord]) -> dict:
    """Mean / std / min / max over seeds of every reported number, per (stage, arm)."""
    rows = {}
    for stage in STAGES:
        for arm in arm_names(records):
            mine = [r for r in records if r.stage == stage and r.arm == arm]
            if not mine:
                continue
            questions = mine[0].accuracy_by_question
            rows[f"{stage}/{arm}"] = {
                "seeds": [r.seed for r in mine],
                "step_time_ms": _stats([r.step_time_ms for r in mine]),
                "peak_memory_mb": _stats([r.peak_memory_mb or 0.0 for r in mine]),
                "visual_tokens_per_image": _stats([r.visual_tokens_per_image for r in mine]),
                "layer_fraction": _stats([r.layer_fraction for r in mine]),
                "final_loss": _stats([r.final_loss for r in mine]),
                "accuracy": _stats([r.accuracy for r in mine]),
                "accuracy_by_question": {
                    q: _stats([r.accuracy_by_question[q] for r in mine]) for q in questions
                },
                "ideal_ratio": _stats([r.ideal_ratio for r in mine]),
                "measured_ratio": _stats([r.measured_ratio for r in mine]),
            }
    for arm in arm_names(records)[1:]:
        totals = total_ratios(records, arm)
        if totals:
            rows[f"total/{arm}"] = {
                "measured_ratio": _stats([t["measured"] for t in totals.values()]),
                "ideal_ratio": _stats([t["ideal"] for t in totals.values()]),
            }
        for stage in STAGES:  # paired accuracy difference arm - dense, per seed
            pairs = {}
            for r in records:
                if r.stage == stage and r.arm in (arm, "dense"):
                    pairs.setdefault(r.seed, {})[r.arm] = r.accuracy
            diffs = [p[arm] - p["dense"] for p in pairs.values() if len(p) == 2]
            if diffs:
                rows[f"{stage}/{arm}-dense"] = {"accuracy": _stats(diffs)}
    return rows


def arm_names(records: list[StageRecord]) -> list[str]:
    """The arms in their order, dense first."""
    names = list(dict.fromkeys(r.arm for r in records))
    return sorted(names, key=lambda n: n != "dense")


def _pm(s: dict, scale: float = 1.0, digits: int = 2, spread: bool = True) -> str:
    """'mean ± std (min-max)' (just the mean for one seed)."""
    f = f"{{:.{digits}f}}"
    text = f.format(scale * s["mean"])
    if s["n"] > 1 and spread:
        text += f" ± {f.format(scale * s['std'])} ({f.format(scale * s['min'])}-"
        text += f"{f.format(scale * s['max'])})"
    return text


def format_tables(summary: dict, questions: tuple[str, ...], arms: list[str]) -> str:
    """Step time / memory / ratios per stage and in total, then accuracy after each stage."""
    w = max(7, *(len(a) + 2 for a in arms))
    head = (
        f"{'stage':<10}{'arm':<{w}}{'step ms':>9}{'peak MB':>9}{'vis tok':>8}{'layers':>8}"
        f"{'ideal':>7}  {'meas. step-time ratio':<30}"
    )
    lines = [head, "-" * len(head)]
    for stage in (*STAGES, "total"):
        for arm in arms:
            row = summary.get(f"{stage}/{arm}")
            if row is None:
                continue
            if stage == "total":
                lines.append(
                    f"{'total':<10}{arm:<{w}}{'':>34}"
                    f"{row['ideal_ratio']['mean']:>7.2f}  {_pm(row['measured_ratio'])}"
                )
                continue
            lines.append(
                f"{stage:<10}{arm:<{w}}{row['step_time_ms']['mean']:>9.1f}"
                f"{row['peak_memory_mb']['mean']:>9.0f}"
                f"{row['visual_tokens_per_image']['mean']:>8.0f}"
                f"{row['layer_fraction']['mean']:>8.2f}{row['ideal_ratio']['mean']:>7.2f}  "
                f"{_pm(row['measured_ratio'])}"
            )
    acc_head = f"{'after':<10}{'arm':<{w}}{'loss':>7}  {'acc % (served dense)':<26}" + "".join(
        f"{q:>13}" for q in questions
    )
    lines += ["", acc_head, "-" * len(acc_head)]
    for stage in STAGES:
        for arm in arms:
            row = summary.get(f"{stage}/{arm}")
            if row is None:
                continue
            spread = row["accuracy"]["n"] > 1
            by_q = "".join(
                f"{100 * row['accuracy_by_question'][q]['mean']:>8.1f}"
                + (f" ±{100 * row['accuracy_by_question'][q]['std']:>3.1f}" if spread else " " * 5)
                for q in questions
                if q in row["accuracy_by_question"]
            )
            lines.append(
                f"{stage:<10}{arm:<{w}}{row['final_loss']['mean']:>7.3f}  "
                f"{_pm(row['accuracy'], 100, 1):<26}{by_q}"
            )
        for arm in arms[1:]:
            delta = summary.get(f"{stage}/{arm}-dense")
            if delta is not None:
                label = f"{arm}-dense"
                lines.append(
                    f"{stage:<10}{label:<{w + 7}}  {_pm(delta['accuracy'], 100, 1)}  (paired)"
                )
    return "\n".join(lines)


def plot(records: list[StageRecord], path: Path, title: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colours = {"dense": "tab:blue", "sts": "tab:orange"}
    for ax, stage in zip(axes, STAGES):
        for r in records:
            if r.stage != stage:
                continue
            k = max(1, len(r.losses) // 25)
            smooth = [
                statistics.fmean(r.losses[max(0, i - k) : i + 1]) for i in range(len(r.losses))
            ]
            first = r.seed == min(x.seed for x in records)
            ax.plot(smooth, color=colours[r.arm], alpha=0.8, label=r.arm if first else None)
        what = "VTC" if stage == "align" else "LDS"
        ax.set(
            xlabel="step",
            ylabel="training loss (smoothed)",
            yscale="log",
            title=f"stage {STAGES.index(stage) + 1}: {stage} (sts = {what})",
        )
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench --scheme", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--scheme", action="store_true", help="(the switch that selects this run)")
    p.add_argument("--model", choices=demo.MODELS, default="llava")
    p.add_argument("--task", choices=sorted(demo.TASKS), default="default")
    p.add_argument("--align-steps", type=int, default=60, help="stage 1 steps")
    p.add_argument("--instruct-steps", type=int, default=120, help="stage 2 steps")
    p.add_argument("--seeds", type=int, default=1, help="seeds seed..seed+N-1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (0: every core)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model-size", choices=sorted(demo.MODEL_SIZES), default="tiny")
    p.add_argument("--image-size", type=int, default=32, help="pixels; patch 4: (size/4)^2 tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--warmup-steps", type=int, default=5, help="rounds left out of the medians")
    p.add_argument("--vtc", default="pool2", help="stage-1 VTC: pool2, pool3, merge0.5, ...")
    p.add_argument("--p-max", type=float, default=0.5, help="stage-2 LDS skip probability")
    p.add_argument("--lds-mode", choices=("sample", "token"), default="sample")
    p.add_argument("--policy", choices=("schedule", "router", "importance"), default="schedule")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    args.compress = vtc_arguments(args.vtc)
    args.skip = lds_arguments(args.lds_mode, args.policy, args.p_max)
    return args


def lds_arguments(mode: str, policy: str, p: float) -> dict:
    """LDS arguments skipping about `p` of the eligible layers' rows: schedule p_max=p
    (depth-linear, so p / 2 on average), router capacity 1 - p, importance target_skip p."""
    skip = {"mode": mode, "policy": policy}
    key, value = {"schedule": ("p_max", p), "router": ("capacity", 1 - p)}.get(
        policy, ("target_skip", p)
    )
    return skip | {key: value}


def vtc_arguments(name: str) -> dict:
    """'pool2' -> 2x2 pooling, 'merge0.5' -> bipartite merge keeping half the tokens."""
    if name.startswith("pool"):
        w = int(name[4:])
        return {"mode": "pool", "window": (w, w)}
    if name.startswith("merge"):
        return {"mode": "merge", "ratio": float(name[5:])}
    raise ValueError(f"--vtc: poolN or mergeR, got {name!r}")


def run_all(args, task, device, specs, kind: str, record: dict) -> list[StageRecord]:
    """Every seed of `args` for the arms `specs`, with progress lines and `record` (completed
    with the environment, the records and their summary) rewritten as JSON after every stage
    to `<args.out>/<kind>_<model>_<task>_<device>_<date>.json` (record["stem"]); record["table"]
    at the end."""
    from sts_kernels.env import collect

    seeds = list(range(args.seed, args.seed + args.seeds))
    tag = demo.device_tag(device)
    stem = None
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        date = dt.datetime.now().strftime("%Y%m%d-%H%M")
        stem = out / f"{kind}_{args.model}_{args.task}_{tag}_{date}"
        record["stem"] = str(stem)
    record.update(
        arms=[asdict(s) for s in specs],
        task=asdict(task),
        device=tag,
        platform=platform.platform(),
        load_average_start=os.getloadavg(),
        env={k: str(v) for k, v in collect().items()},
        complete=False,
    )

    def write(records):
        record["records"] = [asdict(r) for r in records]
        record["summary"] = summarize(records)
        if stem is not None:
            stem.with_suffix(".json").write_text(json.dumps(record, indent=1))

    rounds = len(seeds) * (args.align_steps + args.instruct_steps)
    print(f"{rounds} rounds of {len(specs)} steps; the first rounds set the ETA", flush=True)
    progress = Progress(rounds, print)
    everything: list[StageRecord] = []
    start = time.perf_counter()
    for seed in seeds:
        prior = list(everything)
        everything += run_seed(
            args, task, device, seed, specs, progress, lambda rs, prior=prior: write(prior + rs)
        )
    record["complete"] = True
    record["wall_s"] = time.perf_counter() - start
    record["load_average_end"] = os.getloadavg()
    record["table"] = format_tables(summarize(everything), task.questions, arm_names(everything))
    write(everything)
    return everything


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    task = demo.TASKS[args.task][0](image_size=args.image_size)
    size = demo.MODEL_SIZES[args.model_size]
    tag = demo.device_tag(device)
    name = "LLaVA" if args.model == "llava" else "Qwen2.5-VL"
    seeds = list(range(args.seed, args.seed + args.seeds))
    specs = scheme_arms(args)
    title = (
        f"STS scheme: {name} {args.model_size} (LM {size.text_layers}x{size.text_hidden}), "
        f"task {args.task}, {task.image_tokens} image tokens, batch {args.batch_size}, "
        f"align {args.align_steps} + instruct {args.instruct_steps} steps, "
        f"{len(seeds)} seed(s), {tag}, {torch.get_num_threads()} thread(s); "
        f"sts = VTC {args.vtc} / LDS {args.lds_mode} {args.policy} p_max {args.p_max}"
    )
    print(title, flush=True)
    record = {"title": title, "args": dict(vars(args)), "model": asdict(size)}
    everything = run_all(args, task, device, specs, "scheme", record)
    table = record["table"]
    print()
    print(title)
    print(table)
    print(
        "ideal = FLOP ratio vs dense in that stage (bench/flops.py; frozen parts as trained "
        "there); meas. = median over rounds of the STS step time over dense's in the same round, "
        "mean ± std (min-max) over seeds; total = both stages, each weighted by its dense time; "
        "acc = held-out answers, model served dense (eval, patch disabled); sts-dense = paired "
        f"difference per seed. Wall {record['wall_s'] / 60:.1f} min, load average "
        f"{record['load_average_start'][0]:.1f} -> {record['load_average_end'][0]:.1f}."
    )
    stem = record.get("stem")
    if stem is not None:
        drew = plot(everything, Path(stem + ".png"), title)
        print(f"wrote {stem}.json" + (f" and {stem}.png" if drew else ""))
    return record
