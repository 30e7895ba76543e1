"""apply_sts on a tiny LLaVA-NeXT-Video: anyres images and videos in one batch."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    LLAVA_VIDEO_ROWS,
    build_ids,
    llava_next_merge_pack,
    llava_next_reference_pack,
    llava_next_video_batch,
    make_llava_next_video,
    needs_encoder_outputs,
)

from sts_kernels import bipartite_merge, token_pool  # noqa: E402
from sts_kernels.integrations.hf import apply_sts  # noqa: E402


def _unpatched_on(ref, batch, pad_left, pack, compress_frames):
    """The unpatched model on the features compressed by hand: each image packed by `pack`
    (LLaVA-NeXT layout, newlines kept), the videos' 2 x 4 frames of 2x2 tokens `[8, 4, D]`
    by `compress_frames` (-> per video `[tokens, D]`), with the shrunk ids built by hand.
    Returns (its output, the shrunk inputs, the kept counts)."""
    with torch.no_grad():
        images = ref.model.get_image_features(
            batch["pixel_values"], batch["image_sizes"], return_dict=True
        )
        newline = ref.model.image_newline
        grids = [(4, 8), (6, 8)]  # unpadded crop grids of (32, 64) and (48, 64)
        images.pooler_output = [pack(f, newline, g) for f, g in zip(images.pooler_output, grids)]
        videos = ref.model.get_video_features(batch["pixel_values_videos"], return_dict=True)
        videos.pooler_output = list(compress_frames(videos.pooler_output.reshape(-1, 4, 128)))
    kept = {
        "image": [len(f) for f in images.pooler_output],
        "video": [len(videos.pooler_output[0])] * 2,
    }
    shrunk = build_ids(LLAVA_VIDEO_ROWS, kept, pad_left)
    del shrunk["mm_token_type_ids"]
    expected = ref(**shrunk, mm_encoder_outputs={"image": images, "video": videos})
    return expected, shrunk, kept


@needs_encoder_outputs
@pytest.mark.parametrize(("pad_left", "time_window"), [(False, 1), (True, 2)])
def test_images_and_videos_equal_unpatched_on_reference_features(pad_left, time_window):
    model = make_llava_next_video("eager")
    ref = copy.deepcopy(model)
    batch = llava_next_video_batch(model, pad_left)
    handle = apply_sts(model, compress={"time_window": time_window}, skip=False)
    out = model(**batch)

    def pool_frames(frames):  # 2x2 pooled (one token a frame), then frame windows averaged
        frames = token_pool(frames, (2, 2), (2, 2))  # [8, 1, D]
        return frames.view(2, 4 // time_window, time_window, 128).mean(2)

    expected, shrunk, kept = _unpatched_on(
        ref, batch, pad_left, llava_next_reference_pack, pool_frames
    )
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    for name, value in shrunk.items():
        assert torch.equal(handle.last_inputs[name], value), name
    r = handle.report
    assert (r.video_tokens_in, r.video_tokens_kept) == (2 * 4 * 4, 2 * 4 // time_window)
    assert r.image_tokens_kept == sum(kept["image"])
    handle.remove()


@needs_encoder_outputs
def test_merge_mode_on_images_and_video_frames():
    """Merge mode: anyres images as LLaVA-NeXT (base whole, every crop row on its own, newlines
    kept), every video frame merged on its own. Oracle: bipartite_merge by hand on the unpatched
    features, fed to the unpatched model with the shrunk layout built by hand."""
    model = make_llava_next_video("eager")
    ref = copy.deepcopy(model)
    batch = llava_next_video_batch(model, False)
    handle = apply_sts(model, compress={"mode": "merge", "ratio": 0.5}, skip=False)
    out = model(**batch)

    def merge_frames(frames):  # every frame's 4 tokens merged to 2
        return bipartite_merge(frames, 2).x.reshape(2, 4 * 2, 128)

    expected, _, _ = _unpatched_on(ref, batch, False, llava_next_merge_pack, merge_frames)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    assert (handle.report.video_tokens_in, handle.report.video_tokens_kept) == (32, 16)
    handle.remove()
