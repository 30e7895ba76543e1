"""Projected STS savings for a model, from the FLOP model of bench/flops.py (nothing runs).

    python -m bench.plan --shape llava-1.5-7b
    python -m bench.plan --shape qwen2.5-vl-3b --resolution 448 --text 512 --lora
    python -m bench.plan path/to/config.json --images 2 --vtc merge --ratio 0.5 --p-max 0.3

For each stage (align: projector trained; instruct: projector + LM; full: everything;
lora with `--lora`: projector + LoRA adapters on the LM) prints the projected step-time ratio
to dense of dense / VTC / LDS / VTC+LDS (FLOPs over dense's FLOPs: a compute-bound step) and
where the FLOPs go. The shapes' configs are built here from transformers' config classes with
the real models' sizes: no download.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from . import flops


def _llava_1_5_7b():
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px (576 patches + CLS, features of the
    second-to-last layer), 2-layer GELU MLP projector, Vicuna-7B (Llama 2 7B) LM."""
    import transformers as tf

    return tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
            hidden_act="quick_gelu",
        ),
        text_config=tf.LlamaConfig(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            pad_token_id=32001,
        ),
        image_token_index=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def _qwen2_5_vl_3b():
    """Qwen/Qwen2.5-VL-3B-Instruct: 32-block window-attention ViT (1280 wide, 14 px patches,
    windows of 112 px, full attention in blocks 7/15/23/31), 2x2 patch merger, Qwen2 LM of 36
    layers 2048 wide with 16 query / 2 key-value heads."""
    import transformers as tf

    return tf.Qwen2_5_VLConfig(
        vision_config=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=2048,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            hidden_act="silu",
        ),
        text_config=dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [16, 24, 24],
            },
            bos_token_id=151643,
            eos_token_id=151645,
        ),
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=True,
    )


def _tiny_llava():
    """A LLaVA small enough to train on a CPU in seconds: CLIP 2x64 (32 px, 4 px patches: 64
    tokens), Llama 4x128 with a 512-token vocabulary."""
    import transformers as tf

    return tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=4,
        ),
        text_config=tf.LlamaConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            pad_token_id=0,
        ),
        image_token_index=511,
        vision_feature_layer=-2,
    )


def _tiny_qwen2_5_vl():
    """A Qwen2.5-VL small enough for a CPU: 2-block tower 64 wide (4 px patches, windows of 4x4
    visual tokens, the last block full), 2x2 merger, Qwen2 LM 4x128 (M-RoPE), 512 tokens."""
    import transformers as tf

    return tf.Qwen2_5_VLConfig(
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            out_hidden_size=128,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=32,
            fullatt_block_indexes=[1],
        ),
        text_config=dict(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]},
            bos_token_id=1,
            eos_token_id=2,
        ),
        image_token_id=508,
        video_token_id=509,
        vision_start_token_id=506,
        vision_end_token_id=507,
    )


@dataclass(frozen=True)
class Shape:
    """A named model shape and the workload it is planned / benchmarked with by default."""

    config: Callable[[], object]
    resolution: int
    text: int
    batch: int
    stage: str
    title: str


SHAPES = {
    "llava-1.5-7b": Shape(_llava_1_5_7b, 336, 64, 8, "align", "LLaVA-1.5-7B"),
    "qwen2.5-vl-3b": Shape(_qwen2_5_vl_3b, 672, 256, 4, "full", "Qwen2.5-VL-3B"),
    "tiny": Shape(_tiny_llava, 32, 32, 2, "align", "tiny LLaVA"),
    "tiny-qwen2.5-vl": Shape(_tiny_qwen2_5_vl, 64, 32, 2, "full", "tiny Qwen2.5-VL"),
}


def load_config(path: str):
    """A transformers config from a config.json (or its folder), offline."""
    from transformers import AutoConfig

    path = Path(path)
    return AutoConfig.from_pretrained(path.parent if path.is_file() else path)


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """Arguments bench.plan and bench.e2e share (shape defaults where left None)."""
    p.add_argument("--shape", choices=sorted(SHAPES), help="a built-in model shape")
    p.add_argument("--images", type=int, default=1, help="images per sample")
    p.add_argument("--resolution", type=int, help="image side in pixels (shape default)")
    p.add_argument(
        "--text", "--seq", dest="text", type=int, help="text tokens per sample, besides images"
    )
    p.add_argument("--batch", type=int, help="samples per step (shape default)")
    p.add_argument("--lora", action="store_true", help="LoRA on the LM (instruct stage)")
    p.add_argument("--lora-rank", type=int, default=128)
    p.add_argument(
        "--no-checkpointing",
        dest="checkpointing",
        action="store_false",
        help="no gradient checkpointing (default: the tower's and LM's layers, as LLaVA trains)",
    )
    p.add_argument("--vtc", choices=("pool", "merge"), default="pool")
    p.add_argument("--window", type=int, default=2, help="VTC pool: window side")
    p.add_argument("--ratio", type=float, default=0.5, help="VTC merge: share of tokens kept")
    p.add_argument("--p-max", type=float, default=0.5, help="LDS schedule: deepest layer's p")
    p.add_argument(
        "--all-layers-skip",
        dest="keep_first_last",
        action="store_false",
        help="LDS: the first and last layer may skip too",
    )


def sts_options(args) -> flops.StsOptions:
    return flops.StsOptions(args.vtc, args.window, args.ratio, args.p_max, args.keep_first_last)


def training(stage: str, args) -> flops.Training:
    base = flops.STAGES[stage]
    return replace(base, lora_rank=args.lora_rank, checkpointing=args.checkpointing)


def workload(model: flops.Vlm, config, args, shape: Shape | None) -> flops.Workload:
    """The args' workload; left out: the shape's defaults, else the tower's own image size
    (CLIP) and 256 text tokens."""
    vision = getattr(config, "vision_config", None)
    resolution = args.resolution or (shape.resolution if shape else None)
    resolution = resolution or getattr(vision, "image_size", None)
    if model.tower is not None and resolution is None:
        raise SystemExit("this tower takes any image size: give --resolution")
    return flops.Workload(
        batch=args.batch or (shape.batch if shape else 1),
        text_tokens=args.text or (shape.text if shape else 256),
        images=args.images if model.tower is not None else 0,
        resolution=(resolution or 0, resolution or 0),
    )


def describe(model: flops.Vlm, work: flops.Workload, options: flops.StsOptions) -> str:
    lm = model.lm
    parts = [f"LM {lm.layers}x{lm.hidden} ({lm.heads}/{lm.kv_heads} heads, vocab {model.vocab})"]
    if model.tower is not None:
        t = model.tower.blocks
        n = model.tower.visual_tokens(work.resolution)
        kept = flops.visual_tokens_kept(model, work, options)
        h, w = work.resolution
        parts.insert(0, f"tower {t.layers}x{t.hidden}")
        parts.append(
            f"{work.images} image(s) of {h}x{w} px -> {n} visual tokens each, VTC {options.vtc} "
            f"-> {kept}"
        )
    fraction = flops.expected_layer_fraction(lm.layers, options)
    first_last = ", first/last dense" if options.keep_first_last else ""
    parts.append(f"LDS p_max {options.p_max}{first_last} -> {fraction:.3f} of LM layer rows")
    parts.append(f"{work.text_tokens} text tokens, batch {work.batch}")
    return "; ".join(parts)


STAGE_TRAINS = {
    "align": "projector",
    "instruct": "projector + LM",
    "full": "tower + projector + LM",
    "lora": "projector + LoRA(LM)",
}
_SHARES = (
    ("tower", ("tower",)),
    ("proj", ("projector",)),
    ("LM attn", ("lm_attention",)),
    ("LM MLP", ("lm_mlp",)),
    ("LM head", ("lm_head",)),
)


def stage_rows(model, work, train: flops.Training, options) -> list[dict]:
    """Per setting: step TFLOPs, ratio to dense and each part's share of the setting's FLOPs."""
    dense = flops.total(flops.step_flops(model, work, train))
    rows = []
    for setting in flops.SETTINGS:
        sparsity = flops.expected_sparsity(setting, model, work, options)
        parts = flops.step_flops(model, work, train, sparsity)
        step = flops.total(parts)
        shares = {
            name: sum(parts[k].total for k in keys if k in parts) / step for name, keys in _SHARES
        }
        rows.append({"setting": setting, "tflop": step / 1e12, "ratio": step / dense, **shares})
    return rows


def format_stage(stage: str, train: flops.Training, rows: list[dict]) -> str:
    ckpt = "gradient checkpointing" if train.checkpointing else "no checkpointing"
    lines = [f"stage {stage}: trains {STAGE_TRAINS[stage]}, {ckpt}"]
    head = f"  {'setting':<9}{'TFLOP/step':>11}{'ratio':>7}{'speedup':>9}" + "".join(
        f"{name:>9}" for name, _ in _SHARES
    )
    lines += [head, "  " + "-" * (len(head) - 2)]
    for r in rows:
        lines.append(
            f"  {r['setting']:<9}{r['tflop']:>11.4g}{r['ratio']:>7.2f}{1 / r['ratio']:>8.2f}x"
            + "".join(f"{100 * r[name]:>8.1f}%" for name, _ in _SHARES)
        )
    return "\n".join(lines)


def plan(model: flops.Vlm, work: flops.Workload, args, title: str) -> str:
    """The whole report: header, then one table per stage."""
    options = sts_options(args)
    stages = ["align", "instruct", "full"] + (["lora"] if args.lora else [])
    if model.tower is None:
        stages = ["full"] + (["lora"] if args.lora else [])
    blocks = [
        f"projected (FLOP model, bench/flops.py; not measured): {title}",
        describe(model, work, options),
    ]
    for stage in stages:
        train = training(stage, args)
        blocks.append(format_stage(stage, train, stage_rows(model, work, train, options)))
    blocks.append(
        "ratio = step FLOPs / dense step FLOPs (forward + backward + recompute), the projected "
        "step-time ratio of a compute-bound step; shares = part's FLOPs / the setting's; LM attn "
        "= q/k/v/o projections + QK^T and PV over the full T x T."
    )
    return "\n\n".join(blocks)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="python -m bench.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", help="a Hugging Face config.json (or its folder)")
    add_workload_args(p)
    args = p.parse_args(argv)
    if (args.config is None) == (args.shape is None):
        p.error("give a config.json path or --shape NAME (one of them)")
    shape = SHAPES[args.shape] if args.shape else None
    config = shape.config() if shape else load_config(args.config)
    model = flops.from_hf_config(config)
    title = shape.title if shape else f"{args.config} ({config.model_type})"
    report = plan(model, workload(model, config, args, shape), args, title)
    print(report)
    return report


if __name__ == "__main__":
    main()
