"""bench/flops.py + bench/plan.py against FLOP counts worked out by hand for two tiny configs,
the plan CLI's tables for the real shapes, and bench/e2e.py's tiny shape on CPU."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from bench import e2e, flops, plan  # noqa: E402


def plan_args(*argv: str):
    """The plan CLI's parsed options (STS defaults unless given)."""
    import argparse

    p = argparse.ArgumentParser()
    plan.add_workload_args(p)
    return p.parse_args(list(argv))


def dense_and_lds(config, stage: str, *argv: str) -> dict:
    """{setting: step FLOPs} of bench.plan's rows for `config`."""
    args = plan_args(*argv)
    model = flops.from_hf_config(config)
    work = plan.workload(model, config, args, None)
    rows = plan.stage_rows(model, work, plan.training(stage, args), plan.sts_options(args))
    return {r["setting"]: r["tflop"] * 1e12 for r in rows}


def test_llama_only_config_matches_hand_count():
    """Llama, d=64, 2 layers, 4 query heads / 2 kv heads of 16, MLP 128, vocab 100; batch 2 x
    16 tokens; every part trained (3x forward), no checkpointing."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    t, b = 16, 2
    attn_weights = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64  # q, k, v (2 heads x 16), o
    mlp_weights = 3 * 64 * 128  # gate, up, down
    layer = 2 * t * (attn_weights + mlp_weights) + 4 * t * t * 4 * 16  # + QK^T, PV
    assert layer == 1_179_648 + 65_536
    head = 2 * t * 64 * 100
    dense = 3 * b * (2 * layer + head)
    # LDS with every layer eligible: p = 0.5 * 1/2, 0.5 * 2/2 -> layers run 0.75 + 0.5 of 2
    lds = 3 * b * (0.75 * layer + 0.5 * layer + head)
    argv = ("--text", "16", "--batch", "2", "--no-checkpointing", "--all-layers-skip")
    got = dense_and_lds(config, "full", *argv)
    assert got["dense"] == pytest.approx(dense, rel=1e-12) == 16_171_008
    assert got["lds"] == pytest.approx(lds, rel=1e-6)
    assert got["vtc"] == got["dense"]  # no images: nothing to compress
    # gradient checkpointing: one more forward of the decoder layers
    with_ckpt = dense_and_lds(config, "full", "--text", "16", "--batch", "2")
    assert with_ckpt["dense"] == pytest.approx(dense + b * 2 * layer, rel=1e-12)


def test_tiny_llava_align_stage_matches_hand_count():
    """CLIP d=32 (2 layers, 2 heads, MLP 64), 16 px images of 4 px patches (16 patches + CLS),
    projector 32 -> 64 -> 64, Llama d=64 (2 layers, 4 heads of 16, MLP 128, vocab 100); one
    image + 8 text tokens, batch 1. Align: the tower (frozen, first) runs forward only, the
    projector trains, the frozen LM and head pass input gradients back; checkpointing recomputes
    the LM layers once."""
    import transformers as tf

    config = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        ),
        text_config=tf.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=100,
        ),
        image_token_index=99,
        vision_feature_layer=-2,
    )
    patch_embed = 2 * 16 * (3 * 4 * 4) * 32
    clip_layer = 2 * 17 * (4 * 32 * 32 + 2 * 32 * 64) + 4 * 17 * 17 * 2 * 16
    tower = patch_embed + 2 * clip_layer
    assert tower == 49_152 + 2 * (278_528 + 36_992)
    projector = 2 * 16 * (32 * 64 + 64 * 64)  # CLS dropped ("default")

    def lm(t: int) -> float:
        """Forward + input-gradient backward + recompute of the frozen decoder, and forward +
        input-gradient backward of the head, for t tokens."""
        linear = 2 * 2 * t * (4 * 64 * 64 + 3 * 64 * 128)
        core = 2 * 4 * t * t * 4 * 16
        head = 2 * t * 64 * 100
        return (linear + core) + (linear + 2 * core) + (linear + core) + 2 * head

    dense = tower + 3 * projector + lm(8 + 16)
    vtc = tower + 3 * projector + lm(8 + 4)  # 2x2 pooling of the 4x4 grid: 4 tokens
    got = dense_and_lds(config, "align", "--text", "8", "--batch", "1", "--resolution", "16")
    assert got["dense"] == pytest.approx(dense, rel=1e-12)
    assert got["vtc"] == pytest.approx(vtc, rel=1e-12)
    # 2 LM layers, first/last kept dense: LDS skips nothing
    assert got["lds"] == pytest.approx(dense, rel=1e-12)


@pytest.mark.parametrize(
    "shape, visual", [("llava-1.5-7b", "576 visual tokens"), ("qwen2.5-vl-3b", "576 visual")]
)
def test_plan_cli_prints_projected_tables(shape, visual, capsys):
    report = plan.main(["--shape", shape, "--lora"])
    assert capsys.readouterr().out.strip() == report.strip()
    assert report.startswith("projected (FLOP model")
    assert visual in report
    for stage in ("align", "instruct", "full", "lora"):
        assert f"stage {stage}:" in report
    rows = [line.split() for line in report.splitlines() if line.startswith("  ")]
    dense, vtc = rows[2:4]  # the align stage's (after its header and rule)
    assert dense[0] == "dense" and dense[2] == "1.00"
    assert vtc[0] == "vtc" and float(vtc[2]) < 0.6


def test_plan_reads_a_config_json(tmp_path, capsys):
    plan._tiny_llava().save_pretrained(tmp_path)
    report = plan.main([str(tmp_path / "config.json"), "--text", "16"])
    assert "config.json (llava)" in report and "64 visual tokens" in report


def test_e2e_tiny_runs_every_setting_and_writes_json(tmp_path):
    argv = ["--shape", "tiny", "--steps", "2", "--warmup", "1", "--batch", "2", "--seq", "8"]
    out = e2e.main([*argv, "--out", str(tmp_path)])
    (path,) = tmp_path.glob("e2e_tiny_align_*.json")
    saved = json.loads(path.read_text())
    assert saved["complete"] and saved["rounds_done"] == 2
    assert saved["training"]["checkpointing"] and saved["git_commit"]
    results = {r["setting"]: r for r in saved["results"]}
    assert list(results) == list(flops.SETTINGS)
    for r in results.values():
        assert len(r["step_times_ms"]) == 2 and r["step_time_ms"] > 0
        assert r["mfu"] is None and r["peak_memory_mb"] is None  # CPU: n/a
    assert results["vtc"]["visual_tokens"] == [16.0, 16.0]  # 8x8 grid pooled 2x2
    assert results["vtc"]["ideal_ratio"] < 0.6 and results["dense"]["ideal_ratio"] == 1.0
    assert min(results["lds"]["layer_fractions"]) < 1.0  # seeded draws: some rows skip
    assert "n/a" in out["table"]
