"""Layer Dynamic Skipper (STS_SPEC.md §2): per training step, each decoder layer runs only on
a subset of the rows (whole samples, or single tokens); the other rows pass through unchanged.

Per wrapped layer (`SkippableLayer`), in training:
  1. the skipper's policy draws a keep mask (`[B]` samples or `[B, T]` tokens) and a gate
     (or they were drawn for every layer before the forward, `plan_step`, which lets
     torch.compile trace the decoder without a graph break),
  2. `route(mask)` compacts it into a plan; `gather_for_layer` (`ops.skip_glue`) picks the K
     kept rows and returns the `combine` of step 4,
  3. the layer runs on `[K, T, D]` (sample mode) or the padded `[B, Kmax, D]` (token mode),
  4. `combine(y, gate)`, i.e. `skip_residual(x, y, plan, gate, from_output=True)`, writes `x`
     for skipped rows and `x + gate * (y - x)` for kept ones in one pass (HF decoder layers
     return y = x + f(x)).
The layer therefore sees only kept rows in forward and backward, which is where the savings
come from. The glue costs <= 6 kernels forward and <= 10 forward+backward per layer, with one
host read (route's K and Kmax): no `y - x` pass, and the gather and the combine's input `x`
are one autograd node whose backward adds the rows' gradient into skip_residual's freshly
allocated grad_x in place (K rows): no zero-filled R rows and no second R-row gradient for
autograd to add (`ops.skip_glue`, where the rule that makes this safe lives).

Policies:
  schedule    skip probability rising linearly with depth: the j-th of n eligible layers skips
              with p = p_max * j / n; kept rows get gate 1 / (1 - p) (stochastic depth).
  router      a `Linear(D, 1)` per eligible layer scores the mean-pooled sample (sample mode) or
              each token (token mode); the top round(capacity * rows) run. Straight-through
              gate s - s.detach() + 1, s = sigmoid(score): forward value 1, so a kept row runs
              as in the dense eval (up to an ulp: x + 1 * (y - x) against y), while the
              loss still trains the router through
              sigmoid' (Mixture-of-Depths scales the update by the router weight instead, which
              would make training differ from STS's dense inference).
  importance  skip probabilities from a bias-corrected EMA of each layer's measured change
              `1 - cos(x, out)` (from skip_residual(stats=True), measured with the gate applied),
              proportional to 1 / change and normalised so their mean over eligible layers is
              `target_skip` (capped at MAX_SKIP), recomputed once per pass at the first
              eligible layer; gate 1 / (1 - p).
With `keep_first_last`, the first and last layer always run densely. In eval() every layer
runs densely and exactly as the unwrapped layer.

Limitations: random decisions come from the skipper's own generator, so activation
checkpointing that re-runs a `SkippableLayer`'s forward would redraw them: checkpoint inside
it (Hugging Face's gradient checkpointing does: it wraps the layer's own forward, which the
skipper calls on the kept rows), not around it.
A layer skipped for every row is not called: it returns `output_setter(None, hidden_states)`
(the bare hidden states by default), joined to the graph
of the layer's parameters (and router) so each gets an exact zero gradient: DDP needs no
`find_unused_parameters=True`. Under DeepSpeed ZeRO-3 (parameters tagged `ds_id`) such a
layer runs on one sample with a zero output gradient instead, so that ZeRO-3 gathers its
parameters on every rank. Under FSDP2 the `SkippableLayer` (called on every rank) must be the
sharded unit, not the layer it wraps. Gates are in the activations' dtype (fp32 at least).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch._dynamo.decorators import mark_unbacked

from .._types import RoutePlan
from ..ops import route
from .skip_layer import ArgsKwargs, LayerStep, SkippableLayer, hidden_of, slice_samples, with_hidden

MODES = ("sample", "token")
POLICIES = ("schedule", "router", "importance")
MAX_SKIP = 0.9  # highest skip probability of a random policy: bounds the gate 1 / keep_prob


@dataclass
class SkipReport:
    """What the last training forward ran, per layer."""

    rows_run: list[int] = field(default_factory=list)  # rows that ran each layer
    rows_total: list[int] = field(default_factory=list)  # rows each layer would run densely
    keep_masks: list[Tensor | None] = field(default_factory=list)  # None: ran densely, no gate
    gates: list[Tensor | None] = field(default_factory=list)  # [K] gate of the rows that ran

    @property
    def executed_fraction(self) -> float:
        """sum(rows_run) / sum(rows_total): the fraction of the dense layer FLOPs spent."""
        total = sum(self.rows_total)
        return sum(self.rows_run) / total if total else 1.0


class LayerDynamicSkipper(nn.Module):
    """Wraps decoder `layers` into `SkippableLayer`s (see the module docstring)."""

    def __init__(
        self,
        layers: nn.ModuleList,
        hidden_size: int,
        mode: str = "sample",
        policy: str = "schedule",
        p_max: float = 0.5,
        capacity: float = 0.5,
        target_skip: float = 0.5,
        ema: float = 0.9,
        keep_first_last: bool = True,
        seed: int | None = None,
        arg_slicer: Callable[[tuple, dict, RoutePlan], ArgsKwargs] | None = None,
        token_arg_builder: Callable[[tuple, dict, RoutePlan], ArgsKwargs] | None = None,
        output_getter: Callable[[object], Tensor] | None = None,
        output_setter: Callable[[object, Tensor], object] | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        for name, value, high in (
            ("p_max", p_max, MAX_SKIP),
            ("capacity", capacity, 1.0),
            ("target_skip", target_skip, MAX_SKIP),
            ("ema", ema, 1.0),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number in [0, {high}], got {value!r}")
            if not 0.0 <= value <= high:
                raise ValueError(f"{name} must be in [0, {high}], got {value}")
        self.mode, self.policy = mode, policy
        self.p_max, self.capacity, self.target_skip, self.ema = p_max, capacity, target_skip, ema
        self.seed = seed
        self.arg_slicer = arg_slicer or slice_samples
        self.token_arg_builder = token_arg_builder
        self.output_getter = output_getter or hidden_of
        self.output_setter = output_setter or with_hidden

        self.layers = nn.ModuleList(
            SkippableLayer(layer, self, i) for i, layer in enumerate(layers)
        )
        n = len(self.layers)
        firm = {0, n - 1} if keep_first_last else set()
        self.eligible = [i for i in range(n) if i not in firm]
        if policy == "router":
            self.routers = nn.ModuleDict({str(i): nn.Linear(hidden_size, 1) for i in self.eligible})
        # importance: EMA of 1 - cos per layer and how many updates it has had (bias correction)
        self.register_buffer("change_ema", torch.zeros(n))
        self.register_buffer("change_updates", torch.zeros(n))
        self._generators: dict[torch.device, torch.Generator] = {}
        self._pass_probabilities: Tensor | None = None  # importance: this pass's [L] probs
        self._steps: list[LayerStep | None] | None = None  # drawn ahead (`plan_step`)
        # sample mode on packed rows (`plan_step(segments=...)`): [B, T] packed sample of every
        # token and how many there are; decisions are then per packed sample
        self._segments: tuple[Tensor, int] | None = None
        self.report = SkipReport([0] * n, [0] * n, [None] * n, [None] * n)

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        """All layers in order, each fed the previous one's hidden states; returns the last."""
        for layer in self.layers:
            hidden_states = self.output_getter(layer(hidden_states, *args, **kwargs))
        return hidden_states

    # ---- decisions ------------------------------------------------------------------------

    def skip_probabilities(self) -> Tensor:
        """[L] fp32 current skip probability of every layer (router: 1 - capacity), on the
        buffers' device."""
        probs = torch.zeros(len(self.layers), device=self.change_ema.device)
        if not self.eligible:
            return probs
        idx = torch.tensor(self.eligible, dtype=torch.long, device=probs.device)
        if self.policy == "importance":
            return probs.index_copy(0, idx, self._importance_probabilities(idx))
        if self.policy == "router":
            return probs.index_fill(0, idx, 1.0 - self.capacity)
        schedule = [self._schedule_p(i) for i in self.eligible]  # host ints: no device reads
        return probs.index_copy(0, idx, probs.new_tensor(schedule))

    def _schedule_p(self, idx: int) -> float:
        """p_max * j / n for the j-th (1-based) of the n eligible layers."""
        return self.p_max * (self.eligible.index(idx) + 1) / len(self.eligible)

    def _importance_probabilities(self, idx: Tensor) -> Tensor:
        """Probabilities proportional to 1 / measured change, mean `target_skip`, <= MAX_SKIP.
        Device tensors throughout: no host synchronisation."""
        updates = self.change_updates[idx]
        measured = (updates > 0).float()
        change = self.change_ema[idx] / (1 - self.ema**updates).clamp_min(1e-12)
        # unmeasured layers count as average ones (none measured: uniform)
        mean_change = (change * measured).sum() / measured.sum().clamp_min(1)
        weight = 1.0 / (torch.where(measured > 0, change, mean_change) + 1e-6)
        budget = self.target_skip * len(idx)
        probs = torch.zeros_like(weight)
        free = torch.ones_like(weight)  # 1.0 where a layer is below the cap
        # water-filling: share the budget by weight, cap, hand the excess to uncapped layers
        for _ in range(len(idx)):
            left = budget - (probs * (1 - free)).sum()
            share = left * weight * free / (weight * free).sum().clamp_min(1e-12)
            probs = torch.where(free > 0, share, probs).clamp_max(MAX_SKIP)
            free = free * (probs < MAX_SKIP).float()
        return probs

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def decide(
        self, idx: int, hidden_states: Tensor
    ) -> tuple[Tensor | None, Tensor | float | None]:
        """(keep mask `[B]` / `[B, T]`, gate), or (None, None) for a layer that runs densely
        without a gate. The gate is one value for every row (a float or a 0-d tensor) or a
        tensor in the mask's layout (router)."""
        if idx not in self.eligible:
            return None, None
        rows = self.rows_of(hidden_states)
        if self.mode == "token" and hidden_states.dim() < 3:
            raise ValueError(
                f"token mode needs hidden_states [B, T, D], got {tuple(hidden_states.shape)}"
            )
        device = hidden_states.device
        if self.policy == "router":
            return self._route_top_k(idx, hidden_states)
        if self.policy == "schedule":
            p = self._schedule_p(idx)
            if p == 0.0:
                return None, None
            gate = 1.0 / (1.0 - p)  # stochastic-depth rescale, the same for every row
        else:
            # importance: one set of probabilities per pass (refreshed at the first eligible
            # layer), so a step's layers share one distribution whose mean is the budget and
            # the water-filling runs once per step rather than once per layer
            if self._pass_probabilities is None or idx == self.eligible[0]:
                self._pass_probabilities = self.skip_probabilities()
            p = self._pass_probabilities[idx].to(device)
            gate = (1.0 - p).reciprocal()  # stochastic-depth rescale, a 0-d tensor
        draw = torch.rand(rows, generator=self._generator(device), device=device)
        return draw >= p, gate

    def _route_top_k(self, idx: int, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        router = self.routers[str(idx)]
        if self.mode == "sample" and self._segments is not None:  # mean over each packed sample
            segments, count = self._segments
            real = segments.reshape(-1) >= 0  # padding (-1) belongs to no sample
            flat = hidden_states.reshape(-1, hidden_states.shape[-1])[real]  # [tokens, D]
            ids = segments.reshape(-1)[real]
            sums = flat.new_zeros(count, flat.shape[1]).index_add_(0, ids, flat)
            sizes = torch.bincount(ids, minlength=count).clamp_min(1)
            scores = router(sums / sizes[:, None].to(flat.dtype)).squeeze(-1)  # [S]
        elif self.mode == "sample":
            pooled = hidden_states.reshape(hidden_states.shape[0], -1, hidden_states.shape[-1])
            scores = router(pooled.mean(dim=1)).squeeze(-1)  # [B]
        else:
            scores = router(hidden_states).squeeze(-1)  # [B, T]
        # at least one row for any capacity > 0: with B = 1, round(0.5) = 0 would skip the
        # layer on every step and the router would never get a gradient
        num_keep = max(round(self.capacity * scores.shape[-1]), int(self.capacity > 0))
        top = scores.topk(num_keep, dim=-1).indices
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
        # straight-through gate: forward value exactly 1 (what eval runs: a kept row's output
        # is the layer's), backward d gate / d score = sigmoid' (the router still learns)
        s = torch.sigmoid(scores)
        return keep, s - s.detach() + 1.0

    def rows_of(self, hidden_states: Tensor) -> tuple[int, ...]:
        """The rows a decision is made for: `(B,)` samples (`(S,)` packed samples) or `(B, T)`
        tokens."""
        if self.mode == "sample" and self._segments is not None:
            return (self._segments[1],)
        return tuple(hidden_states.shape[: 1 if self.mode == "sample" else 2])

    def layout_of(self, hidden_states: Tensor) -> tuple[int, ...]:
        """The shape of a plan for these hidden states: `(B,)`, or `(B, T)` in token mode and
        for packed samples (each sample's tokens kept or skipped together)."""
        packed = self.mode == "sample" and self._segments is not None
        return tuple(hidden_states.shape[: 1 if self.mode == "sample" and not packed else 2])

    def layer_step(self, idx: int, hidden_states: Tensor) -> LayerStep:
        """Layer `idx`'s decision for this step (`decide`, `route`, the gate), recorded in the
        report."""
        keep, gate_of_rows = self.decide(idx, hidden_states)
        if keep is None:  # an always-dense layer
            self.record(idx, None, None, hidden_states)
            return LayerStep(None)
        if self.mode == "sample" and self._segments is not None:  # packed: to every token
            segments = self._segments[0]
            run = int(keep.sum())
            keep = keep[segments.clamp_min(0)] & (segments >= 0)  # [B, T]; padding never runs
            if isinstance(gate_of_rows, Tensor) and gate_of_rows.dim() == 1:
                gate_of_rows = gate_of_rows[segments.clamp_min(0)]
        plan = route(keep)
        gate = self.gate_of_plan(gate_of_rows, plan, hidden_states.dtype)  # [K]
        if self.mode == "token" or self._segments is None:
            run = plan.num_active
        self.record(idx, keep, gate, hidden_states, run)
        return LayerStep(plan, gate)

    @torch.compiler.disable
    def plan_step(
        self,
        shape: tuple[int, ...],
        device: torch.device,
        dtype: torch.dtype,
        segments: Tensor | None = None,
    ) -> None:
        """Draw this step's decisions for every layer before the forward runs them: the same
        draws, in the same order from the same generator, as the layers would make one by
        one, for hidden states `[*shape, D]` (`shape`: `(B, T)`). A compiled model then has no
        graph break inside its decoder: each plan's sizes are unbacked graph inputs, and a
        layer no row runs is one row at gate 0. The router policy scores each layer's input
        and so still decides layer by layer. Used by the Hugging Face patch (`apply_sts`), which
        drops them when the forward ends (`clear_plan`); a layer whose input is not
        `[*shape, D]` draws its own. `segments` [B, T] (packed rows: the packed sample of every
        token, numbered from 0 along the flattened batch): in sample mode each packed sample
        is kept or skipped as a whole (a token-layout plan) and the report counts samples; -1
        marks padding, which is no sample and never runs."""
        self._segments = None
        if segments is not None and self.mode == "sample":
            self._segments = (segments, int(segments.max()) + 1)
        if self.policy == "router":
            self._steps = None
            return
        probe = torch.empty((*shape, 0), device=device, dtype=dtype)  # shape and device only
        steps = [self.layer_step(i, probe) for i in range(len(self.layers))]
        ran = torch.ones(len(steps), device=device)  # one fill; views of it per layer
        for i, step in enumerate(steps):
            if step.plan is not None and step.plan.num_active == 0 < step.plan.num_rows:
                only_first = torch.zeros(step.plan.shape, dtype=torch.bool, device=device)
                only_first.view(-1)[0] = True
                step.plan, step.skip_all = route(only_first), True
                step.gate = torch.zeros(1, dtype=step.gate.dtype, device=device)
                ran[i] = 0.0
            if step.plan is not None:
                step.ran = ran[i]
                if step.gate.stride(0) != 1:  # expanded: a stride-0 input would be a guard
                    step.gate = step.gate.new_empty(step.gate.shape).copy_(step.gate)
                # K and Kmax change every step: never specialised
                mark_unbacked(step.plan.index, 0)
                mark_unbacked(step.gate, 0)
                if step.plan.padded_map is not None:
                    # Kmax is the layer's sequence length in token mode, which attention code
                    # compares with 1 (Hugging Face's SDPA path): a dynamic size with guards
                    torch._dynamo.maybe_mark_dynamic(step.plan.padded_map, 1)
        self._steps = steps

    def clear_plan(self) -> None:
        """Forget the decisions `plan_step` drew: later layer calls draw their own."""
        self._steps = None
        self._segments = None

    @staticmethod
    def gate_of_plan(gate: Tensor | float, plan: RoutePlan, dtype: torch.dtype) -> Tensor:
        """[K] gate of the plan's rows in the activations' dtype, fp32 at least (fp64 models
        get fp64 gates)."""
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        if isinstance(gate, float):
            return torch.full((plan.num_active,), gate, dtype=dtype, device=plan.device)
        if gate.dim() == 0:
            return gate.to(dtype).expand(plan.num_active)
        return gate.reshape(-1).index_select(0, plan.index).to(dtype)

    # ---- bookkeeping ----------------------------------------------------------------------

    def record(
        self,
        idx: int,
        keep: Tensor | None,
        gate: Tensor | None,
        hidden_states: Tensor,
        num_run: int | None = None,
    ) -> None:
        total = math.prod(self.rows_of(hidden_states))
        self.report.rows_total[idx] = total
        self.report.rows_run[idx] = total if num_run is None else num_run
        self.report.keep_masks[idx] = keep
        self.report.gates[idx] = None if gate is None else gate.detach()

    @torch.no_grad()
    def observe_change(self, idx: int, change: Tensor, weight: Tensor | None = None) -> None:
        """Fold one measurement of layer `idx`'s change `1 - cos(x, out)` into its EMA; a 0-d
        `weight` of 0.0 leaves both untouched (a measurement that did not happen)."""
        folded = self.ema * self.change_ema[idx] + (1 - self.ema) * change
        if weight is None:
            self.change_ema[idx] = folded
            self.change_updates[idx] += 1
        else:
            self.change_ema[idx] = torch.where(weight > 0, folded, self.change_ema[idx])
            self.change_updates[idx] += weight
