"""Edges of real training batches under apply_sts (issue 17): caller M-RoPE positions, pooled
video frame spacing, masked placeholders, and the arguments refused before any forward."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import llava_batch, make_gemma3, make_llava, make_qwen2_5_vl, qwen_batch  # noqa: E402

from sts_kernels import apply_sts  # noqa: E402
from sts_kernels.nn import LayerDynamicSkipper, VisualTokenCompressor  # noqa: E402


def _loss(model, batch, **apply_kwargs) -> float:
    handle = apply_sts(model, **apply_kwargs)
    try:
        return float(model(**batch, use_cache=False).loss)
    finally:
        handle.remove()


def test_caller_mrope_positions_are_rebuilt_not_dropped():
    """A collator that precomputes M-RoPE positions and sends no mm_token_type_ids: the patched
    loss equals the one of the model rebuilding them itself (dropped, the model fell back to
    1-D positions and the loss differed)."""
    model = make_qwen2_5_vl().train()
    batch = qwen_batch(False)
    positions, _ = model.model.get_rope_index(
        batch["input_ids"],
        batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        video_grid_thw=batch["video_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    given = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    given["position_ids"] = positions
    vtc = {"compress": {"window": 2}, "skip": False}
    expected = _loss(model, batch, **vtc)
    assert _loss(model, given, **vtc) == pytest.approx(expected, abs=1e-6)
    one_d = dict(given, position_ids=batch["attention_mask"].cumsum(1) - 1)
    assert abs(_loss(model, one_d, **vtc) - expected) > 1e-5  # the test can tell them apart


def test_pooled_frames_default_to_one_second_times_the_window():
    """time_window=2 without second_per_grid_ts: the pooled frames are 2 s apart, as if the
    caller had passed 1.0 s per frame."""
    model = make_qwen2_5_vl().train()
    batch = qwen_batch(False)
    vtc = {"compress": {"window": 2, "time_window": 2}, "skip": False}
    implicit = _loss(model, batch, **vtc)
    explicit = _loss(model, batch | {"second_per_grid_ts": torch.tensor([1.0])}, **vtc)
    half = _loss(model, batch | {"second_per_grid_ts": torch.tensor([0.5])}, **vtc)
    assert implicit == pytest.approx(explicit, abs=1e-7)
    assert abs(implicit - half) > 1e-6


def test_masked_placeholders_are_kept():
    """Placeholders under mask-0 columns (transformers' testers use torch.tril masks) stay:
    the unpatched model takes such a batch, so the patched one must too."""
    model = make_llava().train()
    batch = llava_batch(False)
    mask = batch["attention_mask"].clone()
    mask[0, : mask.shape[1] // 2] = 0  # the first row's first image under padding
    batch["attention_mask"] = mask
    handle = apply_sts(model, compress={"window": 2}, skip=False)
    loss = model(**batch).loss
    assert torch.isfinite(loss) and handle.report.image_tokens_kept == 12
    handle.remove()


def test_bad_arguments_are_refused_before_any_forward():
    with pytest.raises(ValueError, match="p_max"):
        apply_sts(make_llava(), skip={"p_max": "0.5"})
    with pytest.raises(ValueError, match="p_max"):
        LayerDynamicSkipper(torch.nn.ModuleList([torch.nn.Identity()]), 4, p_max="0.5")
    with pytest.raises(ValueError, match="larger than the grid"):
        VisualTokenCompressor(window=(8, 8))(torch.randn(1, 16, 4), grid=(4, 4))
    with pytest.raises(ValueError, match="not a square grid"):
        apply_sts(make_gemma3(mm_tokens_per_image=8), compress=True)
