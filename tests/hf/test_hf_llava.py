"""apply_sts on a tiny LLaVA through its adapter: the checks every family passes, and the
batched VTC (one compressor call for all images of a batch)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    check_eval_equals_unpatched,
    check_remove_restores,
    check_train_step_is_sparser,
    frozen_features,
    llava_batch,
    make_llava,
    needs_encoder_outputs,
)
from kernel_count import count_kernels  # noqa: E402

from sts_kernels.integrations.hf.adapters import adapter_for  # noqa: E402
from sts_kernels.nn import VisualTokenCompressor  # noqa: E402


@pytest.mark.parametrize("pad_left", [False, True])
@pytest.mark.parametrize("mode", ["pool", "merge"])
def test_train_step_with_compression_and_skipping(pad_left, mode):
    report = check_train_step_is_sparser(
        make_llava(), llava_batch(pad_left), compress={"mode": mode, "ratio": 0.5}
    )
    assert report.image_tokens_in == 48 and report.image_tokens_kept == (
        12 if mode == "pool" else 24
    )
    assert report.video_tokens_in == 0


def test_eval_equals_unpatched_and_remove_restores():
    model = make_llava()
    batch = llava_batch(True)
    check_eval_equals_unpatched(model, batch)
    check_remove_restores(model, batch)


@pytest.mark.parametrize("strategy", ["default", "full"])
@needs_encoder_outputs
def test_compressor_kernel_count_does_not_grow_with_images(strategy):
    """The adapter's work around the vision tower (features stubbed) costs the same kernels
    and syncs for 2 or 6 images; with strategy "full" the CLS tokens stay in front."""
    model = make_llava(vision_feature_select_strategy=strategy)
    results = []
    for n in (2, 6):
        cls = 1 if strategy == "full" else 0
        batch = llava_batch(False, images=n, rows=[[[5], "image", [6]]] * n, tokens=16 + cls)
        with torch.no_grad():
            feats = model.model.get_image_features(
                pixel_values=batch["pixel_values"],
                vision_feature_select_strategy=strategy,
                return_dict=True,
            )
        outputs = list(feats.pooler_output)  # [cls + 16, D] per image
        with frozen_features(model.model, "get_image_features", feats), count_kernels() as c:
            kw, shrinks = adapter_for(model).compress(model, VisualTokenCompressor(), batch)
        assert shrinks["image"][:2] == (n * (16 + cls), n * (4 + cls))
        packed = kw["mm_encoder_outputs"]["image"].pooler_output
        assert all(torch.equal(p[:cls], o[:cls]) for p, o in zip(packed, outputs))
        results.append((c.kernels, c.syncs))
    assert results[0] == results[1], results
