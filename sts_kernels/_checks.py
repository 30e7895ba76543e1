"""Input validation shared by the public ops: every error names the argument, the expected
and the actual value, and is raised before any kernel runs."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

from ._types import RoutePlan

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(name: str, t: object, ndim: int | None = None, min_ndim: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    return t


def floating(name: str, t: Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float32, float16, bfloat16, float64), got {t.dtype}"
        )


def same_device(ref_name: str, ref: Tensor, **others: Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}"
            )


def shape(name: str, t: Tensor, expected: Sequence[int]) -> None:
    # sizes traced as unbacked (a RoutePlan's K under torch.compile) compare unknown: no guard
    if len(t.shape) != len(expected) or any(
        guard_or_false(n != e) for n, e in zip(t.shape, expected)
    ):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def positive_pair(name: str, value: object) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if value[0] <= 0 or value[1] <= 0:
        raise ValueError(f"{name} must be positive, got {tuple(value)}")
    return int(value[0]), int(value[1])


def token_pool(x: Tensor, grid: object, window: object) -> tuple[int, int, int, int]:
    """Returns (H, W, kh, kw)."""
    tensor("x", x, ndim=3)
    floating("x", x)
    h, w = positive_pair("grid", grid)
    if h * w != x.shape[1]:
        raise ValueError(
            f"grid {(h, w)} holds {h * w} tokens but x has N={x.shape[1]} (x: {tuple(x.shape)})"
        )
    kh, kw = positive_pair("window", window)
    return h, w, kh, kw


def bipartite_merge(
    x: Tensor, r: object, metric: Tensor | None, size: Tensor | None, protected: object
) -> None:
    tensor("x", x, ndim=3)
    floating("x", x)
    b, n, _ = x.shape
    if not isinstance(r, int) or isinstance(r, bool):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    if not isinstance(protected, int) or isinstance(protected, bool):
        raise TypeError(f"protected must be an int, got {type(protected).__name__}")
    if protected < 0 or (protected >= n and n > 0):
        raise ValueError(f"protected must be in [0, N={n}), got {protected}")
    if metric is not None:
        tensor("metric", metric, ndim=3)
        floating("metric", metric)
        if tuple(metric.shape[:2]) != (b, n):
            raise ValueError(f"metric must have shape [B={b}, N={n}, C], got {tuple(metric.shape)}")
    if size is not None:
        tensor("size", size, ndim=2)
        floating("size", size)
        shape("size", size, (b, n))
    same_device("x", x, metric=metric, size=size)


def unmerge(y: Tensor, index: Tensor) -> None:
    tensor("y", y, ndim=3)
    floating("y", y)
    tensor("index", index, ndim=2)
    if index.dtype != torch.int64:
        raise TypeError(f"index must be int64, got {index.dtype}")
    if index.shape[0] != y.shape[0]:
        raise ValueError(f"index must have shape [B={y.shape[0]}, N], got {tuple(index.shape)}")
    same_device("y", y, index=index)


def mask(m: Tensor) -> None:
    tensor("mask", m)
    if m.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {m.dtype}")
    if m.dim() not in (1, 2):
        raise ValueError(f"mask must be [B] or [B, T], got shape {tuple(m.shape)}")


def debug() -> bool:
    """STS_DEBUG=1: also run the checks that read device memory (a host sync on a GPU)."""
    return os.environ.get("STS_DEBUG", "0") == "1"


def route_plan(plan: RoutePlan) -> None:
    """A RoutePlan's structure (always; no device reads) and, under STS_DEBUG=1, its values:
    ids in range and ascending, offsets the cumulative counts, row_to_k the inverse of index."""
    if not (
        isinstance(plan.shape, tuple)
        and len(plan.shape) in (1, 2)
        and all(isinstance(n, int) and n >= 0 for n in plan.shape)
    ):
        raise ValueError(f"plan.shape must be (B,) or (B, T) of ints >= 0, got {plan.shape!r}")
    b, rows = plan.shape[0], plan.num_rows
    for name, expected in (("index", None), ("counts", (b,)), ("offsets", (b + 1,))):
        t = tensor(f"plan.{name}", getattr(plan, name), ndim=1)
        if t.dtype != torch.int64:
            raise ValueError(f"plan.{name} must be int64, got {t.dtype}")
        if expected is not None:
            shape(f"plan.{name}", t, expected)
        same_device("plan.index", plan.index, **{f"plan.{name}": t})
    if guard_or_false(plan.num_active > rows):
        raise ValueError(
            f"plan.index must have at most R={rows} entries (plan.shape={plan.shape}), "
            f"got {plan.num_active}"
        )
    if plan.row_map is not None:
        tensor("plan.row_map", plan.row_map, ndim=1)
        if plan.row_map.dtype != torch.int64:
            raise ValueError(f"plan.row_map must be int64, got {plan.row_map.dtype}")
        shape("plan.row_map", plan.row_map, (rows,))
        same_device("plan.index", plan.index, **{"plan.row_map": plan.row_map})
    if debug():
        _route_plan_values(plan)


def plan_index_range(plan: RoutePlan) -> None:
    """plan.index holds row ids in [0, R) (reads device memory)."""
    index = plan.index
    if index.numel() == 0:
        return
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= plan.num_rows:
        raise ValueError(
            f"plan.index must hold row ids in [0, {plan.num_rows}), got values in [{lo}, {hi}]"
        )


def _route_plan_values(plan: RoutePlan) -> None:
    """The value checks of `route_plan` (each reads device memory)."""
    index, k = plan.index, plan.num_active
    plan_index_range(plan)
    if k > 1 and not bool((index[1:] > index[:-1]).all()):
        raise ValueError("plan.index must be strictly ascending")
    per_sample = plan.num_rows // max(plan.shape[0], 1)
    expected_counts = torch.bincount(index // max(per_sample, 1), minlength=plan.shape[0])
    if k and not torch.equal(plan.counts, expected_counts[: plan.shape[0]]):
        raise ValueError(f"plan.counts must count index's rows per sample, got {plan.counts}")
    offsets = torch.nn.functional.pad(plan.counts.cumsum(0), (1, 0))
    if not torch.equal(plan.offsets, offsets):
        raise ValueError(f"plan.offsets must be [0, cumsum(counts)], got {plan.offsets}")
    if plan.row_map is not None:
        built = torch.full_like(plan.row_map, -1).index_copy_(
            0, index, torch.arange(k, device=index.device)
        )
        if not torch.equal(plan.row_map, built):
            raise ValueError("plan.row_map must be the inverse of plan.index (-1 elsewhere)")


def plan_for(name: str, t: Tensor, plan: object) -> None:
    """`t` holds rows laid out as `plan.shape` followed by feature dims."""
    if not isinstance(plan, RoutePlan):
        raise TypeError(
            f"plan must be a RoutePlan from sts_kernels.route, got {type(plan).__name__}"
        )
    route_plan(plan)
    if tuple(t.shape[: len(plan.shape)]) != plan.shape:
        raise ValueError(
            f"{name} must start with the mask's shape (plan.shape={plan.shape}), got {tuple(t.shape)}"
        )
    if plan.device != t.device:
        raise ValueError(f"plan is on {plan.device} but {name} is on {t.device}")


def gather_rows(x: Tensor, plan: object, padded: bool) -> None:
    tensor("x", x, min_ndim=1)
    plan_for("x", x, plan)
    if padded and len(plan.shape) != 2:
        raise ValueError(f"padded=True needs a [B, T] token mask, the plan's mask is {plan.shape}")


def skip_residual(x: Tensor, delta: Tensor, plan: object, gate: Tensor | None) -> bool:
    """Returns True when `delta` is in the padded layout [B, Kmax, ...]."""
    tensor("x", x, min_ndim=1)
    floating("x", x)
    tensor("delta", delta)
    floating("delta", delta)
    plan_for("x", x, plan)
    same_device("x", x, delta=delta, gate=gate)
    feat = tuple(x.shape[len(plan.shape) :])
    packed = (plan.num_active, *feat)
    is_padded = len(plan.shape) == 2 and delta.dim() == len(feat) + 2
    if is_padded:
        shape("delta", delta, (plan.shape[0], plan.max_count, *feat))
    else:
        shape("delta", delta, packed)
    if delta.dtype != x.dtype:
        raise TypeError(f"delta must have x's dtype {x.dtype}, got {delta.dtype}")
    if gate is not None:
        tensor("gate", gate, ndim=1)
        floating("gate", gate)
        shape("gate", gate, (plan.num_active,))
    return is_padded
