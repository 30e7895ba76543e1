"""Oracle checks of issue 18's group B families (the shared checks run in test_hf_families.py):
the compressed tokens the LM receives are the 2x2 average of the unpatched model's own
projected features, in order (pooled by hand here), and for 3-D position families the
positions the LM gets are what the model's own get_rope_index gives for the pooled grids."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    IMG,
    LFM2_SHAPES,
    VID,
    generic_batch,
    glm4v_batch,
    lfm2_vl_batch,
    llama_config,
    llava_onevision1_5_batch,
    make_deepseek_vl,
    make_glm4v,
    make_lfm2_vl,
    make_llava_onevision1_5,
    make_ovis2,
    ovis2_batch,
)

from bench.models import OVIS_INDICATORS  # noqa: E402
from sts_kernels.integrations.hf import apply_sts  # noqa: E402


def hand_pool(f: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[h*w, D] row-major -> [ceil(h/2) * ceil(w/2), D]: each 2x2 window's mean (edge windows
    over the tokens they hold)."""
    grid = f.view(h, w, -1)
    rows = [
        grid[i : i + 2, j : j + 2].reshape(-1, f.shape[-1]).mean(0)
        for i in range(0, h, 2)
        for j in range(0, w, 2)
    ]
    return torch.stack(rows)


@contextlib.contextmanager
def lm_inputs(lm: torch.nn.Module):
    """The keyword arguments of the next calls of the language model `lm`."""
    seen: list[dict] = []
    hook = lm.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)
    try:
        yield seen
    finally:
        hook.remove()


def run_patched(model, lm_of, batch, **compress):
    """Train-mode forward of `model` under VTC only: (the LM's keyword arguments, the handle's
    last inputs, its report)."""
    handle = apply_sts(model, compress={"mode": "pool", **compress}, skip=False)
    model.train()
    try:
        with lm_inputs(lm_of(model)) as seen:
            loss = model(**batch).loss
        assert torch.isfinite(loss)
        return seen[0], handle.last_inputs, copy.copy(handle.report)
    finally:
        handle.remove()


def assert_tokens(lm_kw, ids, token_id, expected):
    """The LM's input embeddings at the shrunk sequence's placeholders are `expected`, in order."""
    embeds = lm_kw["inputs_embeds"]
    got = embeds[ids == token_id]
    assert got.shape == expected.shape, (got.shape, expected.shape)
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-5, atol=1e-5)


# ---- GLM-4V / GLM-4V-MoE: 3-D positions from the pooled grids --------------------------------


def _glm_lm(model):
    return model.model.language_model


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_glm4v_images_oracle(moe):
    model = make_glm4v(moe=moe)
    ref = copy.deepcopy(model).eval()
    batch = glm4v_batch(pad_left=True)
    lm_kw, last, report = run_patched(model, _glm_lm, batch)
    grids = batch["image_grid_thw"].tolist()  # raw patches; merged 2x2 by the tower
    with torch.no_grad():
        feats = ref.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        pooled = [hand_pool(f, h // 2, w // 2) for f, (_, h, w) in zip(feats.pooler_output, grids)]
        assert_tokens(lm_kw, last["input_ids"], IMG, torch.cat(pooled))
        # pooled merged grid, times the merge size (get_rope_index divides by it)
        rope = [[1, 2 * math.ceil(h / 4), 2 * math.ceil(w / 4)] for _, h, w in grids]
        assert rope == [[1, 4, 4], [1, 2, 4]]
        expected, _ = ref.model.get_rope_index(
            last["input_ids"],
            last["mm_token_type_ids"],
            image_grid_thw=torch.tensor(rope),
            attention_mask=last["attention_mask"],
        )
    assert torch.equal(lm_kw["position_ids"], expected)
    assert (report.image_tokens_in, report.image_tokens_kept) == (16 + 6, 4 + 2)


def test_glm4v_video_oracle():
    """Video frames (image tokens typed 2): every frame pooled on its own grid, the image id
    given back, positions from get_rope_index with the pooled video grid."""
    model = make_glm4v()
    ref = copy.deepcopy(model).eval()
    batch = glm4v_batch(pad_left=False, videos=[(2, 4, 4)])  # 2 frames of 2x2 merged tokens
    lm_kw, last, report = run_patched(model, _glm_lm, batch)
    with torch.no_grad():
        feats = ref.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"])
        frames = feats.pooler_output[0].view(2, 4, -1)
        assert_tokens(
            lm_kw, last["input_ids"], IMG, torch.cat([hand_pool(f, 2, 2) for f in frames])
        )
        expected, _ = ref.model.get_rope_index(
            last["input_ids"],
            last["mm_token_type_ids"],
            video_grid_thw=torch.tensor([[2, 2, 2]]),
            attention_mask=last["attention_mask"],
        )
    assert torch.equal(lm_kw["position_ids"], expected)
    assert int((last["mm_token_type_ids"] == 2).sum()) == 2
    assert (report.video_tokens_in, report.video_tokens_kept) == (8, 2)


def test_glm4v_refusals():
    model = make_glm4v(moe=True)
    with pytest.raises(ValueError, match="time_window=1"):
        apply_sts(model, compress={"time_window": 2})
    model.config.text_config.output_router_logits = True
    handle = apply_sts(model, compress=False, skip=True)
    model.train()
    with pytest.raises(ValueError, match="router logits"):
        model(**glm4v_batch(pad_left=False))
    handle.remove()


# ---- LLaVA-OneVision-1.5: Qwen grids, 1-D positions ------------------------------------------


def test_llava_onevision1_5_oracle():
    """Images and a video (4 frames of 2x2 merged tokens): every image and frame pooled on its
    own merged grid, in order; positions stay the model's own 1-D numbering."""
    model = make_llava_onevision1_5()
    ref = copy.deepcopy(model).eval()
    batch = llava_onevision1_5_batch(pad_left=True)
    lm_kw, last, report = run_patched(model, _glm_lm, batch)
    with torch.no_grad():
        image = ref.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        video = ref.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"])
    images = [
        hand_pool(f, h // 2, w // 2)
        for f, (_, h, w) in zip(image.pooler_output, batch["image_grid_thw"].tolist())
    ]
    frames = [hand_pool(f, 2, 2) for f in video.pooler_output[0].view(4, 4, -1)]
    assert_tokens(lm_kw, last["input_ids"], IMG, torch.cat(images))
    assert_tokens(lm_kw, last["input_ids"], VID, torch.cat(frames))
    length = last["input_ids"].shape[1]
    assert torch.equal(lm_kw["position_ids"], torch.arange(length)[None])
    assert (report.image_tokens_kept, report.video_tokens_kept) == (6, 4)


# ---- LFM2-VL: NaFlex entries of any shape -----------------------------------------------------


def test_lfm2_vl_oracle_and_token_mode_refused():
    """Tiles, a thumbnail and a single image: each entry pooled on its own (h/2, w/2) grid, in
    order, the markers between them kept; token-mode LDS refused (short convolutions)."""
    model = make_lfm2_vl()
    ref = copy.deepcopy(model).eval()
    batch = lfm2_vl_batch(pad_left=True)
    lm_kw, last, report = run_patched(model, _glm_lm, batch)
    with torch.no_grad():
        feats = ref.model.get_image_features(
            batch["pixel_values"], batch["spatial_shapes"], batch["pixel_attention_mask"]
        )
    pooled = [hand_pool(f, h // 2, w // 2) for f, (h, w) in zip(feats.pooler_output, LFM2_SHAPES)]
    assert_tokens(lm_kw, last["input_ids"], IMG, torch.cat(pooled))
    assert (report.image_tokens_in, report.image_tokens_kept) == (50, 4 + 4 + 2 + 4)
    for marker in (990, 989, 988, 987, 986):
        assert int((last["input_ids"] == marker).sum()) == int((batch["input_ids"] == marker).sum())
    with pytest.raises(ValueError, match="short-convolution"):
        apply_sts(model, skip={"mode": "token"})


# ---- Ovis2: tiles of visual-vocabulary embeddings, indicator tokens from the same table -------


def test_ovis2_oracle():
    model = make_ovis2()
    ref = copy.deepcopy(model).eval()
    batch = ovis2_batch(pad_left=False)
    lm_kw, last, report = run_patched(model, _glm_lm, batch)
    with torch.no_grad():
        feats = ref.model.get_image_features(batch["pixel_values"])
    pooled = [hand_pool(f, 4, 4) for f in feats.pooler_output]  # global view, tiles, in order
    assert_tokens(lm_kw, last["input_ids"], IMG, torch.cat(pooled))
    for i, marker in enumerate(OVIS_INDICATORS):  # embedded from the visual table, kept
        at = last["input_ids"] == marker
        expected = feats.visual_indicator_features[i].expand(int(at.sum()), -1)
        assert_tokens(lm_kw, last["input_ids"], marker, expected)
    assert (report.image_tokens_in, report.image_tokens_kept) == (64, 16)


# ---- the convention fallback (adapters/generic.py) ---------------------------------------------


def test_convention_fallback_oracle_warning_and_refusal():
    """DeepSeek-VL has no adapter file: served by the convention with one warning naming the
    class, its images pooled 2x2 on their 4x4 grids; a class without the convention's shape
    still gets the TypeError."""
    from sts_kernels.integrations.hf.adapters import adapter_for, generic

    model = make_deepseek_vl()
    ref = copy.deepcopy(model).eval()
    generic._WARNED.discard(type(model).__name__)
    with pytest.warns(UserWarning, match="DeepseekVLForConditionalGeneration has no adapter"):
        assert adapter_for(model) is generic.ADAPTER
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per class
        adapter_for(model)
    batch = generic_batch(pad_left=True)
    lm_kw, last, report = run_patched(model, _glm_lm, batch)
    with torch.no_grad():
        feats = ref.model.get_image_features(batch["pixel_values"])
    assert_tokens(
        lm_kw, last["input_ids"], IMG, torch.cat([hand_pool(f, 4, 4) for f in feats.pooler_output])
    )
    assert (report.image_tokens_in, report.image_tokens_kept) == (48, 12)

    from transformers import LlamaForCausalLM

    with pytest.raises(TypeError, match="got LlamaForCausalLM"):
        apply_sts(LlamaForCausalLM(llama_config()))
