"""apply_sts on tiny random LLaVA and Qwen2-VL models (transformers 5.x, offline)."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    IMG,
    V_END,
    V_START,
    build_ids,
    llava_batch,
    make_llava,
    make_qwen3_vl,
    needs_encoder_outputs,
    pooled,
    qwen_batch,
)
from hf_models import make_qwen2_vl as make_qwen  # noqa: E402

from sts_kernels import token_pool  # noqa: E402
from sts_kernels.integrations.hf import apply_sts, shrink_placeholders  # noqa: E402
from sts_kernels.nn import LayerDynamicSkipper, VisualTokenCompressor  # noqa: E402

QWEN_GRIDS = [(1, 8, 8), (1, 4, 6), (1, 6, 4)]  # raw patches; merged grids 4x4, 2x3, 3x2
QWEN_ROWS = [
    [[5], [V_START], "image", [V_END], [20, 21]],
    [[6, 7], [V_START], "image", [V_END], [V_START], "image", [V_END], [22]],
]


def qwen_images(pad_left: bool, grids=QWEN_GRIDS) -> dict:
    """2 rows: one image, two images (QWEN_GRIDS), no video."""
    return qwen_batch(pad_left, images=grids, videos=[], rows=QWEN_ROWS)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llava", "qwen"])
def test_remove_restores_the_model_exactly(kind):
    model = make_llava() if kind == "llava" else make_qwen()
    batch = llava_batch(False) if kind == "llava" else qwen_images(False)
    layers = list(model.model.language_model.layers)
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        dense = model(**batch).logits
    handle = apply_sts(model, skip={"policy": "schedule", "p_max": 0.5})
    assert list(model.state_dict()) == list(state)  # no keys added while patched
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, dense)  # eval: exactly the unpatched model
    model.train()
    model(**batch).loss.backward()
    handle.remove()
    assert list(model.model.language_model.layers) == layers
    assert dict(model.named_modules()) == modules
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, dense)
    apply_sts(model).remove()  # patch again after remove


def test_disabled_handle_and_double_patch():
    model = make_llava()
    batch = llava_batch(True)
    dense = model(**batch).logits
    handle = apply_sts(model)
    with pytest.raises(RuntimeError, match="already patched"):
        apply_sts(model)
    handle.enabled = False
    assert torch.equal(model(**batch).logits, dense)  # train mode, STS off
    handle.enabled = True
    assert model(**batch).logits.shape[1] < dense.shape[1]
    handle.remove()


def test_unsupported_model_and_bad_arguments():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration.*Qwen2VLForConditional"):
        apply_sts(lm)
    with pytest.raises(ValueError, match="stage"):
        apply_sts(make_llava(), stage="pretrain")
    with pytest.raises(ValueError, match="mode='pool'"):  # frame windows: pool only
        apply_sts(make_qwen3_vl(), compress={"mode": "merge", "time_window": 2})
    with pytest.raises(TypeError, match="compress"):
        apply_sts(make_llava(), compress=3)


def test_stage_presets_and_instances():
    model = make_llava()
    h = apply_sts(model, stage="align")
    assert h.compressor is not None and h.skipper is None
    h.remove()
    h = apply_sts(model, stage="instruct")
    assert h.compressor is None and h.skipper is not None
    h.remove()
    compressor = VisualTokenCompressor(window=(4, 4))
    h = apply_sts(model, compress=compressor, skip=False, stage="instruct")
    assert h.compressor is compressor and h.skipper is None
    model(**llava_batch(False))
    assert h.report.visual_tokens_kept == 3 and h.report.visual_tokens_in == 48
    h.remove()
    skipper = LayerDynamicSkipper(model.model.language_model.layers, 128, seed=0)
    h = apply_sts(model, skip=skipper, stage="instruct")
    model(**llava_batch(False)).loss.backward()
    assert h.skipper is skipper and sum(h.report.rows_total) == 4 * 3
    h.remove()


# ---- VTC: the shrunk batch ------------------------------------------------------------------


@pytest.mark.parametrize("pad_left", [False, True])
def test_shrink_placeholders_keeps_text_labels_and_masks_aligned(pad_left):
    batch = qwen_images(pad_left)
    n_in = [16, 6, 6]
    n_out = [4, 2, 2]
    out = shrink_placeholders(
        batch["input_ids"],
        IMG,
        n_in,
        n_out,
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        position_ids=torch.arange(batch["input_ids"].shape[1]).expand(2, -1),
    )
    expected = build_ids(QWEN_ROWS, {"image": n_out}, pad_left)
    for name in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(out[name], expected[name]), name
    assert torch.equal(out["mm_token_type_ids"], (expected["input_ids"] == IMG).long())
    # text tokens keep their order in every row
    for row in range(2):
        text = (batch["input_ids"][row] != IMG) & batch["attention_mask"][row].bool()
        kept = out["attention_mask"][row].bool() & (out["input_ids"][row] != IMG)
        assert torch.equal(out["input_ids"][row][kept], batch["input_ids"][row][text])
    with pytest.raises(ValueError, match="placeholders"):
        shrink_placeholders(batch["input_ids"], IMG, [16, 6], [4, 2])


def test_shrink_position_ids_are_renumbered():
    ids = torch.tensor([[1, IMG, IMG, IMG, IMG, 2, 3]])
    out = shrink_placeholders(ids, IMG, [4], [1], position_ids=torch.arange(7)[None] + 10)
    assert out["input_ids"].tolist() == [[1, IMG, 2, 3]]
    assert out["position_ids"].tolist() == [[10, 11, 12, 13]]
    assert out["attention_mask"] is None


# ---- VTC: logits equal the unpatched model fed the shrunk batch -----------------------------


@needs_encoder_outputs
@pytest.mark.parametrize("pad_left", [False, True])
def test_llava_vtc_equals_unpatched_on_shrunk_batch(pad_left):
    model = make_llava("eager")
    ref = copy.deepcopy(model)
    batch = llava_batch(pad_left)
    handle = apply_sts(model, stage="align")
    out = model(**batch)
    assert handle.report.visual_tokens_in == 48 and handle.report.visual_tokens_kept == 12
    assert handle.report.lm_tokens < handle.report.lm_tokens_in

    shrunk = llava_batch(pad_left, tokens=4)
    del shrunk["pixel_values"]
    with torch.no_grad():
        feats = ref.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
        images = torch.stack(list(feats.pooler_output))  # [3, 16, D]
        feats.pooler_output = list(token_pool(images, (4, 4), (2, 2)))
    expected = ref(**shrunk, mm_encoder_outputs={"image": feats})
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    for name in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(handle.last_inputs[name], shrunk[name])


@needs_encoder_outputs
@pytest.mark.parametrize("pad_left", [False, True])
def test_qwen2vl_vtc_equals_unpatched_on_shrunk_batch(pad_left):
    model = make_qwen("eager")
    ref = copy.deepcopy(model)
    batch = qwen_images(pad_left)
    handle = apply_sts(model, stage="align")
    out = model(**batch)
    pooled_grids = [(pooled(h // 2), pooled(w // 2)) for _, h, w in QWEN_GRIDS]  # merged, then 2x2
    rope_grids = [(1, 2 * gh, 2 * gw) for gh, gw in pooled_grids]
    assert handle.report.visual_tokens_kept == sum(gh * gw for gh, gw in pooled_grids) == 8

    shrunk = qwen_images(pad_left, grids=rope_grids)
    with torch.no_grad():
        feats = ref.model.get_image_features(
            batch["pixel_values"], batch["image_grid_thw"], return_dict=True
        )
        feats.pooler_output = [
            token_pool(f[None], (h // 2, w // 2), (2, 2))[0]
            for f, (_, h, w) in zip(feats.pooler_output, QWEN_GRIDS)
        ]
    del shrunk["pixel_values"]
    expected = ref(**shrunk, mm_encoder_outputs={"image": feats})
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    # M-RoPE positions of the pooled grid: rebuilt by the model from the shrunk ids
    pos, _ = ref.model.get_rope_index(
        shrunk["input_ids"],
        shrunk["mm_token_type_ids"],
        torch.tensor(rope_grids),
        None,
        shrunk["attention_mask"],
    )
    assert pos.shape[-1] == out.logits.shape[1]


def test_vtc_in_eval_only_when_enabled():
    model = make_llava().eval()
    batch = llava_batch(False)
    with torch.no_grad():
        dense = model(**batch).logits
    handle = apply_sts(model, compress={"enabled_in_eval": True}, skip=False)
    with torch.no_grad():
        assert model(**batch).logits.shape[1] == dense.shape[1] - 2 * 12  # row 0: two images
    handle.remove()


# ---- LDS ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llava", "qwen"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_token_mode_without_skipping_equals_dense(kind, attn):
    model = make_llava(attn) if kind == "llava" else make_qwen(attn)
    batch = llava_batch(True) if kind == "llava" else qwen_images(True)
    dense = model(**batch).logits
    handle = apply_sts(model, compress=False, skip={"mode": "token", "p_max": 0.0})
    out = model(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real], dense[real], rtol=1e-5, atol=1e-5)
    handle.remove()


@pytest.mark.parametrize("mode", ["sample", "token"])
def test_skip_modes_report_and_backward(mode):
    model = make_llava("eager")
    batch = llava_batch(False)
    handle = apply_sts(model, compress=False, skip={"mode": mode, "p_max": 0.5, "seed": 0})
    out = model(**batch)
    assert 0 < handle.report.layer_fraction < 1
    assert handle.report.rows_run[0] == handle.report.rows_total[0]  # keep_first_last
    out.loss.backward()
    handle.remove()


# ---- training ------------------------------------------------------------------------------


def _dense_grad_names(model, batch) -> set[str]:
    model.zero_grad()
    model(**batch).loss.backward()
    names = {
        n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    model.zero_grad()
    return names


@pytest.mark.parametrize("kind", ["llava", "qwen"])
@pytest.mark.parametrize("stage", ["align", "instruct", None])
def test_training_steps_reduce_loss_and_reach_every_parameter(kind, stage):
    model = make_llava() if kind == "llava" else make_qwen()
    batch = llava_batch(False) if kind == "llava" else qwen_images(True)
    expected = _dense_grad_names(model, batch)
    handle = apply_sts(model, stage=stage, skip=None if stage == "align" else {"seed": 0})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, reached = [], set()
    for _ in range(6):
        loss = model(**batch).loss
        loss.backward()
        reached |= {
            n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
        }
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert reached == expected
    if stage != "align":
        assert handle.report.layer_fraction < 1.0
    if stage != "instruct":
        assert handle.report.visual_tokens_kept < handle.report.visual_tokens_in
    assert 0 < handle.report.executed_fraction < 1
    handle.remove()


def test_router_policy_parameters_are_trained_and_removed():
    model = make_llava()
    n_params = len(list(model.parameters()))
    handle = apply_sts(model, stage="instruct", skip={"policy": "router", "capacity": 0.5})
    routers = [p for n, p in model.named_parameters() if n.startswith("sts_skipper.")]
    assert routers and len(list(model.parameters())) == n_params + len(routers)
    model(**llava_batch(False)).loss.backward()
    assert all(p.grad is not None for p in routers)
    handle.remove()
    assert len(list(model.parameters())) == n_params and not hasattr(model, "sts_skipper")


def test_activation_checkpointing_with_lds():
    model = make_qwen()
    # older transformers (e.g. 5.17) call it gradient_checkpointing_enable
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
    batch = qwen_images(False)
    handle = apply_sts(model, skip={"seed": 0})
    model(**batch).loss.backward()
    assert model.model.language_model.layers[1].mlp.up_proj.weight.grad is not None
    handle.remove()


@pytest.mark.parametrize("skip", [{"policy": "router"}, {"mode": "token"}])
def test_bf16_model(skip):
    model = make_llava().to(torch.bfloat16)
    batch = llava_batch(True)
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    handle = apply_sts(model, skip=skip)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and 0 < handle.report.executed_fraction < 1
    handle.remove()
