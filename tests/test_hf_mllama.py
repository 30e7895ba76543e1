"""apply_sts on a tiny Mllama (cross-attention VLM): LDS only."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import check_remove_restores, make_mllama, mllama_batch  # noqa: E402

from sts_kernels.integrations.hf import apply_sts  # noqa: E402
from sts_kernels.nn import VisualTokenCompressor  # noqa: E402


@pytest.mark.parametrize("pad_left", [False, True])
def test_sample_skipping_trains_and_equals_dense_without_skips(pad_left):
    model = make_mllama("eager")
    batch = mllama_batch(pad_left)
    dense = model(**batch)
    handle = apply_sts(model, skip={"p_max": 0.0})  # routes every layer, skips nothing
    assert handle.compressor is None  # the default stage asks for VTC: Mllama has none
    out = model(**batch)
    torch.testing.assert_close(out.logits, dense.logits, rtol=1e-5, atol=1e-5)
    handle.remove()

    handle = apply_sts(model, skip={"seed": 0, "p_max": 0.9})
    loss = model(**batch).loss
    loss.backward()
    r = handle.report
    assert torch.isfinite(loss) and sum(r.rows_run) < sum(r.rows_total)
    assert model.model.language_model.layers[1].cross_attn.k_proj.weight.grad is not None
    handle.remove()


def test_eval_equals_unpatched_and_remove_restores():
    model = make_mllama()
    batch = mllama_batch(True)
    model.eval()
    with torch.no_grad():
        dense = model(**batch).logits
        handle = apply_sts(model, stage="instruct")
        assert torch.equal(model(**batch).logits, dense)
    handle.remove()
    check_remove_restores(model, batch)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"compress": True}, "cross-attention"),
        ({"compress": VisualTokenCompressor()}, "nothing to shrink"),
        ({"stage": "align"}, "cross-attention"),
        ({"skip": {"mode": "token"}}, "mode='token'"),
    ],
)
def test_compression_and_token_mode_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        apply_sts(make_mllama(), **kwargs)
