"""The two-stage scheme (bench/scheme.py) and its sweep (bench/sweep.py), short: stage 1 with
VTC and the LM frozen, the StsCallback-style switch to LDS, evaluation of the model as served
(unpatched), seeds with mean / std, the JSON written as it goes."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from bench import demo, scheme, sweep  # noqa: E402

pytestmark = pytest.mark.slow

SHORT = ["--align-steps", "3", "--instruct-steps", "3", "--warmup-steps", "1"]
SHORT += ["--image-size", "16", "--batch-size", "2", "--eval-samples", "8", "--threads", "1"]


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_scheme_runs_both_stages_over_seeds(tmp_path):
    record = scheme.main([*SHORT, "--seeds", "2", "--out", str(tmp_path)])
    recs = record["records"]
    assert [(r["stage"], r["arm"], r["seed"]) for r in recs] == [
        (stage, arm, seed) for seed in (0, 1) for stage in scheme.STAGES for arm in ("dense", "sts")
    ]
    by = {(r["stage"], r["arm"], r["seed"]): r for r in recs}
    # stage 1: VTC pools the 4x4 grid to 2x2, every LM layer runs; stage 2: all tokens, LDS
    assert by["align", "sts", 0]["visual_tokens_per_image"] == 4
    assert by["align", "sts", 0]["layer_fraction"] == 1.0
    assert by["instruct", "sts", 0]["visual_tokens_per_image"] == 16
    assert by["instruct", "sts", 0]["layer_fraction"] < 1.0
    assert by["align", "dense", 0]["visual_tokens_per_image"] == 16
    # same data, same seed, same start: the arms' first losses agree (VTC changes the input)
    assert by["instruct", "dense", 1]["steps"] == by["instruct", "sts", 1]["steps"] == 3
    summary = record["summary"]
    assert summary["instruct/sts"]["accuracy"]["n"] == 2
    assert summary["total/sts"]["measured_ratio"]["n"] == 2
    assert "instruct  sts-dense" in record["table"]
    (written,) = tmp_path.glob("scheme_llava_default_*.json")
    on_disk = json.loads(written.read_text())
    assert on_disk["complete"] and len(on_disk["records"]) == 8


def test_stage_switch_trains_the_right_parts():
    args = scheme.parse_args(SHORT)
    task = demo.TASKS["default"][0](image_size=16)
    arm = scheme.Arm(scheme.scheme_arms(args)[1], args, task, torch.device("cpu"), 0)
    groups = scheme.parts(arm.model, "llava")
    arm.begin("align", 3)
    assert arm.handle.compressor is not None and arm.handle.skipper is None
    assert all(p.requires_grad for p in groups["projector"])
    assert not any(p.requires_grad for p in groups["lm"] + groups["tower"])
    first = arm.handle
    arm.begin("instruct", 3)
    assert arm.handle is not first and arm.handle.compressor is None
    assert arm.handle.skipper is not None
    assert all(p.requires_grad for p in groups["projector"] + groups["lm"])
    assert not any(p.requires_grad for p in groups["tower"])


def test_served_eval_is_the_unpatched_model():
    """What the scheme evaluates (eval mode, patch disabled) equals the model after
    handle.remove(), bit for bit, for a patch with VTC and LDS."""
    from sts_kernels.integrations.hf import apply_sts

    task = demo.TaskConfig(image_size=16)
    model = demo.build_model("llava", demo.MODEL_SIZES["tiny"], task, 0)
    handle = apply_sts(model)
    batch = demo.make_batch(task, 0, [0, 1], split="eval")
    inputs = demo.model_inputs("llava", batch, task)
    acc, _ = demo.held_out_accuracy(model, handle, [batch], lambda b: inputs, task.questions)
    assert handle.enabled and model.training  # restored afterwards
    model.eval()
    handle.enabled = False
    with torch.no_grad():
        served = model(**inputs).logits
        handle.remove()
        unpatched = model(**inputs).logits
    assert torch.equal(served, unpatched)
    assert acc == demo.answer_accuracy(unpatched, inputs["labels"]).float().mean().item()


def test_sweep_short_selected_arms(tmp_path):
    record = sweep.main([*SHORT, "--arms", "pool3,lds-sample-0.25", "--out", str(tmp_path)])
    names = scheme.arm_names(
        [scheme.StageRecord(r["arm"], r["stage"], r["seed"], r["steps"]) for r in record["records"]]
    )
    assert names == ["dense", "pool2", "pool3", "lds-sample-0.25"]  # pool2: the fork's parent
    fork = [r for r in record["records"] if r["arm"] == "lds-sample-0.25"]
    assert [r["stage"] for r in fork] == ["align", "instruct"]
    assert fork[0]["shared_from"] == "pool2"
    assert record["summary"]["align/pool3"]["visual_tokens_per_image"]["mean"] == 4  # ceil 4/3
    assert record["estimate_s"] > 0
    assert list(tmp_path.glob("sweep_*.png"))
