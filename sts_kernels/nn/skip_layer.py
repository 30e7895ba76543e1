"""One skipped decoder layer: `SkippableLayer` (what each wrapped layer runs in training, see
`skipper.py`'s docstring for the steps), its step decision `LayerStep`, and the default ways a
layer's arguments and outputs are cut and rebuilt (`slice_samples`, `hidden_of`,
`with_hidden`). The `LayerDynamicSkipper` that owns the layers draws the decisions."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._types import RoutePlan
from ..ops import route, skip_residual
from ..ops.skip_glue import gather_for_layer
from .layer_args import token_layer_args

POSITION_KWARGS = ("positions", "position_ids")

ArgsKwargs = tuple[tuple, dict]


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


class SkippableLayer(nn.Module):
    """Drop-in replacement for `layer` (same call signature and return type) that runs only
    the rows its skipper keeps in training, and exactly `layer` in eval."""

    def __init__(self, layer: nn.Module, skipper: nn.Module, idx: int):
        super().__init__()
        self.layer = layer
        self.idx = idx
        # a plain attribute, not a submodule: the skipper owns this layer, not the reverse
        object.__setattr__(self, "skipper", skipper)
        self._position_kwargs = _position_kwargs(layer)

    def extra_repr(self) -> str:
        return f"idx={self.idx}"

    def pass_positions(self, args: tuple, kwargs: dict, plan: RoutePlan) -> ArgsKwargs:
        """Default `token_arg_builder`. A rotary-embedding decoder layer (called with
        `position_embeddings`, Hugging Face's) gets `layer_args.token_layer_args`: rotary
        embeddings, position ids and the attention mask (or varlen arguments) cut to each
        sample's kept tokens. Any other layer: args pass through, and a `positions` /
        `position_ids` parameter receives the kept tokens' original positions `[B, Kmax]`
        (padding slots come after every kept token of a sample, so a causal mask over slots
        never attends to them)."""
        if "position_embeddings" in kwargs:
            return token_layer_args(args, kwargs, plan)
        return args, {**kwargs, **{name: plan.positions for name in self._position_kwargs}}

    @torch.compiler.disable
    def _decide_now(self, hidden_states: Tensor) -> LayerStep:
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
            step.plan is not None and step.plan.shape != self.skipper.layout_of(hidden_states)
        ):
            return self._decide_now(hidden_states)
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
        """The importance policy's measurement after a decision drawn now: eager, like `_decide_now`
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
            rows, call_args, call_kwargs = hidden_states, args, kwargs
            combine = functools.partial(skip_residual, hidden_states, plan=plan, from_output=True)
        else:
            # one op: the gather and the combine share x's gradient (ops.skip_glue)
            padded = len(plan.shape) == 2  # token mode, or packed samples
            rows, combine = gather_for_layer(
                hidden_states, plan, padded
            )  # [K, T, D] / [B, Kmax, D]
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
        combined = combine(y, gate=gate, stats=measure)
        if measure:
            combined, cos = combined
            # not again in a checkpointing recompute (inside the backward): one per forward
            if compiling or torch._C._current_graph_task_id() == -1:
                if ahead:  # traced: the decoder is one graph, the layer index a constant in it
                    skipper.observe_change(self.idx, 1.0 - cos.mean(), step.ran)
                else:
                    self._observe(cos)
        return skipper.output_setter(out, combined)
