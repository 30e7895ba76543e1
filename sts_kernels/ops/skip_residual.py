"""skip_residual: out = x + gate * delta on the active rows, out = x elsewhere."""

from __future__ import annotations

from torch import Tensor

from .. import _checks, reference
from .._backend import select
from .._types import RoutePlan


def skip_residual(
    x: Tensor,
    delta: Tensor,
    plan: RoutePlan,
    gate: Tensor | None = None,
    stats: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Skip-gated residual (STS_SPEC.md §2); with `stats`, also per-row cos(x, out) in fp32."""
    _checks.skip_residual(x, delta, plan, gate)
    select("skip_residual", x.device, ())
    return reference.skip_residual(x, delta, plan, gate, stats)
