"""apply_sts on a tiny Qwen2.5-VL (window-attention vision tower; video positions scaled by
second_per_grid_ts)."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    SECONDS,
    check_qwen_vtc_matches_reference,
    make_qwen2_5_vl,
    needs_encoder_outputs,
)


@needs_encoder_outputs
@pytest.mark.parametrize(("pad_left", "time_window"), [(True, 1), (False, 2)])
def test_image_and_video_batch_equals_unpatched_on_shrunk_batch(pad_left, time_window):
    model = make_qwen2_5_vl("eager")
    check_qwen_vtc_matches_reference(model, pad_left, time_window, **SECONDS)
