"""Packed rows in flash-attention's varlen terms: which segment (packed sample) every column of a
`[B, T]` batch belongs to, and the `cu_seq_lens_q/k` / `max_length_q/k` of a layout.

Segments come from, in this order: varlen boundaries (`cu_seq_lens_q`, over the batch flattened
to `[B * T]`, as `DataCollatorWithFlattening` gives them), position-id restarts when there is
no 2-D attention mask (a 1-D position that is not its predecessor + 1, transformers' own rule;
the text row of `[4, B, T]` M-RoPE positions, or the temporal row of `[3, B, T]` ones going
down), else none (one per row).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def segments_of(
    shape: tuple[int, int],
    device,
    cu_seq_lens: Tensor | None,
    position_ids: Tensor | None,
    attention_mask: Tensor | None = None,
) -> Tensor | None:
    """`segment_ids` from the varlen boundaries or positions of a batch of `shape` [B, T].
    Positions mark packing only without a 2-D attention mask (transformers' rule: a padded
    batch's positions restart in its padding without being packed)."""
    b, t = shape
    if cu_seq_lens is not None:
        if int(cu_seq_lens[-1]) != b * t:
            raise ValueError(
                f"cu_seq_lens_q must end at the batch's B * T = {b * t} tokens (a batch of "
                f"shape {tuple(shape)}), got {cu_seq_lens.tolist()}"
            )
        flat = torch.arange(b * t, device=device)
        return torch.bucketize(flat, cu_seq_lens[1:].to(device), right=True).view(b, t)
    restarts = None if attention_mask is not None else position_restarts(position_ids, b, t)
    if restarts is None:
        return None
    starts = restarts.clone()
    starts[:, 0] = True  # every row begins a segment
    return starts.reshape(-1).long().cumsum(0).view(b, t) - 1


def position_restarts(position_ids: Tensor | None, b: int, t: int) -> Tensor | None:
    """[B, T] bool: a column whose position does not continue its predecessor's (column 0
    never counts); None without positions or without any restart."""
    if position_ids is None or t < 2:
        return None
    if position_ids.dim() == 3:  # M-RoPE: the text row, else the temporal row (non-decreasing)
        pos = position_ids[0].expand(b, t)
        step = pos[:, 1:] - pos[:, :-1]
        jump = step != 1 if position_ids.shape[0] == 4 else step < 0
    else:
        pos = position_ids.expand(b, t)
        jump = pos[:, 1:] - pos[:, :-1] != 1
    if not bool(jump.any()):
        return None
    return torch.cat([torch.zeros_like(jump[:, :1]), jump], dim=1)


def segment_starts(segments: Tensor) -> Tensor:
    """[B, T] column index of the first column of each column's segment (within its row)."""
    b, t = segments.shape
    col = torch.arange(t, device=segments.device).expand(b, t)
    new = torch.ones_like(segments, dtype=torch.bool)
    new[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return torch.where(new, col, 0).cummax(1).values


def varlen_kwargs(
    kw: dict[str, Any], segments: Tensor, valid: Tensor | None = None, always: bool = False
) -> dict:
    """`cu_seq_lens_q/k` and `max_length_q/k` for the batch `segments` [B, T] lays out (only
    the keys `kw` already holds, their dtypes kept; all four with `always`). Columns where
    `valid` is False (padding) form segments of their own per row, so no real token attends to
    them."""
    present = [key for key in VARLEN_KEYS if always or kw.get(key) is not None]
    if not present:
        return {}
    b, t = segments.shape
    seg = segments
    if valid is not None:  # padding: one fresh id per row, past every real one
        seg = torch.where(valid, seg, seg.max() + 1 + torch.arange(b, device=seg.device)[:, None])
    flat = seg.reshape(-1)
    new = torch.ones_like(flat, dtype=torch.bool)
    new[1:] = flat[1:] != flat[:-1]
    new[::t] = True  # a row never continues the previous row's segment
    starts = new.nonzero().squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([b * t])])
    lengths = ends - starts
    out = {}
    for key in present:
        like = kw.get(key)
        if like is None:  # flash-attention's own types
            like = torch.empty(0, dtype=torch.int32, device=seg.device) if key[0] == "c" else 0
        if key.startswith("cu_"):
            out[key] = torch.cat([starts, starts.new_tensor([b * t])]).to(like)
        else:
            out[key] = int(lengths.max()) if isinstance(like, int) else lengths.max().to(like)
    return out
