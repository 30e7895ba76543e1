"""token_pool: mean over non-overlapping windows of the visual-token grid."""

from __future__ import annotations

from torch import Tensor

from .. import _checks, reference
from .._backend import select


def token_pool(x: Tensor, grid: tuple[int, int], window: tuple[int, int] | int = (2, 2)) -> Tensor:
    """`[B, H*W, D]` -> `[B, ceil(H/kh)*ceil(W/kw), D]` window means (STS_SPEC.md §1)."""
    h, w, kh, kw = _checks.token_pool(x, grid, window)
    select("token_pool", x.device, ())
    return reference.token_pool(x, (h, w), (kh, kw))
