"""Plain-PyTorch implementations of every op in STS_SPEC.md: the spec in code.

They are written for clarity, not speed (vectorised, no Python loops over tokens), are
differentiable exactly as the spec says, and serve as the CPU fallback and as the ground
truth the Triton/C++/CUDA kernels are tested against. Inputs are assumed valid: the public
ops in `sts_kernels` validate before dispatching here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks
from ._types import MergeResult, RoutePlan

__all__ = [
    "MergeResult",
    "RoutePlan",
    "token_pool",
    "bipartite_merge",
    "bipartite_match",
    "merge_index",
    "unmerge",
    "route",
    "gather_rows",
    "skip_residual",
]


def token_pool(x: Tensor, grid: tuple[int, int], window: tuple[int, int] = (2, 2)) -> Tensor:
    """Mean over non-overlapping `window`s of the row-major `grid`; edge windows average only
    the tokens inside the grid."""
    (h, w), (kh, kw) = grid, window
    b, _, d = x.shape
    oh, ow = -(-h // kh), -(-w // kw)
    acc = torch.promote_types(x.dtype, torch.float32)
    xs = x.to(acc).view(b, h, w, d)
    # zero-pad to whole windows; the divisor counts only real tokens
    xs = F.pad(xs, (0, 0, 0, ow * kw - w, 0, oh * kh - h))
    sums = xs.view(b, oh, kh, ow, kw, d).sum(dim=(2, 4))  # [B, oh, ow, D]
    rows = (torch.arange(oh, device=x.device) * kh).clamp_max(h)
    cols = (torch.arange(ow, device=x.device) * kw).clamp_max(w)
    count = ((h - rows).clamp_max(kh)[:, None] * (w - cols).clamp_max(kw)[None, :]).to(acc)
    return (sums / count[None, :, :, None]).reshape(b, oh * ow, d).to(x.dtype)


def _split(n: int, protected: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Positions of the unprotected sources (even n) and destinations (odd n)."""
    pos = torch.arange(protected, n, device=device)
    return pos[pos % 2 == 0], pos[pos % 2 == 1]


def bipartite_match(metric: Tensor, protected: int = 0) -> tuple[Tensor, Tensor]:
    """For every unprotected source: best cosine score and the index (into the destinations)
    of the lowest destination reaching it. Returns (best [B, |A|] fp32, dst [B, |A|] int64).

    A row whose fp32 squared norm is not finite (a NaN or Inf in it) scores 0 against every
    token, like a zero row: one deterministic rule on every backend, with no host sync."""
    src, dst = _split(metric.shape[1], protected, metric.device)
    m32 = metric.float()
    finite = torch.isfinite(m32.square().sum(-1))  # [B, N]
    m = F.normalize(m32, dim=-1, eps=1e-12)
    scores = m[:, src] @ m[:, dst].transpose(1, 2)  # [B, |A|, |Bd|]
    scores = scores.masked_fill(~(finite[:, src, None] & finite[:, None, dst]), 0.0)
    best = scores.amax(dim=-1)
    # argmax returns the first maximal index: ties go to the lowest destination
    return best, scores.argmax(dim=-1)


def bipartite_merge(
    x: Tensor,
    r: int,
    metric: Tensor | None = None,
    size: Tensor | None = None,
    protected: int = 0,
) -> MergeResult:
    """ToMe bipartite soft matching + size-weighted average (STS_SPEC.md §1)."""
    b, n, d = x.shape
    dev = x.device
    # sizes are counts, not parameters: no gradient flows to them
    size = torch.ones(b, n, dtype=torch.float32, device=dev) if size is None else size.detach()
    r = min(r, (n - protected) // 2)
    if r <= 0:
        return MergeResult(x, size, torch.arange(n, device=dev).expand(b, n))
    src, dst = _split(n, protected, dev)
    best, match = bipartite_match(x if metric is None else metric, protected)
    # the r best-scoring sources merge; a stable sort sends ties to the lower position
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices  # [B, |A|]
    merged, kept = order[:, :r], order[:, r:].sort(dim=-1).values
    merged_dst = match.gather(1, merged)  # [B, r] index into destinations

    # size-weighted sum into destinations, in fp32
    acc = torch.promote_types(x.dtype, torch.float32)
    w = size.to(acc)
    xw = x.to(acc) * w[..., None]
    xa, wa = xw[:, src], w[:, src]  # [B, |A|, D], [B, |A|]
    num = xw[:, dst].scatter_add(
        1,
        merged_dst[..., None].expand(-1, -1, d),
        xa.gather(1, merged[..., None].expand(-1, -1, d)),
    )
    den = w[:, dst].scatter_add(1, merged_dst, wa.gather(1, merged))
    x_dst = (num / den[..., None]).to(x.dtype)

    x_out = torch.cat(
        [x[:, :protected], x[:, src].gather(1, kept[..., None].expand(-1, -1, d)), x_dst], 1
    )
    size_out = torch.cat([size[:, :protected], size[:, src].gather(1, kept), den.to(size.dtype)], 1)

    return MergeResult(x_out, size_out, merge_index(best, match, n, protected, r))


def merge_index(best: Tensor, match: Tensor, n: int, protected: int, r: int) -> Tensor:
    """[B, N] int64 output position of every token, given the matching (`bipartite_match`)
    and `r` (already capped, > 0): protected tokens, then the kept sources in position order,
    then the destinations; a merged source goes to its destination's position."""
    b, na = best.shape
    dev = best.device
    src, dst = _split(n, protected, dev)
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices  # [B, |A|]
    merged, kept = order[:, :r], order[:, r:].sort(dim=-1).values
    base = protected + na - r  # output position of the first destination
    index = torch.empty(b, n, dtype=torch.int64, device=dev)
    index[:, :protected] = torch.arange(protected, device=dev)
    index[:, dst] = base + torch.arange(dst.numel(), device=dev)
    src_out = torch.empty(b, na, dtype=torch.int64, device=dev)
    src_out.scatter_(1, kept, (protected + torch.arange(na - r, device=dev)).expand(b, -1))
    src_out.scatter_(1, merged, base + match.gather(1, merged))
    index[:, src] = src_out
    return index


def unmerge(y: Tensor, index: Tensor) -> Tensor:
    """Every original token takes the value of the token it was merged into."""
    return y.gather(1, index[..., None].expand(-1, -1, y.shape[-1]))


def route(mask: Tensor) -> RoutePlan:
    """Compact a bool mask over rows into ascending flat row ids, counts and offsets."""
    counts = mask.reshape(mask.shape[0], math.prod(mask.shape[1:])).sum(dim=1)
    offsets = F.pad(counts.cumsum(0), (1, 0))
    index = mask.reshape(-1).nonzero().squeeze(1)
    return RoutePlan(index=index, counts=counts, offsets=offsets, shape=tuple(mask.shape))


def _check_index_range(plan: RoutePlan) -> None:
    """A hand-built plan's out-of-range row ids raise ValueError naming `plan.index` (the
    kernels skip such ids; index_select would raise an IndexError of its own). On the CPU,
    where reading the ids costs no sync; elsewhere `_checks.route_plan` does it under
    STS_DEBUG=1. Not while torch.compile traces (data-dependent)."""
    if plan.index.device.type == "cpu" and not torch.compiler.is_compiling():
        _checks.plan_index_range(plan)


def gather_rows(x: Tensor, plan: RoutePlan, padded: bool = False) -> Tensor:
    """Active rows of `x`: packed `[K, ...]`, or `[B, Kmax, ...]` with zeros past each count."""
    _check_index_range(plan)
    flat = x.reshape(plan.num_rows, *x.shape[len(plan.shape) :])
    if not padded:
        return flat.index_select(0, plan.index)
    rows = flat.index_select(0, plan.padded_index.clamp_min(0).reshape(-1))
    rows = rows.view(*plan.padded_index.shape, *flat.shape[1:])
    valid = plan.valid.view(*plan.valid.shape, *([1] * (flat.dim() - 1)))
    return torch.where(valid, rows, torch.zeros((), dtype=x.dtype, device=x.device))


def skip_residual(
    x: Tensor,
    delta: Tensor,
    plan: RoutePlan,
    gate: Tensor | None = None,
    stats: bool = False,
    from_output: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """`out = x`, plus `gate[k] * delta[k]` on active row `plan.index[k]`; fp32 arithmetic.
    With `from_output`, `delta` holds the layer's output `y` and the update is `y - x`.

    With `stats`, also the fp32 cosine between `x` and `out` of every active row (no grad).
    """
    _check_index_range(plan)
    feat = x.shape[len(plan.shape) :]
    if delta.dim() == len(feat) + 2 and len(plan.shape) == 2:  # padded [B, Kmax, ...]
        delta = delta[plan.valid]
    flat = x.reshape(plan.num_rows, *feat)
    acc = torch.promote_types(x.dtype, torch.float32)
    x_rows = flat.index_select(0, plan.index).to(acc)  # [K, ...]
    upd = delta.to(acc) - x_rows if from_output else delta.to(acc)
    if gate is not None:
        upd = upd * gate.to(acc).view(-1, *([1] * len(feat)))
    out_rows = x_rows + upd
    # only the active rows change: copy x once and overwrite them (index_add is far slower on CPU)
    result = flat.index_copy(0, plan.index, out_rows.to(x.dtype)).view(x.shape)
    if not stats:
        return result
    with torch.no_grad():
        xa = x_rows.float().reshape(plan.num_active, math.prod(feat))
        oa = out_rows.float().reshape(plan.num_active, math.prod(feat))
        cos = (xa * oa).sum(-1) / (xa.norm(dim=-1) * oa.norm(dim=-1)).clamp_min(1e-8)
    return result, cos
