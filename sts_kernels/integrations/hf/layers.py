"""The decoder layers under LDS: what the skipper calls in place of a layer (`LayerCall`), and an
HF decoder layer's arguments cut to each sample's kept tokens (`token_layer_args`, token mode,
from `sts_kernels.nn.layer_args`), and the checks and decisions the model's pre-hook makes for
them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...nn.layer_args import token_layer_args
from .packing import sample_segments
from .sequence import pad_id


def unpatched_forward(layer: nn.Module, previous) -> Any:
    """The forward `layer` had before the patch: an instance-level one (e.g. accelerate's), or
    its class's."""
    return previous if previous is not None else type(layer).forward.__get__(layer)


class LayerCall(nn.Module):
    """Stands in for a decoder layer inside the skipper: calls the layer's own forward, without
    going through the layer's `__call__` again (its hooks already ran on the outer call, and
    output recorders such as `output_hidden_states` must see only full-batch outputs)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not a submodule: no duplicate parameters
        self.previous = layer.__dict__.get("forward")

    def forward(self, *args, **kwargs):
        return unpatched_forward(self.layer, self.previous)(*args, **kwargs)

    def parameters(self, recurse: bool = True):
        """The layer's: the skipper joins a layer skipped for every row to their graph (zero
        gradients, so DDP's default flags hold). Not registered here: `model.parameters()`
        and `state_dict()` walk submodules, and see each parameter once, at the layer."""
        return self.layer.parameters(recurse)


def check_router_logits(kw: dict[str, Any], model: nn.Module) -> None:
    """A mixture-of-experts LM asked for its router logits (for the load-balancing loss)
    would get, from a layer LDS ran on K of its rows, logits for those rows only, which the
    loss cannot line up with the other layers' (it fails deep inside, or would weigh layers
    unevenly): refused with the reason."""
    requested = kw.get("output_router_logits")
    if requested is None:
        config = getattr(model.config, "text_config", model.config)
        requested = getattr(config, "output_router_logits", False)
    if requested:
        raise ValueError(
            "apply_sts: LDS skips rows of the decoder layers, so a mixture-of-experts model "
            "cannot return every layer's router logits (output_router_logits=True, for the "
            "load-balancing loss); turn them off, or train this stage without LDS (skip=False)"
        )


def draw_decisions(skipper: nn.Module, kw: dict[str, Any], model: nn.Module) -> None:
    """The skipper's decisions for every decoder layer of this forward, drawn before it runs
    (`LayerDynamicSkipper.plan_step`): the LM's hidden states are `[B, T, D]` for the
    (compressed) `input_ids` or `inputs_embeds` the model now runs on. On packed rows sample
    mode decides per packed sample (segment), not per row."""
    tokens = kw.get("input_ids")
    tokens = kw.get("inputs_embeds") if tokens is None else tokens
    if tokens is None or tokens.dim() < 2:
        return
    # the gates' dtype follows the decoder's (fp64 layers get fp64 gates, all else fp32)
    weight = next(skipper.layers[0].layer.parameters(), None) if len(skipper.layers) else None
    dtype = weight.dtype if weight is not None else torch.float32
    segments = None
    if skipper.mode == "sample" and kw.get("input_ids") is not None:
        segments = sample_segments(kw, pad_id(model))
    skipper.plan_step(tuple(tokens.shape[:2]), tokens.device, dtype, segments=segments)


__all__ = ["LayerCall", "check_router_logits", "draw_decisions", "token_layer_args"]
