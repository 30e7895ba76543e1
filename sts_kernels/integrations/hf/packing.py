"""Packed (padding-free) rows of a Hugging Face batch: several samples in one row, each a
segment with its own positions (`sts_kernels.nn.varlen` says how segments are found).

    segments = segment_ids(kw)                   # [B, T] segment of every column
    kw.update(varlen_kwargs(kw, new_segments))   # cu_seq_lens_q/k, max_length_q/k recomputed
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...nn.varlen import segment_starts, segments_of, varlen_kwargs

__all__ = [
    "padding_columns",
    "sample_segments",
    "segment_ids",
    "segment_starts",
    "varlen_kwargs",
]


def segment_ids(kw: dict[str, Any]) -> Tensor | None:
    """[B, T] int64 segment number of every column of `kw["input_ids"]`, increasing along
    the flattened batch; None when the batch says nothing about packing (every row one
    sample, padding marked by the attention mask)."""
    ids = kw["input_ids"]
    mask = kw.get("attention_mask")
    mask = mask if mask is not None and mask.dim() == 2 else None
    return segments_of(ids.shape, ids.device, kw.get("cu_seq_lens_q"), kw.get("position_ids"), mask)


def sample_segments(kw: dict[str, Any], pad_token_id: int) -> Tensor | None:
    """`segment_ids` for LDS sample mode: the packed samples numbered 0..S-1 along the
    flattened batch, -1 on segments of padding (`padding_columns`: a packed row's own
    padding, re-padding after a shrink), which are no samples; None when not packed."""
    segments = segment_ids(kw)
    if segments is None:
        return None
    padding = padding_columns(kw["input_ids"], segments, pad_token_id, kw.get("labels"))
    padding = padding.reshape(-1)
    if bool(padding.all()):
        return None
    flat = segments.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)  # the first column of every sample
    starts[1:] = flat[1:] != flat[:-1]
    number = (starts & ~padding).long().cumsum(0) - 1
    return torch.where(padding, -1, number).view_as(segments)


def padding_columns(
    input_ids: Tensor, segments: Tensor, pad_token_id: int, labels: Tensor | None = None
) -> Tensor:
    """[B, T] bool: the columns of packed segments that hold only `pad_token_id` and, with
    `labels`, no loss target (a packed row's own padding, or the re-padding of an earlier
    shrink): no sample's. A real sample made only of the pad id (e.g. EOS where pad == EOS)
    has targets, so only `labels` tell it from padding."""
    flat = segments.reshape(-1)
    real_token = input_ids.reshape(-1) != pad_token_id
    if labels is not None:
        real_token = real_token | (labels.reshape(-1) != -100)
    # a segment is a sample if any of its tokens is (ids < numel: no host read)
    real = torch.zeros(flat.numel() + 1, dtype=torch.bool, device=flat.device)
    real.index_put_((flat,), real_token, accumulate=True)
    return ~real[flat].view_as(segments)
