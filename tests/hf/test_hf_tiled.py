"""apply_sts on the tiled families (one square grid of tokens per image or tile): InternVL,
Gemma 3, SmolVLM / Idefics3 — one shared adapter base, one test per family and check."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    check_eval_equals_unpatched,
    check_remove_restores,
    check_tiled_vtc_matches_reference,
    check_train_step_is_sparser,
    make_gemma3,
    make_idefics3,
    make_internvl,
    make_smolvlm,
    needs_encoder_outputs,
    tiled_batch,
)

MAKERS = {
    "internvl": make_internvl,
    "gemma3": make_gemma3,
    "smolvlm": make_smolvlm,
    "idefics3": make_idefics3,
}


@needs_encoder_outputs
@pytest.mark.parametrize("family", MAKERS)
def test_vtc_equals_unpatched_on_reference_pooled_tiles(family):
    check_tiled_vtc_matches_reference(MAKERS[family](), family, pad_left=True)


@pytest.mark.parametrize("family", MAKERS)
@pytest.mark.parametrize(("pad_left", "mode"), [(False, "pool"), (True, "merge")])
def test_train_step_with_compression_and_skipping(family, pad_left, mode):
    batch = tiled_batch(family, pad_left)
    report = check_train_step_is_sparser(
        MAKERS[family](), batch, compress={"mode": mode, "ratio": 0.5}
    )
    assert report.image_tokens_in == 48
    assert report.image_tokens_kept == (12 if mode == "pool" else 24)


@pytest.mark.parametrize("family", MAKERS)
def test_eval_equals_unpatched_and_remove_restores(family):
    model = MAKERS[family]()
    batch = tiled_batch(family, False)
    check_eval_equals_unpatched(model, batch)
    check_remove_restores(model, batch)
