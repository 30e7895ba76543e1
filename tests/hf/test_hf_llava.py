"""apply_sts on a tiny LLaVA through its adapter: the batched VTC (one compressor call for all
images of a batch). The checks every family passes: tests/hf/test_hf_families.py."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    frozen_features,
    llava_batch,
    make_llava,
    needs_encoder_outputs,
)
from kernel_count import count_kernels  # noqa: E402

from sts_kernels.integrations.hf.adapters import adapter_for  # noqa: E402
from sts_kernels.nn import VisualTokenCompressor  # noqa: E402


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
