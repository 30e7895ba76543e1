"""apply_sts on tiny random LLaVA and Qwen2-VL models (transformers 5.x, offline)."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from sts_kernels import token_pool  # noqa: E402
from sts_kernels.integrations.hf import apply_sts, shrink_placeholders  # noqa: E402
from sts_kernels.nn import LayerDynamicSkipper, VisualTokenCompressor  # noqa: E402

IMG, PAD = 999, 0
V_START, V_END = 997, 996  # Qwen2-VL vision start / end tokens


def make_llava(attn: str = "sdpa"):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=1000,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=PAD,
        ),
        image_token_index=IMG,
        vision_feature_layer=-1,  # every vision layer gets a gradient
    )
    config._attn_implementation = attn
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config)


def make_qwen(attn: str = "sdpa"):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        vision_config=dict(
            depth=2,
            embed_dim=64,
            hidden_size=128,
            num_heads=4,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
        text_config=dict(
            vocab_size=1000,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=PAD,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]},
        ),
        image_token_id=IMG,
        video_token_id=998,
        vision_start_token_id=V_START,
        vision_end_token_id=V_END,
    )
    config._attn_implementation = attn
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config)


def build_ids(samples: list[list], placeholders: list[int], pad_left: bool) -> dict:
    """samples: per row a list of text token lists and image markers (None); the k-th image
    (row-major) gets `placeholders[k]` tokens. Returns input_ids, attention_mask, labels."""
    seqs, k = [], 0
    for parts in samples:
        seq = []
        for part in parts:
            if part is None:
                seq += [IMG] * placeholders[k]
                k += 1
            else:
                seq += part
        seqs.append(seq)
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), PAD)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(seqs):
        cols = slice(length - len(seq), length) if pad_left else slice(0, len(seq))
        ids[i, cols], mask[i, cols] = torch.tensor(seq), 1
    labels = torch.where((ids == IMG) | (mask == 0), -100, ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


LLAVA_ROWS = [[[5, 6], None, [7, 8, 9]], [[10], None, [11], None, [12, 13]], [[14, 15, 16]]]


def llava_batch(pad_left: bool, placeholders: int = 16):
    """3 rows: one image, two images, none; 3 images of 4x4 patches."""
    batch = build_ids(LLAVA_ROWS, [placeholders] * 3, pad_left)
    batch["pixel_values"] = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return batch


QWEN_GRIDS = [(1, 8, 8), (1, 4, 6), (1, 6, 4)]  # raw patches; merged grids 4x4, 2x3, 3x2
QWEN_ROWS = [
    [[5], [V_START], None, [V_END], [20, 21]],
    [[6, 7], [V_START], None, [V_END], [V_START], None, [V_END], [22]],
]


def qwen_batch(pad_left: bool, grids=QWEN_GRIDS, rope_grids=None):
    rope_grids = rope_grids or grids
    batch = build_ids(QWEN_ROWS, [t * h * w // 4 for t, h, w in rope_grids], pad_left)
    batch["mm_token_type_ids"] = (batch["input_ids"] == IMG).long()
    batch["image_grid_thw"] = torch.tensor(grids)
    n = sum(t * h * w for t, h, w in grids)
    batch["pixel_values"] = torch.randn(
        n, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(1)
    )
    return batch


def pooled_grid(h: int, w: int) -> tuple[int, int]:
    return math.ceil(h / 2), math.ceil(w / 2)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llava", "qwen"])
def test_remove_restores_the_model_exactly(kind):
    model = make_llava() if kind == "llava" else make_qwen()
    batch = llava_batch(False) if kind == "llava" else qwen_batch(False)
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
    with pytest.raises(ValueError, match="mode='pool'"):
        apply_sts(make_qwen(), compress={"mode": "merge", "ratio": 0.5})
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
    batch = qwen_batch(pad_left)
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
    expected = build_ids(QWEN_ROWS, n_out, pad_left)
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


@pytest.mark.parametrize("pad_left", [False, True])
def test_llava_vtc_equals_unpatched_on_shrunk_batch(pad_left):
    model = make_llava("eager")
    ref = copy.deepcopy(model)
    batch = llava_batch(pad_left)
    handle = apply_sts(model, stage="align")
    out = model(**batch)
    assert handle.report.visual_tokens_in == 48 and handle.report.visual_tokens_kept == 12
    assert handle.report.lm_tokens < handle.report.lm_tokens_in

    shrunk = build_ids(LLAVA_ROWS, [4] * 3, pad_left)
    with torch.no_grad():
        feats = ref.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
        pooled = torch.stack(list(feats.pooler_output))  # [3, 16, D]
        feats.pooler_output = list(token_pool(pooled, (4, 4), (2, 2)))
    expected = ref(**shrunk, mm_encoder_outputs={"image": feats})
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    for name in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(handle.last_inputs[name], shrunk[name])


@pytest.mark.parametrize("pad_left", [False, True])
def test_qwen2vl_vtc_equals_unpatched_on_shrunk_batch(pad_left):
    model = make_qwen("eager")
    ref = copy.deepcopy(model)
    batch = qwen_batch(pad_left)
    handle = apply_sts(model, stage="align")
    out = model(**batch)
    pooled_grids = [pooled_grid(h // 2, w // 2) for _, h, w in QWEN_GRIDS]  # merged, then 2x2
    rope_grids = [(1, 2 * gh, 2 * gw) for gh, gw in pooled_grids]
    assert handle.report.visual_tokens_kept == sum(gh * gw for gh, gw in pooled_grids) == 8

    shrunk = qwen_batch(pad_left, rope_grids=rope_grids)
    with torch.no_grad():
        feats = ref.model.get_image_features(
            batch["pixel_values"], batch["image_grid_thw"], return_dict=True
        )
        feats.pooler_output = [
            token_pool(f[None], (h // 2, w // 2), (2, 2))[0]
            for f, (_, h, w) in zip(feats.pooler_output, QWEN_GRIDS)
        ]
    del shrunk["pixel_values"]
    shrunk["image_grid_thw"] = torch.tensor(rope_grids)
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
        assert model(**batch).logits.shape[1] == dense.shape[1] - 2 * 12  # row 1: two images
    handle.remove()


# ---- LDS ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llava", "qwen"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_token_mode_without_skipping_equals_dense(kind, attn):
    model = make_llava(attn) if kind == "llava" else make_qwen(attn)
    batch = llava_batch(True) if kind == "llava" else qwen_batch(True)
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
    batch = llava_batch(False) if kind == "llava" else qwen_batch(True)
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
    model.activation_checkpointing_enable({"use_reentrant": False})
    batch = qwen_batch(False)
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
