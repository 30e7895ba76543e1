"""VisualTokenCompressor: shrinks the projector's visual tokens before the language model."""

from __future__ import annotations

from collections.abc import Sequence
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
    # merge mode: [B, N_out] int64 the input token each output token stands at (the
    # destination its sources merged into, or itself); None in pool mode
    anchors: Tensor | None = None


def _window_sums(size: Tensor, grid: tuple[int, int], window: tuple[int, int]) -> Tensor:
    """[B, H*W] -> [B, OH*OW]: the sum of `size` over every (edge-clipped) window."""
    (h, w), (kh, kw) = grid, window
    oh, ow = -(-h // kh), -(-w // kw)
    padded = F.pad(size.float().view(-1, h, w), (0, ow * kw - w, 0, oh * kh - h))
    return padded.view(-1, oh, kh, ow, kw).sum(dim=(2, 4)).reshape(-1, oh * ow)


def merge_anchors(index: Tensor, n_out: int, protected: int) -> Tensor:
    """[B, N_out] the input token every merged output token stands at: the destination its
    sources merged into (STS_SPEC §1: destinations are the odd unprotected positions), or the
    token itself when nothing merged into it. `index` [B, N]: output slot of every input."""
    b, n = index.shape
    pos = torch.arange(n, device=index.device)
    first_dst = protected + 1 - protected % 2
    is_anchor = (pos < protected) | ((pos >= first_dst) & ((pos - first_dst) % 2 == 0))
    key = pos + is_anchor.long() * (n + 1)  # destinations outrank the sources merged into them
    best = torch.full((b, n_out), -1, dtype=torch.long, device=index.device)
    best.scatter_reduce_(1, index, key.expand(b, n), reduce="amax")
    return best % (n + 1)


def _frames_of(parts: list[Tensor]) -> Tensor:
    """The frames of a group's items `[F_i, N, D]` in one batch `[sum F_i, N, D]`."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


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

    Every sample of a batch shares one grid and keeps the same number of tokens. Images (and
    videos) with different grids: `compress_many` groups them by shape and runs one call per
    distinct grid, never one per image; `output_tokens(N_i, grid_i)` gives an image's output
    length without running it. `time_window=k` (pool mode) also averages each video's
    consecutive frames in windows of `k` in `compress_many`.
    """

    def __init__(
        self,
        mode: str = "pool",
        window: tuple[int, int] | int = (2, 2),
        ratio: float | None = 0.5,
        r: int | None = None,
        protected: int = 0,
        enabled_in_eval: bool = False,
        time_window: int = 1,
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
        if not isinstance(time_window, int) or isinstance(time_window, bool) or time_window < 1:
            raise ValueError(f"time_window must be an int >= 1, got {time_window!r}")
        if time_window > 1 and mode != "pool":
            # merged tokens of consecutive frames do not correspond: nothing to average
            raise ValueError(f"time_window > 1 needs mode='pool', got mode={mode!r}")
        self.time_window = time_window

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
        if self.active and (self.window[0] > h or self.window[1] > w):
            raise ValueError(
                f"window {self.window} is larger than the grid {(h, w)}: every image would "
                "pool to one token; use a window no larger than the grid"
            )
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
            anchors = merge_anchors(merged.index, out_x.shape[1], self.protected)
        kept = torch.full((b,), out_x.shape[1], dtype=torch.int64, device=x.device)
        if self.mode == "merge" and self.active:
            return CompressedTokens(out_x, out_size, out_grid, kept, anchors)
        return CompressedTokens(out_x, out_size, out_grid, kept)

    def compress_many(
        self,
        xs: Sequence[Tensor],
        grids: Sequence[tuple[int, int] | None],
        metrics: Sequence[Tensor] | None = None,
    ) -> list[CompressedTokens]:
        """Compress several images or videos with one call per distinct shape.

        `xs[i]`: `[F_i, N_i, D]`, the `F_i` frames of item `i` (1 for an image) on `grids[i]`
        (ignored in merge mode). Items of the same grid (merge mode: the same `N`) are
        concatenated along the frame axis and go through ONE `token_pool` / `bipartite_merge`
        call, so the launches grow with the distinct grids, not with the images. With
        `time_window=k` the frames of each item are then averaged in windows of `k` consecutive
        frames (one more pooling call per group; items then also group by `F_i`).
        `metrics[i]` (merge mode): `[F_i, N_i, C]` (one `C` for all items), what chooses the
        pairs of item `i` (concatenated per group like `xs`, forward's `metric`). The pairs depend on the metric
        alone, so merging other features of the same tokens (DeepStack levels) with the main
        features as metric merges them exactly like the main tokens.
        Returns one `CompressedTokens` per item: x `[F_i', N_i', D]`, size `[F_i', N_i']`.
        """
        if len(xs) != len(grids):
            raise ValueError(
                f"xs and grids must have the same length, got {len(xs)} and {len(grids)}"
            )
        groups: dict[tuple, list[int]] = {}
        for i, (x, grid) in enumerate(zip(xs, grids)):
            _checks.tensor(f"xs[{i}]", x, ndim=3)
            n = x.shape[1]
            shape = n if self.mode == "merge" else self._grid(n, grid)
            frames = x.shape[0] if self.time_window > 1 else 0
            groups.setdefault((shape, frames), []).append(i)
        if metrics is not None:
            self._check_metrics(xs, metrics)
        out: list[CompressedTokens | None] = [None] * len(xs)
        for (shape, _), members in groups.items():
            parts = [xs[i] for i in members]
            metric = None if metrics is None else _frames_of([metrics[i] for i in members])
            res = self(
                _frames_of(parts), grid=None if self.mode == "merge" else shape, metric=metric
            )
            frames = [x.shape[0] for x in parts]  # all equal when time_window > 1
            if self.time_window > 1 and frames[0] > 1 and self.active:
                res = self._pool_frames(res, len(parts), frames[0])
                frames = [res.x.shape[0] // len(parts)] * len(parts)
            xs_out, sizes, kept = (t.split(frames) for t in (res.x, res.size, res.kept))
            anchors = res.anchors.split(frames) if res.anchors is not None else [None] * len(frames)
            for i, x, size, k, a in zip(members, xs_out, sizes, kept, anchors):
                out[i] = CompressedTokens(x, size, res.grid, k, a)
        return out

    def _check_metrics(self, xs: Sequence[Tensor], metrics: Sequence[Tensor]) -> None:
        """ValueError naming `metrics` unless merge mode and one `[F_i, N_i, C]` per item."""
        if self.mode != "merge":
            raise ValueError("metrics applies to merge mode only, this compressor pools")
        if len(metrics) != len(xs):
            raise ValueError(
                f"metrics must hold one tensor per item of xs ({len(xs)}), got {len(metrics)}"
            )
        for i, (x, metric) in enumerate(zip(xs, metrics)):
            _checks.tensor(f"metrics[{i}]", metric, ndim=3)
            c = metrics[0].shape[-1] if i else metric.shape[-1]  # one C: items share calls
            if metric.shape != (*x.shape[:2], c):
                raise ValueError(
                    f"metrics[{i}] must have shape ({x.shape[0]}, {x.shape[1]}, {c}) like "
                    f"xs[{i}], with the C of metrics[0], got {tuple(metric.shape)}"
                )

    def _pool_frames(self, res: CompressedTokens, items: int, frames: int) -> CompressedTokens:
        """[items * F, N, D] -> [items * ceil(F / time_window), N, D]: frame windows averaged,
        as a `token_pool` over each item's (F, N) grid with window (time_window, 1)."""
        n = res.x.shape[1]
        grid, window = (frames, n), (self.time_window, 1)
        x = token_pool(res.x.reshape(items, frames * n, -1), grid, window)
        size = _window_sums(res.size.reshape(items, frames * n), grid, window)
        x, size = x.reshape(-1, n, x.shape[-1]), size.reshape(-1, n)
        kept = torch.full((x.shape[0],), n, dtype=torch.int64, device=x.device)
        return CompressedTokens(x, size, res.grid, kept)

    def extra_repr(self) -> str:
        how = f"window={self.window}" if self.mode == "pool" else f"ratio={self.ratio}, r={self.r}"
        if self.time_window > 1:
            how += f", time_window={self.time_window}"
        return (
            f"mode={self.mode!r}, {how}, protected={self.protected}, "
            f"enabled_in_eval={self.enabled_in_eval}"
        )
