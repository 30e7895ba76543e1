"""route / gather_rows: sparse routing of the rows that run a layer."""

from __future__ import annotations

from torch import Tensor

from .. import _checks, reference
from .._backend import select
from .._types import RoutePlan


def route(mask: Tensor) -> RoutePlan:
    """Compact a bool mask (`[B]` samples or `[B, T]` tokens) into a `RoutePlan`."""
    _checks.mask(mask)
    select("route", mask.device, ())
    return reference.route(mask)


def gather_rows(x: Tensor, plan: RoutePlan, padded: bool = False) -> Tensor:
    """The plan's active rows of `x`: `[K, ...]`, or `[B, Kmax, ...]` with `padded=True`."""
    _checks.gather_rows(x, plan, padded)
    select("gather_rows", x.device, ())
    return reference.gather_rows(x, plan, padded)
