"""apply_sts on a tiny Mllama (cross-attention VLM): LDS only."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import make_mllama, mllama_batch  # noqa: E402

from sts_kernels.integrations.hf import apply_sts  # noqa: E402


@pytest.mark.parametrize("pad_left", [False, True])
def test_sample_skipping_trains_and_equals_dense_without_skips(pad_left):
    model = make_mllama("eager")
    batch = mllama_batch(pad_left)
    dense = model(**batch)
    # routes every layer, skips nothing (and no VTC: this checks the skipper's plumbing)
    handle = apply_sts(model, compress=False, skip={"p_max": 0.0})
    assert handle.compressor is None
    out = model(**batch)
    torch.testing.assert_close(out.logits, dense.logits, rtol=1e-5, atol=1e-5)
    handle.remove()

    handle = apply_sts(model, compress=False, skip={"seed": 0, "p_max": 0.9})
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


def test_token_mode_is_refused():
    with pytest.raises(ValueError, match="mode='token'"):
        apply_sts(make_mllama(), skip={"mode": "token"})


@pytest.mark.parametrize("mode", ["pool", "merge"])
def test_vtc_compresses_the_cross_attention_states(mode):
    """VTC on Mllama: the cross-attention layers attend to each tile's class token plus its
    patch grid pooled 2x2 (or merged by half). Oracle: the tiles' states computed and
    compressed by hand (avg_pool2d / bipartite_merge), fed with a cross-attention mask
    expanded by hand straight into the unpatched language model."""
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    from sts_kernels import bipartite_merge

    model = make_mllama("eager").train()
    batch = mllama_batch(False)
    inner = model.model
    handle = apply_sts(model, compress={"mode": mode, "ratio": 0.5}, skip=False)
    logits = model(**batch).logits
    assert inner.vision_model.num_patches == 5  # restored after the forward
    report = handle.report
    handle.remove()
    with torch.no_grad():
        vision = inner.vision_model(
            pixel_values=batch["pixel_values"],
            aspect_ratio_ids=batch["aspect_ratio_ids"],
            aspect_ratio_mask=batch["aspect_ratio_mask"],
        ).last_hidden_state
        states = inner.multi_modal_projector(vision).reshape(-1, 5, inner.hidden_size)
        patches = states[:, 1:]  # [tiles, 4, D]: a 2x2 grid each
        if mode == "pool":
            grid = patches.transpose(1, 2).reshape(len(patches), -1, 2, 2)
            kept = torch.nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
        else:
            kept = bipartite_merge(patches, 2).x
        states = torch.cat([states[:, :1], kept], 1)
        mask, rows = _prepare_cross_attention_mask(
            batch["cross_attention_mask"], num_vision_tokens=states.shape[1], dtype=states.dtype
        )
        hidden = inner.language_model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            cross_attention_states=states,
            cross_attention_mask=mask,
            full_text_row_masked_out_mask=rows,
            use_cache=False,
        ).last_hidden_state
        expected = model.lm_head(hidden)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert report.image_tokens_in == 6 * 5 and report.image_tokens_kept == 6 * states.shape[1]


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
