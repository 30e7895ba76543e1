"""The STS demo (bench/demo.py): seeded runs reproduce their losses, the settings interleave,
and the Qwen2.5-VL variant trains with the same comparison."""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tqdm")

from bench import demo  # noqa: E402

pytestmark = pytest.mark.slow

SHORT = ["--steps", "3", "--warmup-steps", "1", "--image-size", "16", "--batch-size", "2"]
SHORT += ["--eval-samples", "4", "--out", "", "--threads", "1"]


@pytest.fixture(autouse=True)
def _threads():
    """main() sets the thread count for its run; the other tests keep theirs."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(*extra: str) -> dict:
    return demo.main([*SHORT, *extra])


def test_seeded_runs_reproduce_losses_and_accuracy():
    first = run("--settings", "dense,vtc+lds")
    second = run("--settings", "dense,vtc+lds")
    for a, b in zip(first["results"], second["results"], strict=True):
        assert a["losses"] == b["losses"], a["setting"]
        assert a["accuracy"] == b["accuracy"], a["setting"]
    # interleaving: one timed step per setting and round, ratios from the same rounds
    dense, sts = first["results"]
    assert len(dense["step_times_ms"]) == len(sts["step_times_ms"]) == 3
    low, high = sts["ratio_iqr"]
    assert low <= sts["measured_ratio"] <= high
    assert "2 timed rounds, settings interleaved" in first["title"]


def test_qwen2_5_vl_variant_compresses_and_skips():
    record = run("--model", "qwen2_5_vl", "--settings", "dense,vtc+lds")
    dense, sts = record["results"]
    assert dense["visual_tokens_per_image"] == 16  # (16 px / 2 px patches / 2x2 merge)^2
    assert sts["visual_tokens_per_image"] == 4  # 2x2 pooling
    assert sts["layer_fraction"] < 1.0
    assert all(map(torch.isfinite, torch.tensor(dense["losses"] + sts["losses"])))
    assert "Qwen2.5-VL" in record["title"]


def test_model_inputs_match_the_qwen_processor_layout():
    """The flat patches are the processor's: patch k of the [t, h, w] grid, merged 2x2 blocks
    row-major, channels-first then the 2 temporal copies, then the p x p pixels."""
    task = demo.TaskConfig(image_size=8)
    batch = demo.make_batch(task, seed=0, indices=[0])
    inputs = demo.model_inputs("qwen2_5_vl", batch, task)
    p = task.patch_size // 2
    patches = inputs["pixel_values"].view(
        1, 2, 2, 2, 2, 3, 2, p, p
    )  # [t, bh, bw, mh, mw, C, tp, p, p]
    img = batch.pixel_values[0]
    for bh, bw, mh, mw in [(0, 0, 0, 0), (1, 0, 1, 1), (0, 1, 1, 0)]:
        y, x = (2 * bh + mh) * p, (2 * bw + mw) * p
        for tp in range(2):
            assert torch.equal(patches[0, bh, bw, mh, mw, :, tp], img[:, y : y + p, x : x + p])
    ids = inputs["input_ids"][0]
    assert ids[1] == demo.QWEN_START and ids[2 + task.image_tokens] == demo.QWEN_END
    assert int((ids == demo.QWEN_IMAGE).sum()) == task.image_tokens
    assert inputs["labels"].shape == ids[None].shape
    assert os.environ.get("LOCAL_RANK") is None  # main() ran single-process


@pytest.mark.parametrize("model", ["llava", "qwen2_5_vl"])
def test_packed_rows_give_the_unpacked_loss_and_train(model):
    """--packed: the batch as one row (DataCollatorWithFlattening layout, bench/packing.py);
    the dense model's loss on it is the loss of the rows unpacked (every sample has the same
    number of answers), and a short packed demo trains under VTC + LDS."""
    task = demo.TaskConfig(image_size=16)
    net = demo.build_model(model, demo.MODEL_SIZES["tiny"], task, 0).eval()
    inputs = demo.model_inputs(model, demo.make_batch(task, 0, [0, 1, 2]), task)
    packed = demo.pack_rows(inputs, net)
    assert packed["input_ids"].shape == (1, 3 * inputs["input_ids"].shape[1])
    assert packed["cu_seq_lens_q"].tolist() == [
        0,
        *(inputs["input_ids"].shape[1] * k for k in (1, 2, 3)),
    ]
    assert "attention_mask" not in packed and packed["use_cache"] is False
    with torch.no_grad():
        torch.testing.assert_close(net(**packed).loss, net(**inputs).loss, rtol=1e-5, atol=1e-5)
    record = run("--model", model, "--packed", "--settings", "dense,vtc+lds")
    assert record["title"].endswith("packed rows")
    sts = record["results"][1]
    assert sts["visual_tokens_per_image"] == 4 and sts["layer_fraction"] <= 1.0
    assert all(map(torch.isfinite, torch.tensor(sts["losses"])))


def test_detail_task_and_served_accuracy():
    """--task detail trains; accuracy is the model served unpatched, the VTC-on one apart."""
    record = run("--task", "detail", "--image-size", "32", "--settings", "dense,vtc")
    dense, vtc = record["results"]
    assert set(dense["accuracy_by_question"]) <= {"digits", "count", "cell", "pair"}
    assert dense["accuracy_compressed_eval"] is None
    assert vtc["accuracy_compressed_eval"] is not None
    assert "task detail" in record["title"]


NEW_FAMILIES = sorted(set(demo.MODELS) - {"llava", "qwen2_5_vl"})


@pytest.mark.parametrize("model", NEW_FAMILIES)
def test_every_family_trains_under_every_setting(model):
    """Each registry family (bench/demo_models.py) trains 2 steps under dense / VTC / LDS /
    VTC+LDS with finite losses; the VTC's 2x2 pool leaves a quarter of the 16 visual tokens an
    image, the LDS runs fewer LM layers, and dense sees the task's own 16 tokens."""
    record = run("--model", model, "--steps", "2", "--eval-samples", "2")
    results = {r["setting"]: r for r in record["results"]}
    assert list(results) == list(demo.SETTINGS)
    for r in results.values():
        assert len(r["losses"]) == 2 and all(map(math.isfinite, r["losses"])), r["setting"]
    assert results["dense"]["visual_tokens_per_image"] == 16  # (16 px / 4 px patches)^2
    for setting in ("vtc", "vtc+lds"):
        assert results[setting]["visual_tokens_per_image"] == 4, setting
    for setting in ("lds", "vtc+lds"):
        assert results[setting]["layer_fraction"] < 1.0, setting
    assert results["vtc"]["layer_fraction"] == 1.0
    assert demo.FAMILIES[model].title in record["title"]


@pytest.mark.parametrize("model", NEW_FAMILIES)
def test_family_layout_keeps_the_answers(model):
    """The family's layout moves the answers, never relabels them: the same answer tokens in
    the same order, labels only on them, every marker and placeholder -100."""
    task = demo.TaskConfig(image_size=16)
    batch = demo.make_batch(task, seed=0, indices=[0, 1])
    inputs = demo.model_inputs(model, batch, task)
    ids, labels = inputs["input_ids"], inputs["labels"]
    answers = batch.labels[batch.labels != -100].view(2, -1)
    assert torch.equal(labels[labels != -100].view(2, -1), answers)
    assert torch.equal(ids[labels != -100].view(2, -1), answers)
    assert torch.equal(ids[:, -4 * task.questions_per_image :], batch.input_ids[:, 1 + 16 :])
    assert inputs["attention_mask"].shape == ids.shape
