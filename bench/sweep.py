"""`python -m bench.sweep`: accuracy against measured step-time ratio for the STS options, on
the two-stage scheme of bench/scheme.py (not in CI: it trains a dozen arms side by side).

Arms, all from the same weights and batches, interleaved round by round with dense / dense:

    VTC in stage 1 (stage 2: LDS sample schedule p_max 0.5):  pool 2x2, pool 3x3,
        merge keeping 0.5, merge keeping 0.75
    LDS in stage 2 (forked after stage 1 of the pool 2x2 arm, so they share its stage 1):
        schedule p_max 0.25 / 0.5 / 0.75 in sample mode and in token mode,
        router (capacity 0.7) and importance (target_skip 0.3), sample mode
        (about the mean skip of schedule p_max 0.5: p_max * (n + 1) / 2n over n = 4 layers)

Before training it times one dense step of each stage and prints how long the sweep will take
(every arm counted at dense's cost: an upper bound). Writes
`bench/results/sweep_<model>_<task>_<device>_<date>.json` (rewritten after every stage) and
`.png` (accuracy after stage 2, served dense, against the total measured step-time ratio;
per stage too).

    python -m bench.sweep                     # 12 arms, 60 + 120 rounds (the scheme's)
    python -m bench.sweep --align-steps 40 --instruct-steps 80 --arms pool2,pool3
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from . import demo, scheme
from .scheme import ArmSpec

_LDS = {"mode": "sample", "policy": "schedule", "p_max": 0.5}


def all_arms() -> list[ArmSpec]:
    arms = [ArmSpec("dense")]
    for vtc in ("pool2", "pool3", "merge0.5", "merge0.75"):
        arms.append(ArmSpec(vtc, scheme.vtc_arguments(vtc), dict(_LDS)))
    for mode in ("sample", "token"):
        for p in (0.25, 0.5, 0.75):
            if (mode, p) != ("sample", 0.5):  # = the pool2 arm
                skip = scheme.lds_arguments(mode, "schedule", p)
                arms.append(ArmSpec(f"lds-{mode}-{p}", None, skip, fork="pool2"))
    for policy in ("router", "importance"):
        skip = scheme.lds_arguments("sample", policy, 0.3)
        arms.append(ArmSpec(f"lds-{policy}", None, skip, fork="pool2"))
    return arms


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default="", help="comma list of arm names (default: all)")
    p.add_argument("--model", choices=demo.MODELS, default="llava")
    p.add_argument("--task", choices=sorted(demo.TASKS), default="default")
    p.add_argument("--align-steps", type=int, default=60)
    p.add_argument("--instruct-steps", type=int, default=120)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model-size", choices=sorted(demo.MODEL_SIZES), default="tiny")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return p.parse_args(argv)


def select(arms: list[ArmSpec], names: str) -> list[ArmSpec]:
    """The named arms (dense always; a fork's parent joins it)."""
    if not names:
        return arms
    wanted = {"dense", *names.split(",")}
    known = {a.name for a in arms}
    if wanted - known:
        raise SystemExit(f"--arms: unknown {sorted(wanted - known)}; choose from {sorted(known)}")
    wanted |= {a.fork for a in arms if a.name in wanted and a.fork}
    return [a for a in arms if a.name in wanted]


def estimate_s(args, task, device) -> float:
    """Seconds for the sweep, every arm at dense's cost (an upper bound), from one timed dense
    step of each stage (after one untimed)."""
    make_batch = demo.TASKS[args.task][1]
    batch = make_batch(task, args.seed, list(range(args.batch_size)))
    arm = scheme.Arm(ArmSpec("dense"), args, task, device, args.seed)
    per_step = {}
    for stage in scheme.STAGES:
        arm.begin(stage, 2)
        arm.step(batch)
        arm.step(batch)
        per_step[stage] = arm.record.step_times_ms[-1] / 1e3
    return per_step


def plot(summary: dict, arms: list[str], path: Path, title: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, (what, key) in zip(
        axes, (("total (both stages)", "total"), ("stage 2 only (LDS)", "instruct"))
    ):
        for arm in arms:
            acc = summary.get(f"instruct/{arm}", {}).get("accuracy")
            row = summary.get(f"{key}/{arm}") if arm != "dense" else None
            x = 1.0 if row is None else row["measured_ratio"]["mean"]
            if acc is None or (arm != "dense" and row is None):
                continue
            marker = "s" if arm == "dense" else ("o" if arm.startswith("lds") else "^")
            ax.errorbar(
                x, 100 * acc["mean"], yerr=100 * acc["std"], fmt=marker, capsize=3, label=arm
            )
            ax.annotate(
                arm, (x, 100 * acc["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        ax.set(
            xlabel=f"measured step-time ratio vs dense, {what}",
            ylabel="held-out accuracy % after stage 2 (served dense)",
        )
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or (os.cpu_count() or 1))
    device = torch.device(args.device)
    task = demo.TASKS[args.task][0](image_size=args.image_size)
    specs = select(all_arms(), args.arms)
    seeds = list(range(args.seed, args.seed + args.seeds))
    tag = demo.device_tag(device)
    n1 = sum(1 for s in specs if s.fork is None)
    n2 = len(specs)
    per_step = estimate_s(args, task, device)
    upper = len(seeds) * (
        n1 * args.align_steps * per_step["align"] + n2 * args.instruct_steps * per_step["instruct"]
    )
    title = (
        f"STS sweep: {args.model} {args.model_size}, task {args.task}, {task.image_tokens} image "
        f"tokens, batch {args.batch_size}, align {args.align_steps} + instruct "
        f"{args.instruct_steps} steps, {len(seeds)} seed(s), {tag}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    print(title)
    print(
        f"{n1} arms in stage 1, {n2} in stage 2; a dense step takes {per_step['align']:.2f} s "
        f"(align) / {per_step['instruct']:.2f} s (instruct) now, load average "
        f"{os.getloadavg()[0]:.1f}: the sweep takes at most ~{upper / 60:.0f} min at this load "
        "(every arm at dense's cost).",
        flush=True,
    )
    record = {"title": title, "args": dict(vars(args)), "estimate_s": upper}
    everything = scheme.run_all(args, task, device, specs, "sweep", record)
    names = scheme.arm_names(everything)
    summary = record["summary"]
    print()
    print(title)
    print(record["table"])
    print(
        f"Wall {record['wall_s'] / 60:.1f} min, load average "
        f"{record['load_average_start'][0]:.1f} -> {record['load_average_end'][0]:.1f}. "
        "LDS arms forked from pool2 after stage 1 share its stage-1 row."
    )
    stem = record.get("stem")
    if stem is not None:
        drew = plot(summary, names, Path(stem + ".png"), title)
        print(f"wrote {stem}.json" + (f" and {stem}.png" if drew else ""))
    return record


if __name__ == "__main__":
    main()
