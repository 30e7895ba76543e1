"""VisualTokenCompressor: shrinks the projector's visual tokens before the language model."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks
from ..ops import bipartite_merge, token_pool

MODES = ("pool", "merge")


class CompressedTokens(NamedTuple):
    x: Tensor  # [B, N_out, D]
    size: Tensor  # [B, N_out] fp32 original tokens per output token
    grid: tuple[int, int] | None  # output grid in pool mode, None in merge mode
    kept: Tensor  # [B] int64 tokens kept per sample (== N_out for all)


def _window_sums(size: Tensor, grid: tuple[int, int], window: tuple[int, int]) -> Tensor:
    """[B, H*W] -> [B, OH*OW]: the sum of `size` over every (edge-clipped) window."""
    (h, w), (kh, kw) = grid, window
    oh, ow = -(-h // kh), -(-w // kw)
    padded = F.pad(size.float().view(-1, h, w), (0, ow * kw - w, 0, oh * kh - h))
    return padded.view(-1, oh, kh, ow, kw).sum(dim=(2, 4)).reshape(-1, oh * ow)


class VisualTokenCompressor(nn.Module):
    """Compress visual tokens `[B, N, D]` by window pooling or bipartite merging.

    mode="pool": `token_pool(x, grid, window)`; `grid=(H, W)` is required and the output grid
      is returned. Output sizes are the window sums of the input sizes.
    mode="merge": `bipartite_merge` removes `r` tokens per call (the `r` argument of
      `forward`, else `self.r`, else `round(N * (1 - ratio))`), at most half of the
      unprotected tokens (STS_SPEC.md §1); the first `protected` tokens are never merged.
      `metric` (default `x`) chooses the pairs.

    Sizes carry across repeated calls: pass the previous call's `size` back in, and merges
    stay size-weighted and pooled sizes add up. In eval() the module is the identity unless
    `enabled_in_eval=True`.

    Every sample of a batch shares one grid and keeps the same number of tokens. Images with
    different grids (a list of grids): call the module once per image with `x[i:i+1]` of
    shape `[1, N_i, D]` and that image's grid, then concatenate as the model needs;
    `output_tokens(N_i, grid_i)` gives each image's output length without running it.
    """

    def __init__(
        self,
        mode: str = "pool",
        window: tuple[int, int] | int = (2, 2),
        ratio: float | None = 0.5,
        r: int | None = None,
        protected: int = 0,
        enabled_in_eval: bool = False,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.window = _checks.positive_pair("window", window)
        if ratio is not None and (
            isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1
        ):
            raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
        if mode == "merge" and ratio is None and r is None:
            raise ValueError("merge mode needs ratio or r, got neither")
        self.ratio = ratio
        self.r = None if r is None else self._check_r(r)
        if not isinstance(protected, int) or isinstance(protected, bool) or protected < 0:
            raise ValueError(f"protected must be an int >= 0, got {protected!r}")
        self.protected = protected
        self.enabled_in_eval = enabled_in_eval

    @staticmethod
    def _check_r(r: object) -> int:
        if not isinstance(r, int) or isinstance(r, bool):
            raise TypeError(f"r must be an int, got {type(r).__name__}")
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        return r

    @property
    def active(self) -> bool:
        """Whether forward compresses (always in training, in eval only if enabled)."""
        return self.training or self.enabled_in_eval

    def _merge_r(self, n: int, r: int | None) -> int:
        """Tokens the merge removes from an image of `n` tokens (after the spec's cap)."""
        if r is None:
            r = self.r if self.r is not None else round(n * (1 - self.ratio))
        return max(min(r, (n - self.protected) // 2), 0)

    def _grid(self, n: int, grid: object) -> tuple[int, int]:
        if grid is None:
            raise ValueError("grid (H, W) is required in pool mode, got None")
        h, w = _checks.positive_pair("grid", grid)
        if h * w != n:
            raise ValueError(f"grid {(h, w)} holds {h * w} tokens but N={n}")
        return h, w

    def output_tokens(self, n: int, grid: tuple[int, int] | None = None) -> int:
        """How many tokens an image of `n` tokens (and `grid` in pool mode) keeps."""
        if not self.active:
            return n
        if self.mode == "merge":
            return n - self._merge_r(n, None)
        (h, w), (kh, kw) = self._grid(n, grid), self.window
        return -(-h // kh) * -(-w // kw)

    def forward(
        self,
        x: Tensor,
        grid: tuple[int, int] | None = None,
        size: Tensor | None = None,
        metric: Tensor | None = None,
        r: int | None = None,
    ) -> CompressedTokens:
        _checks.tensor("x", x, ndim=3)
        b, n, _ = x.shape
        if r is not None:
            if self.mode != "merge":
                raise ValueError(f"r applies to merge mode only, this compressor pools (r={r})")
            self._check_r(r)
        if metric is not None and self.mode != "merge":
            raise ValueError("metric applies to merge mode only, this compressor pools")
        if size is not None:
            _checks.tensor("size", size, ndim=2)
            _checks.floating("size", size)
            _checks.shape("size", size, (b, n))
        if self.mode == "pool":
            grid = self._grid(n, grid)
        if size is None:
            size = torch.ones(b, n, dtype=torch.float32, device=x.device)

        if not self.active:
            out_x, out_size, out_grid = x, size.float(), grid if self.mode == "pool" else None
        elif self.mode == "pool":
            out_x = token_pool(x, grid, self.window)
            out_size = _window_sums(size, grid, self.window)
            kh, kw = self.window
            out_grid = (-(-grid[0] // kh), -(-grid[1] // kw))
        else:
            merged = bipartite_merge(x, self._merge_r(n, r), metric, size.float(), self.protected)
            out_x, out_size, out_grid = merged.x, merged.size, None
        kept = torch.full((b,), out_x.shape[1], dtype=torch.int64, device=x.device)
        return CompressedTokens(out_x, out_size, out_grid, kept)

    def extra_repr(self) -> str:
        how = f"window={self.window}" if self.mode == "pool" else f"ratio={self.ratio}, r={self.r}"
        return (
            f"mode={self.mode!r}, {how}, protected={self.protected}, "
            f"enabled_in_eval={self.enabled_in_eval}"
        )
