"""Packed (padding-free) rows of a Hugging Face batch: several samples in one row, each a
segment with its own positions (`sts_kernels.nn.varlen` says how segments are found).

    segments = segment_ids(kw)                   # [B, T] segment of every column
    kw.update(varlen_kwargs(kw, new_segments))   # cu_seq_lens_q/k, max_length_q/k recomputed
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ...nn.varlen import segment_starts, segments_of, varlen_kwargs

__all__ = ["segment_ids", "segment_starts", "varlen_kwargs"]


def segment_ids(kw: dict[str, Any]) -> Tensor | None:
    """[B, T] int64 segment number of every column of `kw["input_ids"]`, increasing along
    the flattened batch; None when the batch says nothing about packing (every row one
    sample, padding marked by the attention mask)."""
    ids = kw["input_ids"]
    return segments_of(ids.shape, ids.device, kw.get("cu_seq_lens_q"), kw.get("position_ids"))
