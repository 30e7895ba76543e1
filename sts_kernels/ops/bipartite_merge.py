"""bipartite_merge / unmerge: ToMe bipartite soft matching with size-weighted averages."""

from __future__ import annotations

from torch import Tensor

from .. import _checks, reference
from .._backend import select
from .._types import MergeResult


def bipartite_merge(
    x: Tensor,
    r: int,
    metric: Tensor | None = None,
    size: Tensor | None = None,
    protected: int = 0,
) -> MergeResult:
    """Merge the `r` most redundant tokens of each sample (STS_SPEC.md §1)."""
    _checks.bipartite_merge(x, r, metric, size, protected)
    select("bipartite_merge", x.device, ())
    return reference.bipartite_merge(x, r, metric, size, protected)


def unmerge(y: Tensor, index: Tensor) -> Tensor:
    """`[B, N_out, D]` -> `[B, N, D]`: each original token gets its merged token's value."""
    _checks.unmerge(y, index)
    select("unmerge", y.device, ())
    return reference.unmerge(y, index)
