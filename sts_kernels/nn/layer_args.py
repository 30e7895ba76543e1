"""The arguments of a rotary-embedding decoder layer (Hugging Face's Llama / Qwen style: called
with `position_embeddings`, a 4-D mask or flash-attention varlen kwargs) cut to each sample's
kept tokens: the skipper's token-mode default for such layers."""

from __future__ import annotations

import torch
from torch import Tensor

from .varlen import segments_of, varlen_kwargs


def token_layer_args(args: tuple, kwargs: dict, plan, windowed: bool = False) -> tuple[tuple, dict]:
    """`token_arg_builder` for Llama / Qwen2-VL decoder layers.

    The layer runs on `[B, Kmax, D]` (each sample's kept tokens, padded). Rotary embeddings and
    position ids are gathered at the kept tokens' original positions; the attention mask is the
    original one (or causal on original positions when the model passed none) restricted to kept
    query/key pairs, padding keys masked. Padding query rows may attend to themselves only
    (their output is discarded) so no row is fully masked. Packed rows under flash-attention
    varlen (no mask; `cu_seq_lens_q/k` or position-id restarts) get the varlen arguments of the
    kept layout instead: each packed sample's kept tokens one segment; `windowed` (layers with
    a sliding window, which varlen would apply over the kept tokens) refuses that path.
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
    mask = kwargs.get("attention_mask")
    varlen, whole = _kept_varlen(kwargs, plan) if mask is None else ({}, True)
    if varlen and windowed and not whole:  # whole packed samples keep their own windows
        raise ValueError(
            "LDS token mode: flash-attention varlen would apply this model's sliding window "
            "over the kept tokens rather than their original positions; use eager or sdpa "
            "attention (a 4-D mask, gathered at the original positions) or sample mode"
        )
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = gather_t(kwargs["position_ids"], kwargs["position_ids"].dim() - 2)
    kwargs["cache"] = None
    kwargs["use_cache"] = False
    if varlen:
        kwargs.update(varlen)
        return args, kwargs
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
    return args, kwargs


def _kept_varlen(kwargs: dict, plan) -> tuple[dict, bool]:
    """For a layer that takes packed rows as flash-attention varlen (no mask; `cu_seq_lens_q/k`,
    or position-id restarts): the varlen arguments of the kept tokens' layout `[B, Kmax]`
    (each segment's kept tokens, padding slots a segment of their own per row), {} for a batch
    that is not packed; and whether every segment is kept whole or not at all (LDS sample mode
    on packed rows), where a window over the kept tokens is the original one."""
    pos = plan.positions  # [B, Kmax]
    b, t = plan.shape
    segments = segments_of(
        (b, t), pos.device, kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids")
    )
    if segments is None:
        return {}, True
    kept = segments.gather(1, pos)  # [B, Kmax] segment of each kept token
    sizes = torch.bincount(segments.reshape(-1))
    kept_sizes = torch.bincount(kept[plan.valid], minlength=sizes.numel())
    whole = bool(((kept_sizes == 0) | (kept_sizes == sizes)).all())
    return varlen_kwargs(kwargs, kept, valid=plan.valid, always=True), whole
