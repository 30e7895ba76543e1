"""Edges of real training batches under apply_sts (issue 17): caller M-RoPE positions, pooled
video frame spacing, masked placeholders, and the arguments refused before any forward."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    llava_batch,
    make_gemma3,
    make_llava,
    make_qwen2_5_vl,
    qwen_batch,
    tiled_batch,
)

from sts_kernels import apply_sts, route  # noqa: E402
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
    # positions computed with 0.5 s frames and no second_per_grid_ts: the interval is read
    # from them (it was lost: the rebuild spaced frames 1 s apart)
    half = torch.tensor([0.5])
    slow, _ = model.model.get_rope_index(
        batch["input_ids"],
        batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        video_grid_thw=batch["video_grid_thw"],
        second_per_grid_ts=half,
        attention_mask=batch["attention_mask"],
    )
    want = _loss(model, batch | {"second_per_grid_ts": half}, **vtc)
    assert _loss(model, given | {"position_ids": slow}, **vtc) == pytest.approx(want, abs=1e-6)
    assert abs(want - expected) > 1e-6
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


def test_gemma3_token_mode_windows_on_original_positions():
    """Gemma 3 token mode: a sliding-window layer over the kept tokens equals the layer run on
    each sample's kept tokens alone with the window computed on their ORIGINAL positions (the
    oracle builds that mask itself; the patch gathers the model's own 4-D mask)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer

    from sts_kernels.nn.layer_args import token_layer_args

    model = make_gemma3()
    config = model.config.text_config
    config.sliding_window = 3
    idx = config.layer_types.index("sliding_attention")
    torch.manual_seed(0)
    layer = Gemma3DecoderLayer(config, idx).eval()
    b, t, d = 2, 9, config.hidden_size
    x = torch.randn(b, t, d)
    pos = torch.arange(t)
    rotary = model.model.language_model.rotary_emb
    cos, sin = rotary(x, pos[None], "sliding_attention")

    def window_mask(p: torch.Tensor) -> torch.Tensor:  # [len, len] additive, on positions p
        allowed = (p[None, :] <= p[:, None]) & (p[:, None] - p[None, :] < 3)
        return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(x.dtype).min)

    skipper = LayerDynamicSkipper(
        torch.nn.ModuleList([layer]),
        d,
        mode="token",
        p_max=0.6,
        keep_first_last=False,
        seed=2,
        token_arg_builder=lambda a, k, plan: token_layer_args(a, k, plan, windowed=True),
    ).train()
    mask = window_mask(pos)[None, None].expand(b, 1, t, t)
    out = skipper(x, position_embeddings=(cos, sin), attention_mask=mask, position_ids=pos[None])
    keep, gate = skipper.report.keep_masks[0], skipper.report.gates[0]
    assert 0 < keep.sum() < keep.numel()
    expected, k = x.clone(), 0
    for row in range(b):
        kept = keep[row].nonzero().squeeze(1)
        y = layer(
            x[row, kept][None],
            position_embeddings=(cos[:, kept], sin[:, kept]),
            attention_mask=window_mask(kept)[None, None],
            position_ids=kept[None],
        )
        y = y[0] if isinstance(y, tuple) else y
        expected[row, kept] = x[row, kept] + gate[k : k + len(kept), None] * (y[0] - x[row, kept])
        k += len(kept)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_gemma3_token_mode_trains_and_refuses_varlen_windows():
    model = make_gemma3().train()
    batch = tiled_batch("gemma3", False)
    handle = apply_sts(model, compress=False, skip={"mode": "token", "p_max": 0.5, "seed": 0})
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and 0 < handle.report.layer_fraction < 1
    handle.remove()
    from sts_kernels.nn.layer_args import token_layer_args

    plan = route(torch.tensor([[True, False, True, True]]))
    kwargs = {"position_embeddings": (torch.zeros(1, 4, 2), torch.zeros(1, 4, 2))}
    kwargs |= {"attention_mask": None, "cu_seq_lens_q": torch.tensor([0, 2, 4])}
    with pytest.raises(ValueError, match="sliding window"):
        token_layer_args((), kwargs, plan, windowed=True)
