"""apply_sts on the tiled families (one square grid of tokens per image or tile): InternVL,
Gemma 3, SmolVLM / Idefics3 — one shared adapter base: VTC against reference-pooled tiles."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    check_tiled_vtc_matches_reference,
    make_gemma3,
    make_idefics3,
    make_internvl,
    make_smolvlm,
    needs_encoder_outputs,
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
