"""Mllama (`MllamaForConditionalGeneration`, Llama 3.2 Vision): images enter the LM through
cross-attention layers, not as tokens of the sequence. LDS only."""

from __future__ import annotations

from ....nn.skipper import slice_samples
from ._base import Adapter


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
    """Decoder layers (self- and cross-attention) skip whole samples; VTC is refused (there are
    no image placeholders in the sequence to shrink: the vision tokens are the cross-attention
    keys) and so is LDS token mode (its layers take a cross-attention mask per token)."""

    name = "Mllama"
    classes = ("MllamaForConditionalGeneration",)
    modes = ()
    mode_reason = (
        "its images enter through cross-attention, not as placeholder tokens in the sequence, "
        "so there is nothing to shrink; use skip only (stage='instruct')"
    )
    lds_modes = ("sample",)

    def skipper_arguments(self):
        return {"arg_slicer": slice_with_cross_states}


ADAPTER = MllamaAdapter()
