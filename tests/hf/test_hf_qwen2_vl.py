"""apply_sts on a tiny Qwen2-VL: images and videos in one batch, batched VTC, M-RoPE."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    V_END,
    V_START,
    check_qwen_vtc_matches_reference,
    check_train_step_is_sparser,
    frozen_features,
    make_qwen2_vl,
    needs_encoder_outputs,
    qwen_batch,
)
from kernel_count import count_kernels  # noqa: E402

from sts_kernels.integrations.hf.adapters import adapter_for  # noqa: E402
from sts_kernels.nn import VisualTokenCompressor  # noqa: E402


@needs_encoder_outputs
@pytest.mark.parametrize(("pad_left", "time_window"), [(False, 1), (True, 2)])
def test_image_and_video_batch_equals_unpatched_on_shrunk_batch(pad_left, time_window):
    check_qwen_vtc_matches_reference(make_qwen2_vl("eager"), pad_left, time_window)


def test_video_only_batch():
    model = make_qwen2_vl()
    batch = qwen_batch(False, images=[], rows=[[[5], [V_START], "video", [V_END]], [[6, 7]]])
    report = check_train_step_is_sparser(model, batch)
    assert report.image_tokens_in == 0 and report.video_tokens_kept == 4


def _compress_counts(model, batch) -> tuple:
    """Kernels and syncs of the adapter's work around the vision tower."""
    with torch.no_grad():
        feats = model.model.get_image_features(
            batch["pixel_values"], batch["image_grid_thw"], return_dict=True
        )
    with frozen_features(model.model, "get_image_features", feats), count_kernels() as c:
        _, shrinks = adapter_for(model).compress(model, VisualTokenCompressor(), dict(batch))
    return c.kernels, c.syncs, shrinks["image"][:2]


@needs_encoder_outputs
def test_compressor_kernel_count_does_not_grow_with_images():
    """Images sharing a grid go through one pooling call: 2 or 6 images (plus one of another
    grid) cost the same kernels and syncs."""
    model = make_qwen2_vl()
    results = []
    for n in (2, 6):
        images = [(1, 4, 4)] * n + [(1, 4, 6)]
        rows = [[[5], [V_START], "image", [V_END]] for _ in images]
        results.append(
            _compress_counts(model, qwen_batch(False, images=images, videos=[], rows=rows))
        )
    (k2, s2, c2), (k6, s6, c6) = results
    assert c2 == (2 * 4 + 6, 2 * 1 + 2) and c6 == (6 * 4 + 6, 6 * 1 + 2)
    assert (k6, s6) == (k2, s2), results
