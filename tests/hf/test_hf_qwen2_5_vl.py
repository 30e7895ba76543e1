"""apply_sts on a tiny Qwen2.5-VL (window-attention vision tower; video positions scaled by
second_per_grid_ts)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    check_eval_equals_unpatched,
    check_qwen_vtc_matches_reference,
    check_remove_restores,
    check_train_step_is_sparser,
    make_qwen2_5_vl,
    needs_encoder_outputs,
    qwen_batch,
)

SECONDS = {"second_per_grid_ts": torch.tensor([0.5])}  # one video


@needs_encoder_outputs
@pytest.mark.parametrize(("pad_left", "time_window"), [(True, 1), (False, 2)])
def test_image_and_video_batch_equals_unpatched_on_shrunk_batch(pad_left, time_window):
    model = make_qwen2_5_vl("eager")
    check_qwen_vtc_matches_reference(model, pad_left, time_window, **SECONDS)


@pytest.mark.parametrize("pad_left", [False, True])
def test_train_step_with_compression_and_skipping(pad_left):
    report = check_train_step_is_sparser(make_qwen2_5_vl(), qwen_batch(pad_left) | SECONDS)
    assert report.image_tokens_kept == 6 and report.video_tokens_kept == 4


def test_eval_equals_unpatched_and_remove_restores():
    model = make_qwen2_5_vl()
    batch = qwen_batch(False) | SECONDS
    check_eval_equals_unpatched(model, batch)
    check_remove_restores(model, batch)
