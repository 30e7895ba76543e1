"""Oracle checks of issue 18's group C families (the shared checks run in test_hf_families.py):
the compressed tokens the LM receives are the 2x2 average (or the hand-run bipartite merge) of
the unpatched model's own projected features, in order, and the shrunk text keeps the
processor's markers around every tile."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    IMG,
    idefics2_batch,
    janus_batch,
    llama4_batch,
    make_idefics2,
    make_janus,
    make_llama4,
    needs_encoder_outputs,
)
from test_hf_group_a import check_layout  # noqa: E402
from test_hf_group_b import assert_tokens, run_patched  # noqa: E402

import sts_kernels as sts  # noqa: E402
from sts_kernels.integrations.hf import apply_sts  # noqa: E402
from sts_kernels.integrations.hf.adapters import adapter_for  # noqa: E402
from sts_kernels.integrations.hf.adapters.llama4 import token_args  # noqa: E402


def avg_pool_tile(f: torch.Tensor, side: int = 4) -> torch.Tensor:
    """[side * side, D] row-major -> [(side / 2)^2, D]: each 2x2 window's mean."""
    x = f.T.reshape(1, -1, side, side)
    return F.avg_pool2d(x, 2).flatten(2)[0].T


def merge_tile(f: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """[k, D] -> the bipartite merge the compressor runs (r = k * (1 - ratio)), by hand."""
    return sts.bipartite_merge(f[None], round(len(f) * (1 - ratio))).x[0]


# ---- Llama 4: tiles + global view, chunked attention, MoE ------------------------------------


# family: (maker, batch(pad_left, tokens), its language model, VTC modes)
FAMILIES = {
    "llama4": (make_llama4, llama4_batch, lambda m: m.language_model, ("pool", "merge")),
    "janus": (make_janus, janus_batch, lambda m: m.model.language_model, ("pool", "merge")),
    "idefics2": (make_idefics2, idefics2_batch, lambda m: m.model.text_model, ("merge",)),
}


def tile_features(model, batch) -> torch.Tensor:
    """The unpatched model's projected features, `[tiles, 16, D]` in placeholder order."""
    inner = getattr(model, "model", model)  # Llama 4 keeps its parts on the model itself
    with torch.no_grad():
        feats = inner.get_image_features(batch["pixel_values"]).pooler_output
    return torch.cat(list(feats)).view(-1, 16, feats[0].shape[-1])


@needs_encoder_outputs
@pytest.mark.parametrize(
    ("family", "mode"), [(f, mode) for f, (*_, modes) in FAMILIES.items() for mode in modes]
)
def test_every_tile_compressed_in_place(family, mode):
    """Every tile (Llama 4: image 0's 1x2 tiles and global view, image 1's single view) pooled
    2x2 (merged by half, by hand) on its own run, in order; the markers around each run stay:
    the shrunk text is the processor's layout at the kept count a tile."""
    make, make_batch, lm_of, _ = FAMILIES[family]
    model = make()
    pad_left = mode == "merge"
    batch = make_batch(pad_left)
    one = avg_pool_tile if mode == "pool" else merge_tile
    oracle = torch.cat([one(f) for f in tile_features(model, batch)])
    lm_kw, inputs, report = run_patched(model, lm_of, batch, mode=mode)
    assert_tokens(lm_kw, inputs["input_ids"], IMG, oracle)
    kept = 4 if mode == "pool" else 8
    check_layout(inputs, make_batch(pad_left, tokens=kept))
    tiles = len(oracle) // kept
    assert (report.image_tokens_in, report.image_tokens_kept) == (16 * tiles, kept * tiles)


def _layer_call(model, batch, idx: int):
    """(hidden states, kwargs) decoder layer `idx` of the unpatched model gets, and its output."""
    layer = model.language_model.model.layers[idx]
    seen = {}

    def grab(module, args, kwargs, output):
        seen.update(hidden=args[0], kwargs=kwargs, out=output)

    hook = layer.register_forward_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        hook.remove()
    return seen["hidden"], seen["kwargs"], seen["out"]


@pytest.mark.parametrize(
    ("idx", "kept"),
    [
        # chunked (chunks of 8, rope): the first 5 tokens of chunk 0 and 3 of chunk 1. On the
        # kept tokens' own indices the chunk-1 tokens would share a chunk with the others
        (0, [0, 1, 2, 3, 4, 8, 9, 10]),
        (3, list(range(11))),  # full attention, NoPE with temperature tuning: a prefix
    ],
    ids=["chunked", "full-nope"],
)
def test_llama4_token_mode_keeps_each_layers_own_mask(idx, kept):
    """`token_args` gives a layer run on the kept tokens the chunks (full causal mask) of
    their original positions: on a kept set whose every token sees all its own mask's earlier
    tokens, the layer's output there is the full sequence's."""
    model = make_llama4().eval()
    batch = llama4_batch(pad_left=False)
    hidden, kwargs, full = _layer_call(model, batch, idx)
    assert kwargs["attention_mask"].dim() == 4  # padded rows: every layer type gets a mask
    mask = torch.zeros(hidden.shape[:2], dtype=torch.bool)
    mask[:, kept] = True
    plan = sts.route(mask)
    rows = sts.gather_rows(hidden, plan, padded=True)  # [B, Kmax, D]
    args, call = token_args((), dict(kwargs), plan)
    layer = model.language_model.model.layers[idx]
    with torch.no_grad():
        out = layer(rows, *args, **call)
    torch.testing.assert_close(out, full[:, kept], rtol=1e-5, atol=1e-5)


def test_llama4_token_mode_refused_past_the_temperature_floor():
    """Rows longer than floor_scale - 1 tokens: the NoPE layers' temperature of a row of kept
    tokens would differ; token mode says so at the forward (sample mode runs)."""
    model = make_llama4(text={"floor_scale": 16})
    batch = llama4_batch(pad_left=True)
    handle = apply_sts(model, compress=False, skip={"mode": "token", "seed": 0, "p_max": 0.9})
    model.train()
    with pytest.raises(ValueError, match=r"temperature.*floor_scale"):
        model(**batch)
    handle.remove()
    handle = apply_sts(model, compress=False, skip={"mode": "sample", "seed": 0})
    assert torch.isfinite(model(**batch).loss)
    handle.remove()


def test_llama4_router_logits_refused_under_lds():
    model = make_llama4()
    handle = apply_sts(model, skip={"seed": 0})
    model.train()
    with pytest.raises(ValueError, match="router logits"):
        model(**llama4_batch(True), output_router_logits=True)
    handle.remove()


# ---- Idefics2: perceiver latents, no grid ------------------------------------------------------


def test_idefics2_vtc_is_refused_saying_why():
    with pytest.raises(ValueError, match="perceiver resampler's latents are learned queries"):
        apply_sts(make_idefics2(), compress={"mode": "pool"})


def test_janus_and_idefics2_have_adapters_of_their_own():
    """No convention warning: each is served by its own row of the support table."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert adapter_for(make_janus()).name == "Janus"
        assert adapter_for(make_idefics2()).name == "Idefics2"
