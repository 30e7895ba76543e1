"""apply_sts on a tiny Mllama (cross-attention VLM): LDS only."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import make_mllama, mllama_batch  # noqa: E402

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


def test_instruct_stage_eval_equals_unpatched():
    model = make_mllama()
    batch = mllama_batch(True)
    model.eval()
    with torch.no_grad():
        dense = model(**batch).logits
        handle = apply_sts(model, stage="instruct")
        assert torch.equal(model(**batch).logits, dense)
    handle.remove()


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


def test_cross_attention_layer_on_kept_samples_equals_its_dense_rows():
    """The Mllama arg_slicer keeps each sample's images with it: the cross-attention layer run
    on samples {0, 2} gives the dense layer's rows 0 and 2."""
    import sts_kernels as sts
    from sts_kernels.integrations.hf.adapters.mllama import slice_with_cross_states

    model = make_mllama("eager")
    layer = model.model.language_model.layers[1]  # the cross-attention layer
    seen = {}
    hook = layer.register_forward_pre_hook(
        lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True
    )
    with torch.no_grad():
        model(**mllama_batch(False))
        hook.remove()
        args = seen["args"]
        # the call wrote a cache (named past_key_values in transformers 5.17): none now
        kwargs = seen["kwargs"] | {"use_cache": False}
        kwargs |= {k: None for k in ("cache", "past_key_values") if k in kwargs}
        assert kwargs["cross_attention_states"].shape[0] == 3 * 2  # [B * images * tiles, P, D]
        dense = layer(*args, **kwargs)
        plan = sts.route(torch.tensor([True, False, True]))
        sub_args, sub_kwargs = slice_with_cross_states(args, kwargs, plan)
        kept = layer(*sub_args, **sub_kwargs)
    dense, kept = (out[0] if isinstance(out, tuple) else out for out in (dense, kept))
    torch.testing.assert_close(kept, dense[[0, 2]], rtol=1e-5, atol=1e-6)
