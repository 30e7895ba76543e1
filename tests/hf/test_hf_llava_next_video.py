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


@needs_encoder_outputs
@pytest.mark.parametrize(("pad_left", "time_window"), [(False, 1), (True, 2)])
def test_images_and_videos_equal_unpatched_on_reference_features(pad_left, time_window):
    model = make_llava_next_video("eager")
    ref = copy.deepcopy(model)
    batch = llava_next_video_batch(model, pad_left)
    handle = apply_sts(model, compress={"time_window": time_window}, skip=False)
    out = model(**batch)

    with torch.no_grad():
        images = ref.model.get_image_features(
            batch["pixel_values"], batch["image_sizes"], return_dict=True
        )
        newline = ref.model.image_newline
        grids = [(4, 8), (6, 8)]  # unpadded crop grids of (32, 64) and (48, 64)
        images.pooler_output = [
            llava_next_reference_pack(f, newline, g) for f, g in zip(images.pooler_output, grids)
        ]
        videos = ref.model.get_video_features(batch["pixel_values_videos"], return_dict=True)
        frames = token_pool(videos.pooler_output.reshape(-1, 4, 128), (2, 2), (2, 2))  # [8, 1, D]
        frames = frames.view(2, 4 // time_window, time_window, 128).mean(2)  # frame windows
        videos.pooler_output = list(frames)
    kept = {"image": [len(f) for f in images.pooler_output], "video": [4 // time_window] * 2}
    shrunk = build_ids(LLAVA_VIDEO_ROWS, kept, pad_left)
    del shrunk["mm_token_type_ids"]
    expected = ref(**shrunk, mm_encoder_outputs={"image": images, "video": videos})
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
    with torch.no_grad():
        images = ref.model.get_image_features(
            batch["pixel_values"], batch["image_sizes"], return_dict=True
        )
        newline = ref.model.image_newline
        grids = [(4, 8), (6, 8)]  # unpadded crop grids of (32, 64) and (48, 64)
        images.pooler_output = [
            llava_next_merge_pack(f, newline, g) for f, g in zip(images.pooler_output, grids)
        ]
        videos = ref.model.get_video_features(batch["pixel_values_videos"], return_dict=True)
        frames = bipartite_merge(videos.pooler_output.reshape(-1, 4, 128), 2).x  # [8, 2, D]
        videos.pooler_output = list(frames.reshape(2, 4 * 2, 128))
    kept = {"image": [len(f) for f in images.pooler_output], "video": [4 * 2] * 2}
    shrunk = build_ids(LLAVA_VIDEO_ROWS, kept, False)
    del shrunk["mm_token_type_ids"]
    expected = ref(**shrunk, mm_encoder_outputs={"image": images, "video": videos})
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    assert (handle.report.video_tokens_in, handle.report.video_tokens_kept) == (32, 16)
    handle.remove()
