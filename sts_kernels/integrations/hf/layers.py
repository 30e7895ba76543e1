"""The decoder layers under LDS: what the skipper calls in place of a layer (`LayerCall`), and an
HF decoder layer's arguments cut to each sample's kept tokens (`token_layer_args`, token mode)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


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


def token_layer_args(args: tuple, kwargs: dict, plan) -> tuple[tuple, dict]:
    """`token_arg_builder` for Llama / Qwen2-VL decoder layers.

    The layer runs on `[B, Kmax, D]` (each sample's kept tokens, padded). Rotary embeddings and
    position ids are gathered at the kept tokens' original positions; the attention mask is the
    original one (or causal on original positions when the model passed none) restricted to kept
    query/key pairs, padding keys masked. Padding query rows may attend to themselves only
    (their output is discarded) so no row is fully masked.
    """
    kwargs = dict(kwargs)
    pos = plan.positions  # [B, Kmax] original t of each kept token
    valid = plan.valid  # [B, Kmax]
    b, kmax = pos.shape

    def gather_t(x: Tensor, t_dim: int) -> Tensor:  # gather along the sequence dim
        # sizes read from `pos`, not closed over as ints: under torch.compile this may be its
        # own frame, and an int in a closure would be a guard (a recompile per Kmax)
        x = (
            x.expand(*x.shape[:t_dim], pos.shape[0], *x.shape[t_dim + 1 :])
            if x.shape[t_dim] == 1
            else x
        )
        shape = [1] * x.dim()
        shape[t_dim], shape[t_dim + 1] = pos.shape
        index = pos.view(shape).expand(*x.shape[: t_dim + 1], pos.shape[1], *x.shape[t_dim + 2 :])
        return x.gather(t_dim + 1, index)

    cos, sin = kwargs["position_embeddings"]  # [1 or B, T, hd]
    kwargs["position_embeddings"] = (gather_t(cos, 0), gather_t(sin, 0))
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = gather_t(kwargs["position_ids"], kwargs["position_ids"].dim() - 2)
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 4:
        raise ValueError(
            "LDS token mode needs a 4D attention mask (eager or sdpa attention), got "
            f"attention_mask of shape {tuple(mask.shape)}"
        )
    if mask is None:  # sdpa without padding: causal on the original positions
        allowed = pos[:, :, None] >= pos[:, None, :]
    else:
        m = mask[:, 0].expand(b, -1, -1)  # [B, T, T]
        m = m.gather(1, pos[:, :, None].expand(-1, -1, m.shape[-1]))
        m = m.gather(2, pos[:, None, :].expand(-1, kmax, -1))  # [B, Kmax, Kmax]
        allowed = m if m.dtype == torch.bool else m == 0
    eye = torch.eye(kmax, dtype=torch.bool, device=pos.device)
    allowed = (allowed & valid[:, None, :]) | (~valid[:, :, None] & eye)
    allowed = allowed | (eye & ~allowed.any(-1, keepdim=True))  # fully masked rows (left pad)
    if mask is not None and mask.dtype != torch.bool:  # eager: additive float mask
        additive = torch.zeros(allowed.shape, dtype=mask.dtype, device=mask.device)
        kwargs["attention_mask"] = additive.masked_fill(~allowed, torch.finfo(mask.dtype).min)[
            :, None
        ]
    else:
        kwargs["attention_mask"] = allowed[:, None]
    kwargs["cache"] = None
    kwargs["use_cache"] = False
    return args, kwargs
