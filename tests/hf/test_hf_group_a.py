"""Issue 18, group A (one grid of visual tokens per image or tile, 1-D positions): Mistral 3 and
LLaVA with a Pixtral tower (row-break / end markers), VipLlava, Aya Vision, Cohere2-Vision,
FastVLM, PerceptionLM, PaliGemma. Oracle: what the patched model's LM receives at the image
placeholders is the 2x2 average (torch's avg_pool2d on each grid) of the unpatched model's own
projected features, in order, and the shrunk text is the processor's layout for the pooled
grids. The checks every family passes: tests/hf/test_hf_families.py (CASES)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    AYA_ROWS,
    COHERE2_ROWS,
    IMG,
    LLAVA_ROWS,
    PIXTRAL_SIZES,
    PLM_FRAMES,
    VID,
    build_ids,
    check_eval_equals_unpatched,
    check_remove_restores,
    check_train_step_is_sparser,
    llava_batch,
    make_aya_vision,
    make_cohere2_vision,
    make_fast_vlm,
    make_llava_pixtral,
    make_mistral3,
    make_paligemma,
    make_perception_lm,
    make_vipllava,
    marked_batch,
    needs_encoder_outputs,
    paligemma_batch,
    perception_lm_batch,
    perception_lm_video_batch,
    pixtral_batch,
)

from sts_kernels import bipartite_merge  # noqa: E402
from sts_kernels.integrations.hf import apply_sts  # noqa: E402


def avg_pool_grid(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[h*w, D] row-major on `grid` -> [ceil(h/2)*ceil(w/2), D]: 2x2 means, edge windows over
    the tokens they cover."""
    h, w = grid
    x = features.T.reshape(1, -1, h, w)
    return F.avg_pool2d(x, 2, ceil_mode=True).flatten(2)[0].T


def lm_visual_inputs(model, batch: dict, token_id: int = IMG, **apply_kwargs):
    """One patched training forward (VTC only): the embeddings the language model received at
    the image placeholders (in order) and the inputs the patched model ran on."""
    seen = {}
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    handle = apply_sts(model, skip=False, **apply_kwargs)
    model.train()
    try:
        loss = model(**batch).loss
    finally:
        hook.remove()
        inputs, report = handle.last_inputs, handle.report
        handle.remove()
    assert torch.isfinite(loss)
    return seen["inputs_embeds"][inputs["input_ids"] == token_id], inputs, report


def check_layout(inputs: dict, expected: dict, names=("input_ids", "attention_mask", "labels")):
    for name in names:
        assert torch.equal(inputs[name], expected[name]), name


# ---- Pixtral layout: Mistral 3, LLaVA with a Pixtral tower --------------------------------

PIXTRAL = {"mistral3": make_mistral3, "llava_pixtral": make_llava_pixtral}
PIXTRAL_GRIDS = [(h // 8, w // 8) for h, w in PIXTRAL_SIZES]


@needs_encoder_outputs
@pytest.mark.parametrize("pad_left", [True, False])
@pytest.mark.parametrize("family", PIXTRAL)
def test_pixtral_rows_pooled_with_a_break_after_every_pooled_row(family, pad_left):
    model = PIXTRAL[family]()
    batch = pixtral_batch(pad_left)
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"], return_dict=True
        )
        oracle = [avg_pool_grid(f, g) for f, g in zip(feats.pooler_output, PIXTRAL_GRIDS)]
    fed, inputs, report = lm_visual_inputs(model, batch, compress={"mode": "pool"})
    torch.testing.assert_close(fed, torch.cat(oracle), rtol=1e-5, atol=1e-6)
    pooled = [(-(-h // 2), -(-w // 2)) for h, w in PIXTRAL_GRIDS]
    check_layout(inputs, pixtral_batch(pad_left, grids=pooled))
    assert (report.image_tokens_in, report.image_tokens_kept) == (30 + 16 + 18, 9 + 4 + 6)


@needs_encoder_outputs
@pytest.mark.parametrize("pad_left", [True, False])
@pytest.mark.parametrize("family", PIXTRAL)
def test_pixtral_rows_merged_one_by_one_with_their_markers(family, pad_left):
    """Merge mode: every row of every image merged on its own (bipartite_merge run by hand on
    the unpatched features, row by row), the break after every row and the end kept: the
    processor's layout of an (h, w') grid, and the unpatched model on that layout with the
    hand-merged features gives the patched loss."""
    model = PIXTRAL[family]()
    batch = pixtral_batch(pad_left)
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"], return_dict=True
        )
    merged = [
        bipartite_merge(f.view(h, w, -1), round(w * 0.5)).x
        for f, (h, w) in zip(feats.pooler_output, PIXTRAL_GRIDS)
    ]  # [h, w', D] per image
    fed, inputs, report = lm_visual_inputs(model, batch, compress={"mode": "merge", "ratio": 0.5})
    oracle = torch.cat([m.reshape(-1, m.shape[-1]) for m in merged])
    torch.testing.assert_close(fed, oracle, rtol=1e-5, atol=1e-6)
    kept = [tuple(m.shape[:2]) for m in merged]
    assert kept == [(h, w - w // 2) for h, w in PIXTRAL_GRIDS]  # ratio 0.5 of every row
    shrunk = pixtral_batch(pad_left, grids=kept)
    check_layout(inputs, shrunk)
    assert (report.image_tokens_in, report.image_tokens_kept) == (64, oracle.shape[0])
    # the unpatched model on the hand-built layout with the hand-merged features
    handle = apply_sts(model, compress={"mode": "merge", "ratio": 0.5}, skip=False)
    model.train()
    loss = model(**batch).loss
    handle.remove()
    feats.pooler_output = [m.reshape(-1, m.shape[-1]) for m in merged]
    del shrunk["pixel_values"]
    expected = model(**shrunk, mm_encoder_outputs={"image": feats}).loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_pixtral_rows_without_markers_are_refused():
    """Placeholders as one plain run per image (LLaVA's layout) on a Pixtral model."""
    model = make_mistral3()
    plain = build_ids(LLAVA_ROWS, {"image": [h * w for h, w in PIXTRAL_GRIDS]}, True)
    batch = pixtral_batch(True) | {k: plain[k] for k in ("input_ids", "attention_mask")}
    del batch["labels"]
    apply_sts(model, skip=False)
    with pytest.raises(ValueError, match=r"followed by a marker"):
        model(**batch)


@needs_encoder_outputs
def test_llava_pixtral_passes_the_shared_checks():
    """LLaVA's class with a Pixtral tower (its CASES entry is the CLIP one): the checks of
    tests/hf/test_hf_families.py, pool mode, sample and token LDS."""
    model = make_llava_pixtral()
    batch = pixtral_batch(True)
    check_eval_equals_unpatched(model, batch)
    check_remove_restores(model, batch)
    for skip in ({"seed": 0, "p_max": 0.9}, {"mode": "token", "seed": 0}):
        report = check_train_step_is_sparser(model, pixtral_batch(False), skip=skip)
        assert (report.image_tokens_in, report.image_tokens_kept) == (64, 19)


# ---- one square grid per image or tile: VipLlava, Aya Vision, Cohere2-Vision, PaliGemma,
# FastVLM, PerceptionLM ------------------------------------------------------------------------


TILED = {
    # family: (maker, batch(pad_left, tokens), names of the shrunk inputs to compare)
    "vipllava": (make_vipllava, lambda p, tokens=16: llava_batch(p, tokens=tokens), ()),
    "aya_vision": (make_aya_vision, lambda p, tokens=16: marked_batch(AYA_ROWS, p, tokens), ()),
    "cohere2_vision": (
        make_cohere2_vision,
        lambda p, tokens=16: marked_batch(COHERE2_ROWS, p, tokens),
        (),
    ),
    "paligemma": (make_paligemma, paligemma_batch, ("token_type_ids",)),
    "fast_vlm": (make_fast_vlm, lambda p, tokens=16: llava_batch(p, tokens=tokens), ()),
    # 2 tiles an image, one placeholder run of 2 * 16 each (pooled: 2 * 4)
    "perception_lm": (
        make_perception_lm,
        lambda p, tokens=16: perception_lm_batch(p, tiles=2, tokens=tokens),
        (),
    ),
}


@needs_encoder_outputs
@pytest.mark.parametrize(
    ("family", "pad_left"), [(family, i % 2 == 0) for i, family in enumerate(TILED)]
)
def test_tiles_pooled_in_place_markers_kept(family, pad_left):
    """Every tile (image) pooled 2x2 on its own 4x4 grid, in order; the markers around each
    tile stay (PaliGemma: the prefix types shrink with the placeholders)."""
    make, make_batch, extra = TILED[family]
    model = make()
    batch = make_batch(pad_left)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=batch["pixel_values"])
        oracle = [avg_pool_grid(f, (4, 4)) for f in feats.pooler_output]
    fed, inputs, report = lm_visual_inputs(model, batch, compress={"mode": "pool"})
    torch.testing.assert_close(fed, torch.cat(oracle), rtol=1e-5, atol=1e-6)
    names = ("input_ids", "attention_mask", "labels", *extra)
    check_layout(inputs, make_batch(pad_left, tokens=4), names)
    tiles = len(oracle)
    assert (report.image_tokens_in, report.image_tokens_kept) == (16 * tiles, 4 * tiles)


@needs_encoder_outputs
@pytest.mark.parametrize("mode", ["pool", "merge"])
def test_perception_lm_video_frames_compressed_like_tiles(mode):
    """Every video frame (and image tile) pooled 2x2 / merged to half on its own 4x4 grid
    (oracle: avg_pool2d or bipartite_merge by hand on the unpatched model's own features,
    frame by frame), fed in order at the video placeholders, the runs shrunk to frames * 4 or
    8; the unpatched model fed the oracle's features on the shrunk batch gives the patched
    loss."""
    model = make_perception_lm()
    batch = perception_lm_video_batch(True)
    with torch.no_grad():
        image = model.model.get_image_features(pixel_values=batch["pixel_values"])
        video = model.model.get_image_features(pixel_values=batch["pixel_values_videos"])

    def by_hand(frames: torch.Tensor) -> torch.Tensor:  # [F, 16, D] -> [F, n', D]
        if mode == "pool":
            return torch.stack([avg_pool_grid(f, (4, 4)) for f in frames])
        return bipartite_merge(frames, 8).x

    oracle = {"image": by_hand(image.pooler_output), "video": by_hand(video.pooler_output)}
    kept = oracle["video"].shape[1]
    fed, inputs, report = lm_visual_inputs(
        model, batch, token_id=VID, compress={"mode": mode, "ratio": 0.5}
    )
    torch.testing.assert_close(fed, oracle["video"].flatten(0, 1), rtol=1e-5, atol=1e-6)
    shrunk = perception_lm_video_batch(True, tokens=kept)
    check_layout(inputs, shrunk)
    frames = 2 * PLM_FRAMES
    assert (report.video_tokens_in, report.video_tokens_kept) == (16 * frames, kept * frames)
    assert (report.image_tokens_in, report.image_tokens_kept) == (16, kept)
    handle = apply_sts(model, compress={"mode": mode, "ratio": 0.5}, skip=False)
    model.train()
    loss = model(**batch).loss
    handle.remove()
    image.pooler_output, video.pooler_output = oracle["image"], oracle["video"]
    del shrunk["pixel_values"], shrunk["pixel_values_videos"]
    expected = model(**shrunk, mm_encoder_outputs={"image": image, "video": video}).loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_perception_lm_videos_without_encoder_outputs_leave_nothing_behind(monkeypatch):
    """A transformers without mm_encoder_outputs (5.17) cannot take compressed videos: the
    ValueError comes before the images' features are answered, so no stale answer remains."""
    from sts_kernels.integrations.hf.adapters import _base, perception_lm

    for module in (_base, perception_lm):
        monkeypatch.setattr(module, "takes_encoder_outputs", lambda model: False)
    model = make_perception_lm()
    handle = apply_sts(model, skip=False)
    model.train()
    with pytest.raises(ValueError, match="mm_encoder_outputs"):
        model(**perception_lm_video_batch(True))
    handle.remove()
    assert "get_image_features" not in model.model.__dict__


def test_perception_lm_refuses_time_window():
    with pytest.raises(ValueError, match="time_window"):
        apply_sts(make_perception_lm(), compress={"time_window": 2})


@needs_encoder_outputs
def test_paligemma_prefix_attends_both_ways_after_the_shrink():
    """Fed the patched model's shrunk inputs, PaliGemma's mask still lets every kept image
    token see the prompt after it (the prefix), and the suffix stays causal: the patched loss
    equals the unpatched model's on the pooled batch with the oracle's features."""
    model = make_paligemma()
    batch = paligemma_batch(True)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=batch["pixel_values"])
        pooled = torch.stack([avg_pool_grid(f, (4, 4)) for f in feats.pooler_output])
    handle = apply_sts(model, compress={"mode": "pool"}, skip=False)
    model.train()
    loss = model(**batch).loss
    handle.remove()
    shrunk = paligemma_batch(True, tokens=4)
    del shrunk["pixel_values"]
    feats.pooler_output = pooled
    expected = model(**shrunk, mm_encoder_outputs={"image": feats}).loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # the bidirectional prefix matters: the same inputs typed all-suffix give another loss
    causal = model(
        **(shrunk | {"token_type_ids": torch.ones_like(shrunk["token_type_ids"])}),
        mm_encoder_outputs={"image": feats},
    ).loss
    assert not torch.allclose(causal, expected)
