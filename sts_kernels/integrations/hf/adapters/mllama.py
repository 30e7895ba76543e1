"""Mllama (`MllamaForConditionalGeneration`, Llama 3.2 Vision): images enter the LM through
cross-attention layers, not as tokens of the sequence: VTC compresses the cross-attention
states."""

from __future__ import annotations

import math

import torch

from ....nn.skipper import slice_samples
from ._base import Adapter, Shrink


def slice_with_cross_states(args: tuple, kwargs: dict, plan):
    """Sample-mode `arg_slicer`: `cross_attention_states` arrive as `[B * images * tiles, P, D]`;
    regrouped per sample as `[B, images * tiles * P, D]` (the cross-attention's
    `view(bsz, -1, ...)` reads them the same way), slicing the batch keeps each sample's
    images with it."""
    states = kwargs.get("cross_attention_states")
    batch = plan.shape[0]
    if states is not None and states.shape[0] != batch:
        kwargs = {**kwargs, "cross_attention_states": states.reshape(batch, -1, states.shape[-1])}
    return slice_samples(args, kwargs, plan)


class MllamaAdapter(Adapter):
    """Images enter through cross-attention: every tile's `P = 1 + side * side` vision tokens
    (class token first) are the keys and values of every cross-attention layer. VTC compresses
    those: each tile's patch grid pooled (or merged) on its own, the class token passed through,
    all tiles of a batch in one call; the model gets `cross_attention_states` instead of pixels
    and, for this forward, the vision model's `num_patches` the kept count (the model expands
    `cross_attention_mask` by it). The text sequence keeps its length. Decoder layers (self-
    and cross-attention) skip whole samples; LDS token mode is refused (its layers take a
    cross-attention mask per token)."""

    name = "Mllama"
    classes = ("MllamaForConditionalGeneration",)
    lds_modes = ("sample",)
    lds_reason = "its layers take a cross-attention mask per token"
    packs_reason = (
        "transformers' Mllama has no flash attention (4-D cross-attention masks), and a packed "
        "row would need every sample's images and cross-attention masks re-laid into one row's "
        "image slots, which no collator builds: untested"
    )
    tokens_in_sequence = False

    def skipper_arguments(self):
        return {"arg_slicer": slice_with_cross_states}

    def placeholder_ids(self, model):
        return {}  # its <|image|> tokens are markers, not the visual tokens

    def compress(self, model, compressor, kw):
        inner = model.model
        vision = inner.vision_model(
            pixel_values=kw["pixel_values"],
            aspect_ratio_ids=kw["aspect_ratio_ids"],
            aspect_ratio_mask=kw.get("aspect_ratio_mask"),
        ).last_hidden_state  # [B, images, tiles, P, Dv]
        states = inner.multi_modal_projector(vision).reshape(
            -1, vision.shape[-2], inner.hidden_size
        )
        side = math.isqrt(states.shape[1] - 1)  # [B * images * tiles, 1 + side^2, D]
        out = compressor.compress_many([states[:, 1:]], [(side, side)])[0].x
        kw["cross_attention_states"] = torch.cat([states[:, :1], out], 1)
        kw["pixel_values"] = None
        inner.vision_model.num_patches = 1 + out.shape[1]
        tiles = states.shape[0]
        return kw, {"image": Shrink(tiles * states.shape[1], tiles * (1 + out.shape[1]), None)}

    def end_forward(self, model):
        vision = model.model.vision_model
        vision.num_patches = (vision.image_size // vision.patch_size) ** 2 + 1


ADAPTER = MllamaAdapter()
