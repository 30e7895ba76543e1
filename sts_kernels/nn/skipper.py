"""Layer Dynamic Skipper (STS_SPEC.md §2): per training step, each decoder layer runs only on
a subset of the rows (whole samples, or single tokens); the other rows pass through unchanged.

Per wrapped layer (`SkippableLayer`), in training:
  1. the skipper's policy draws a keep mask (`[B]` samples or `[B, T]` tokens) and a gate
     (or they were drawn for every layer before the forward, `plan_step`, which lets
     torch.compile trace the decoder without a graph break),
  2. `route(mask)` compacts it into a plan; `gather_rows` picks the K kept rows,
  3. the layer runs on `[K, T, D]` (sample mode) or the padded `[B, Kmax, D]` (token mode),
  4. `skip_residual(x, y, plan, gate, from_output=True)` writes `x` for skipped rows and
     `x + gate * (y - x)` for kept ones in one pass (HF decoder layers return y = x + f(x)).
The layer therefore sees only kept rows in forward and backward, which is where the savings
come from. The glue costs <= 6 kernels forward and <= 10 forward+backward per layer, with one
host read (route's K and Kmax): no `y - x` pass, and the gather and skip_residual's input `x`
are one autograd node (`gather_rows_passthrough`) whose backward adds the rows' gradient into
skip_residual's freshly allocated grad_x in place (K rows): no zero-filled R rows and no
second R-row gradient for autograd to add.

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

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch._dynamo.decorators import mark_unbacked

from .._types import RoutePlan
from ..ops import gather_rows, route, skip_residual
from ..ops.routing import gather_rows_passthrough
from ..ops.skip_residual import backend_for

MODES = ("sample", "token")
POLICIES = ("schedule", "router", "importance")
MAX_SKIP = 0.9  # highest skip probability of a random policy: bounds the gate 1 / keep_prob
POSITION_KWARGS = ("positions", "position_ids")

ArgsKwargs = tuple[tuple, dict]


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


@dataclass
class LayerStep:
    """One layer's decision for one step: what `SkippableLayer` runs."""

    plan: RoutePlan | None  # None: the layer runs densely, without a gate
    gate: Tensor | None = None  # [K] gate of the plan's rows
    # no row runs (drawn ahead only): `plan` / `gate` are then one row at gate 0, which a
    # compiled model runs (exact zero update and gradients) instead of branching on K
    skip_all: bool = False
    # drawn ahead: 0-d 1.0, or 0.0 for the one-row stand-in, whose change the importance
    # policy must not measure (a tensor, so a compiled model does not branch on it)
    ran: Tensor | None = None


def slice_samples(args: tuple, kwargs: dict, plan: RoutePlan) -> ArgsKwargs:
    """Default `arg_slicer` (sample mode): every tensor whose dim 0 is B, also inside tuples
    and lists, keeps the plan's samples; anything else (e.g. a broadcast dim 0 of 1) passes."""
    batch = plan.shape[0]

    def cut(value):
        if isinstance(value, Tensor):
            return value.index_select(0, plan.index) if value.shape[:1] == (batch,) else value
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple
            return type(value)(*(cut(v) for v in value))
        if isinstance(value, (tuple, list)):
            return type(value)(cut(v) for v in value)
        return value

    return cut(args), {name: cut(v) for name, v in kwargs.items()}


def hidden_of(out) -> Tensor:
    """Default `output_getter`: a Tensor, or the first element of a tuple/list."""
    return out if isinstance(out, Tensor) else out[0]


def with_hidden(out, hidden: Tensor):
    """Default `output_setter`: `hidden` in place of what `hidden_of` read."""
    if out is None or isinstance(out, Tensor):
        return hidden
    return type(out)((hidden, *out[1:]))


def _position_kwargs(layer: nn.Module) -> tuple[str, ...]:
    params = inspect.signature(layer.forward).parameters
    return tuple(name for name in POSITION_KWARGS if name in params)


class _JoinGraph(torch.autograd.Function):
    """`hidden` unchanged (a view, no copy), with `tensors` as inputs whose gradient is zero:
    a layer skipped for every row still gives each parameter a (zero) gradient, so DDP with
    `find_unused_parameters=False` sees every parameter used on every rank."""

    @staticmethod
    def forward(ctx, hidden: Tensor, *tensors: Tensor) -> Tensor:
        ctx.specs = [(t.shape, t.dtype, t.device) for t in tensors]  # no data kept
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: Tensor):
        zeros = (torch.zeros(shape, dtype=dtype, device=dev) for shape, dtype, dev in ctx.specs)
        return grad, *zeros


def _join_graph(
    hidden: Tensor, layer: nn.Module, gate: Tensor, run_one: Callable[[], Tensor]
) -> Tensor:
    """`hidden` joined to the graph of the layer's parameters and of the (empty) gate, so a
    router's parameters get their (zero) gradient too.

    DeepSpeed ZeRO-3 partitions parameters (it tags them `ds_id`) and gathers a module's only
    when the module is called, a collective that every rank must make in the same order; the
    partitioned ones have shape [0], so zeros of their shape are refused as gradients. There
    `run_one()` calls the layer on one sample (ZeRO-3's hooks gather and release its parameters
    as on the other ranks) and that output joins instead, with a zero gradient: the layer's own
    backward, with ZeRO-3's hooks gathering again, gives full-shape exact zero gradients. One
    sample, not zero: Hugging Face attention cannot reshape an empty batch (`view(..., -1, d)`)."""
    params = list(layer.parameters())
    partitioned = any(hasattr(p, "ds_id") for p in params)
    tensors = [run_one()] if partitioned else params  # the call even without grad
    tensors = [t for t in tensors if t.requires_grad]
    tensors += [gate] if gate.requires_grad else []
    if not tensors or not torch.is_grad_enabled():
        return hidden
    return _JoinGraph.apply(hidden, *tensors)


def _gather(x: Tensor, plan: RoutePlan, padded: bool) -> tuple[Tensor, Tensor]:
    """(rows, x_pass) for `skip_residual(x_pass, ...)`: one autograd node with an in-place
    backward where skip_residual's backward allocates grad_x (cpp / triton), else the plain
    gather and `x` itself (the reference backward may hand back grad_out as grad_x)."""
    if backend_for(x.device) == "reference":
        return gather_rows(x, plan, padded), x
    return gather_rows_passthrough(x, plan, padded)


class SkippableLayer(nn.Module):
    """Drop-in replacement for `layer` (same call signature and return type) that runs only
    the rows its skipper keeps in training, and exactly `layer` in eval."""

    def __init__(self, layer: nn.Module, skipper: LayerDynamicSkipper, idx: int):
        super().__init__()
        self.layer = layer
        self.idx = idx
        # a plain attribute, not a submodule: the skipper owns this layer, not the reverse
        object.__setattr__(self, "skipper", skipper)
        self._position_kwargs = _position_kwargs(layer)

    def extra_repr(self) -> str:
        return f"idx={self.idx}"

    def pass_positions(self, args: tuple, kwargs: dict, plan: RoutePlan) -> ArgsKwargs:
        """Default `token_arg_builder`. A Hugging Face decoder layer (called with
        `position_embeddings`) gets `integrations.hf.token_layer_args`: rotary embeddings,
        position ids and the attention mask cut to each sample's kept tokens. Any other layer:
        args pass through, and a `positions` / `position_ids` parameter receives the kept
        tokens' original positions `[B, Kmax]` (padding slots come after every kept token of a
        sample, so a causal mask over slots never attends to them)."""
        if "position_embeddings" in kwargs:
            from ..integrations.hf import token_layer_args  # transformers-free module

            return token_layer_args(args, kwargs, plan)
        return args, {**kwargs, **{name: plan.positions for name in self._position_kwargs}}

    @torch.compiler.disable
    def _plan(self, hidden_states: Tensor) -> LayerStep:
        """This step's decision for the layer, drawn now (when the skipper was not handed the
        step's decisions ahead, `LayerDynamicSkipper.plan_step`). Eager under torch.compile
        (its random draw and host counts): a graph break per layer."""
        step = self.skipper.layer_step(self.idx, hidden_states)
        if step.plan is not None:  # K (and Kmax) change every step: dynamic from the start
            for tensor, dim in ((step.plan.index, 0), (step.gate, 0), (step.plan.padded_map, 1)):
                if tensor is not None:
                    torch._dynamo.maybe_mark_dynamic(tensor, dim)
        return step

    def _step(self, hidden_states: Tensor) -> LayerStep:
        """The decision drawn ahead for this step (`plan_step`) when it fits these hidden
        states, else one drawn now. Traced under torch.compile: the plan's tensors are graph
        inputs with unbacked sizes (K, Kmax), so no branch here reads K."""
        steps = self.skipper._steps
        step = None if steps is None else steps[self.idx]
        if step is None or (
            step.plan is not None and step.plan.shape != self.skipper.rows_of(hidden_states)
        ):
            return self._plan(hidden_states)
        return step

    def _run_one_sample(self, hidden_states: Tensor, args: tuple, kwargs: dict) -> Tensor:
        """The layer's output on the batch's first sample alone (in token mode too), its
        per-sample arguments cut by the skipper's `arg_slicer`; detached from `hidden_states`
        (its gradient there would be zero)."""
        first = torch.zeros(hidden_states.shape[0], dtype=torch.bool, device=hidden_states.device)
        first[0] = True
        call_args, call_kwargs = self.skipper.arg_slicer(args, kwargs, route(first))
        rows = hidden_states[:1].detach()  # [1, T, D]
        # an input that needs a gradient, as a kept row's does: ZeRO-3 releases the layer's
        # parameters once the backward reaches the layer's inputs
        rows.requires_grad_(hidden_states.requires_grad)
        return self.skipper.output_getter(self.layer(rows, *call_args, **call_kwargs))

    @torch.compiler.disable
    def _observe(self, cos: Tensor) -> None:
        """The importance policy's measurement after a decision drawn now: eager, like `_plan`
        (traced, reading the layer index would make each layer's frame a recompile)."""
        self.skipper.observe_change(self.idx, 1.0 - cos.mean())

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        skipper = self.skipper
        if not self.training:
            return self.layer(hidden_states, *args, **kwargs)
        step = self._step(hidden_states)
        plan, gate = step.plan, step.gate
        if plan is None:
            return self.layer(hidden_states, *args, **kwargs)
        compiling = torch.compiler.is_compiling()
        ahead = step.ran is not None  # drawn ahead: K unbacked under torch.compile
        if compiling and ahead:  # one size for K: the gate's and the plan's are equal
            torch._check(gate.shape[0] == plan.num_active)
        elif step.skip_all or plan.num_active == 0:
            # nothing runs; the parameters still join the graph (DDP)
            run_one = functools.partial(self._run_one_sample, hidden_states, args, kwargs)
            joined = _join_graph(hidden_states, self.layer, gate, run_one)
            return skipper.output_setter(None, joined)
        # every row runs: no gather, but the gate still applies (under torch.compile the gather
        # path serves this case too, so K == R is not one more compiled variant)
        dense = not compiling and plan.num_active == plan.num_rows
        if dense:
            rows, x_pass, call_args, call_kwargs = hidden_states, hidden_states, args, kwargs
        else:
            # x_pass (= x) feeds only skip_residual, whose backward allocates grad_x: the
            # gather's backward adds the rows' gradient into it in place (one autograd node,
            # no zero-filled [R, ...] tensor and no R-row add)
            padded = skipper.mode == "token"
            rows, x_pass = _gather(hidden_states, plan, padded)  # [K, T, D] / [B, Kmax, D]
            if padded:
                builder = skipper.token_arg_builder or self.pass_positions
                call_args, call_kwargs = builder(args, kwargs, plan)
            else:
                call_args, call_kwargs = skipper.arg_slicer(args, kwargs, plan)
        out = self.layer(rows, *call_args, **call_kwargs)
        y = skipper.output_getter(out)
        if dense:  # packed layout of all rows
            y = y.reshape(plan.num_active, *hidden_states.shape[len(plan.shape) :])

        # x + gate * (y - x) on the kept rows in one pass: no separate delta = y - rows
        measure = skipper.policy == "importance"
        combined = skip_residual(x_pass, y, plan, gate, stats=measure, from_output=True)
        if measure:
            combined, cos = combined
            # not again in a checkpointing recompute (inside the backward): one per forward
            if compiling or torch._C._current_graph_task_id() == -1:
                if ahead:  # traced: the decoder is one graph, the layer index a constant in it
                    skipper.observe_change(self.idx, 1.0 - cos.mean(), step.ran)
                else:
                    self._observe(cos)
        return skipper.output_setter(out, combined)


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
        if self.mode == "sample":
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
        """The rows a decision is made for: `(B,)` samples or `(B, T)` tokens."""
        return tuple(hidden_states.shape[: 1 if self.mode == "sample" else 2])

    def layer_step(self, idx: int, hidden_states: Tensor) -> LayerStep:
        """Layer `idx`'s decision for this step (`decide`, `route`, the gate), recorded in the
        report."""
        keep, gate_of_rows = self.decide(idx, hidden_states)
        if keep is None:  # an always-dense layer
            self.record(idx, None, None, hidden_states)
            return LayerStep(None)
        plan = route(keep)
        gate = self.gate_of_plan(gate_of_rows, plan, hidden_states.dtype)  # [K]
        self.record(idx, keep, gate, hidden_states, plan.num_active)
        return LayerStep(plan, gate)

    @torch.compiler.disable
    def plan_step(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> None:
        """Draw this step's decisions for every layer before the forward runs them: the same
        draws, in the same order from the same generator, as the layers would make one by
        one, for hidden states `[*shape, D]` (`shape`: `(B, T)`). A compiled model then has no
        graph break inside its decoder: each plan's sizes are unbacked graph inputs, and a
        layer no row runs is one row at gate 0. The router policy scores each layer's input
        and so still decides layer by layer. Used by the Hugging Face patch (`apply_sts`), which
        drops them when the forward ends (`_steps = None`); a layer whose input is not
        `[*shape, D]` draws its own."""
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
