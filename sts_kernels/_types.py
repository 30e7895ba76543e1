"""Result types shared by every backend."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor


class MergeResult(NamedTuple):
    """Output of `bipartite_merge`."""

    x: Tensor  # [B, N_out, D] merged tokens
    size: Tensor  # [B, N_out] original tokens each output token stands for
    index: Tensor  # [B, N] int64: output position of every input token


@dataclass(frozen=True, eq=False)
class RoutePlan:
    """Which rows of the activations run a layer, from `route(mask)`.

    A row is one entry of the mask: `shape == mask.shape` is `(B,)` (whole samples) or
    `(B, T)` (single tokens). Rows are numbered in row-major order over `shape`.
    """

    index: Tensor  # [K] int64 flat row ids of the active rows, ascending
    counts: Tensor  # [B] int64 active rows per sample
    offsets: Tensor  # [B + 1] int64 exclusive cumulative sum of counts
    shape: tuple[int, ...]  # the mask's shape
    # [R] int64 k of every row (-1: skipped), the inverse of `index`; `route` fills it from
    # its compaction, otherwise it is built on first use (`row_to_k`)
    row_map: Tensor | None = field(default=None, repr=False)
    # [B, Kmax] int64, `padded_index` when `route` computed it (its width is Kmax: no read)
    padded_map: Tensor | None = field(default=None, repr=False)

    @property
    def num_active(self) -> int:
        """K, the number of rows that run the layer."""
        return self.index.numel()

    @property
    def num_rows(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.index.device

    @property
    def row_to_k(self) -> Tensor:
        """[R] int64 k of every row, -1 for a row that skips (built once per plan; a plain
        property, not a cached_property, so torch.compile can trace it)."""
        if self.row_map is None:
            rows = self.num_rows
            # ids out of range (a hand-built plan) land in a spare entry: no device assert
            ids = torch.where((self.index >= 0) & (self.index < rows), self.index, rows)
            row_to_k = torch.full((rows + 1,), -1, dtype=torch.int64, device=self.device)
            arange = torch.arange(self.num_active, device=self.device)
            object.__setattr__(self, "row_map", row_to_k.index_copy_(0, ids, arange)[:rows])
        return self.row_map

    @property
    def max_count(self) -> int:
        """Kmax, the most active rows of any sample (reads one number from the device unless
        `route` already computed the padded layout)."""
        if self.padded_map is not None:
            return self.padded_map.shape[1]
        if "_max_count" not in self.__dict__:
            count = int(self.counts.max().item()) if self.counts.numel() else 0
            object.__setattr__(self, "_max_count", count)
        return self.__dict__["_max_count"]

    @property
    def padded_index(self) -> Tensor:
        """[B, Kmax] flat row id of each sample's j-th active row, -1 past its count."""
        if self.padded_map is None:
            b = self.counts.numel()
            j = torch.arange(self.max_count, device=self.device)  # [Kmax]
            valid = j[None, :] < self.counts[:, None]  # [B, Kmax]
            src = (self.offsets[:-1, None] + j[None, :]).clamp_max(max(self.num_active - 1, 0))
            if self.num_active == 0:
                padded = torch.full((b, self.max_count), -1, dtype=torch.int64, device=self.device)
            else:
                padded = torch.where(valid, self.index[src], -1)
            object.__setattr__(self, "padded_map", padded)
        return self.padded_map

    @property
    def valid(self) -> Tensor:
        """[B, Kmax] bool, True where the padded layout holds a real row."""
        return self.padded_index >= 0

    @property
    def positions(self) -> Tensor:
        """[B, Kmax] int64 original position `t` of each kept token (0 on padding). Built on
        each use (one small kernel): a cached_property takes a lock torch.compile cannot
        trace (Python < 3.12)."""
        per_sample = max(self.num_rows // max(len(self.counts), 1), 1)
        # flat row b * T + t -> t; padding (-1) -> 0
        return self.padded_index.clamp_min(0) % per_sample
