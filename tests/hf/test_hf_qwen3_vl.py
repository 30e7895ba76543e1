"""apply_sts on a tiny Qwen3-VL: DeepStack levels pooled like the main visual tokens, video
frames as separate placeholder runs (timestamps between them)."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    QWEN3_VIDEOS,
    check_qwen_vtc_matches_reference,
    make_qwen3_vl,
    needs_encoder_outputs,
    qwen3_batch,
)

from sts_kernels.integrations.hf import apply_sts  # noqa: E402


@needs_encoder_outputs
@pytest.mark.parametrize("pad_left", [False, True])
def test_images_video_and_deepstack_equal_unpatched_on_shrunk_batch(pad_left):
    model = make_qwen3_vl("eager")
    check_qwen_vtc_matches_reference(
        model, pad_left, 1, make_batch=qwen3_batch, videos=QWEN3_VIDEOS
    )


def test_moe_router_logits_with_lds_are_refused():
    """The load-balancing loss needs every layer's router logits for all tokens; a layer LDS
    ran on a subset of rows has fewer (the loss crashed inside transformers): a clear error,
    asked per call or through the config; without LDS they are served."""
    model = make_qwen3_vl(moe=True)
    batch = qwen3_batch(False)
    handle = apply_sts(model, stage="instruct", skip={"seed": 0})
    model.train()
    with pytest.raises(ValueError, match="router logits"):
        model(**batch, output_router_logits=True)
    model.config.text_config.output_router_logits = True
    with pytest.raises(ValueError, match="router logits"):
        model(**batch)
    handle.remove()
    apply_sts(model, skip=False)
    assert model(**batch).aux_loss is not None


def test_time_window_is_refused():
    with pytest.raises(ValueError, match="time_window"):
        apply_sts(make_qwen3_vl(), compress={"time_window": 2})
