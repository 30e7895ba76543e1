"""One-call STS patch for Hugging Face VLMs (transformers 5.x); families in `adapters/`.

    handle = apply_sts(model, stage="align")      # VTC only; "instruct": LDS only; None: both
    loss = model(**batch).loss                     # the same batches as dense training
    handle.report.executed_fraction                # LM layer-FLOPs this step ran, vs dense
    handle.remove()                                # the model is exactly as before

What the patch does, on this instance only (no class is modified):

- VTC: a forward pre-hook on the model runs the vision tower and projector itself (through
  the family's adapter, `adapters/`), compresses the projected tokens of all images (and
  videos) with the `VisualTokenCompressor`, one call per distinct grid, and calls the model
  with `mm_encoder_outputs` instead of `pixel_values`. It removes the surplus image
  placeholders from `input_ids` (each image keeps its first `kept` placeholders), drops the
  same columns from `attention_mask`, `labels`, `mm_token_type_ids` and `position_ids`, and
  re-pads rows tightly on the side the batch was padded on. Llava positions are renumbered; Qwen2-VL M-RoPE positions are rebuilt by the model
  from the shrunk ids and the pooled grid (any `position_ids` passed in are dropped).
  Logits: a call with `labels` computes its loss inside on the shrunk sequence and returns
  the shrunk logits (no full-length copy); a call without `labels` (the Trainer with label
  smoothing or `compute_loss_func`, any loss outside the model) gets logits at the caller's
  length, zeros in the dropped placeholder columns (whose labels must be -100, as in LLaVA
  training). `handle.full_logits = True` expands always; `handle.shrink(x)` maps any [B, T]
  tensor of the caller to the shrunk layout.
- LDS: every decoder layer of `model.model.language_model.layers` keeps its module object,
  parameters and hooks; only its `forward` is replaced by an instance attribute that, in
  training, calls the skipper's `SkippableLayer` for that depth, which runs the original forward
  on the kept rows (samples, or tokens with their attention mask and rotary embeddings gathered).
  The decisions are drawn outside the layer's own forward, so activation checkpointing of
  the decoder layers re-runs only the kept rows with the same decisions. A skipper with
  parameters (policy="router") is attached as `model.sts_skipper`, so the optimizer, DDP and
  checkpoints see the routers (its keys appear in `state_dict()` while patched); otherwise
  nothing is attached and `state_dict()` keeps its keys. Caching is switched off in training.

In `eval()` (and with `handle.enabled = False`) the model runs exactly as unpatched, unless the
compressor was built with `enabled_in_eval=True`. `model.generate()` always runs unpatched (in
`train()` too): a KV cache needs every layer and the prompt's placeholders.

The patch lives on the instance as data: hooks and layer forwards are partials over the handle,
which the model holds (`sts_handle(model)`). `copy.deepcopy` (EMA / reference models) and
`torch.save` / `pickle` of the module therefore give an independent patched model bound to its
own layers; a stale handle's `remove()` is a no-op. `handle.last_inputs` is detached.
`handle.totals` sums the reports of all training forwards (`StsCallback` logs and resets them).

Distributed: call `apply_sts` before wrapping; give each rank its own skipper seed (seed +
rank). A layer that a rank skips for every row still joins the graph with zero gradients, so
`DistributedDataParallel(model)` works with its default flags (LLaVA's unused CLIP
post_layernorm must be frozen, as without the patch). FSDP2: `fully_shard` each decoder layer
(called on every rank; only its inner work is skipped), then the root, default flags. Both
give a single process's gradients (tests/test_ddp.py, tests/test_fsdp.py, patched LLaVA).

torch.compile: the pre-hook draws the skipper's decisions for every layer before the model
runs (`LayerDynamicSkipper.plan_step`, eager), so the decoder compiles as one graph with each
layer's K an unbacked size (the router policy, which scores each layer's input, decides layer
by layer: a graph break per layer); `shrink_placeholders` runs eagerly (its output length
depends on the data). Tested in tests/test_training_stacks.py.

Pass the skipper as a dict (or None) rather than a ready `LayerDynamicSkipper`: a ready one
wraps the real layers, so their module hooks (and `output_hidden_states` recorders) also see the
row-subset call.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import adapter_for, supported_models

__all__ = ["SUPPORTED_MODELS", "StsHandle", "StsReport", "apply_sts", "sts_handle"]

SUPPORTED_MODELS = supported_models()

# stage -> (VTC on by default, LDS on by default); STS compresses during modality alignment
# and skips layers during instruction tuning
_STAGES = {None: (True, True), "align": (True, False), "instruct": (False, True)}

_DEFAULT_COMPRESS = {"mode": "pool", "window": (2, 2)}
_DEFAULT_SKIP = {"mode": "sample", "policy": "schedule", "p_max": 0.5, "keep_first_last": True}

# the live patch of a model is a plain attribute of the model: deepcopy / pickle carry it (and
# every hook and layer forward, all bound to the handle rather than closures) to the copy
_HANDLE_ATTR = "_sts_handle"

# shrink_placeholders appends its column map here while a patch compresses (see _pre_hook)
# (a plain list rather than a ContextVar: torch.compile traces list appends, not ContextVars)
_COLUMN_MAPS: list[list[Tensor]] = []


@dataclass
class StsReport:
    """What the last forward fed the language model."""

    visual_tokens_in: int = 0  # visual tokens the projector produced
    visual_tokens_kept: int = 0  # visual tokens the LM received
    image_tokens_in: int = 0  # the same two counts for images only
    image_tokens_kept: int = 0
    video_tokens_in: int = 0  # and for videos only
    video_tokens_kept: int = 0
    lm_tokens_in: int = 0  # B * T of the batch as passed
    lm_tokens: int = 0  # B * T' the LM ran on (after placeholder removal)
    layer_fraction: float = 1.0  # skipper: rows run / rows a dense pass runs, over all layers
    rows_run: list[int] = field(default_factory=list)  # per layer, from the skipper
    rows_total: list[int] = field(default_factory=list)
    # [B, T'] column of the caller's batch each LM column came from (-1: re-padding); None when
    # the forward shrank nothing. Placeholders map to the last `kept` columns of their image so
    # that logits stay next to the text they predict.
    columns: Tensor | None = field(default=None, repr=False)

    @property
    def executed_fraction(self) -> float:
        """LM layer-FLOPs executed relative to the dense, unpatched forward of the same batch
        (layer cost taken as linear in tokens)."""
        tokens = self.lm_tokens / self.lm_tokens_in if self.lm_tokens_in else 1.0
        return tokens * self.layer_fraction


@dataclass
class StsTotals:
    """`StsReport`s summed over the training forwards since the last `reset()` (all
    micro-batches of a gradient-accumulation step alike); what `StsCallback` logs."""

    forwards: int = 0
    visual_tokens_in: int = 0
    visual_tokens_kept: int = 0
    lm_tokens_in: int = 0
    lm_tokens_executed: float = 0.0  # sum of lm_tokens_in * executed_fraction
    rows_run: int = 0  # decoder-layer rows run, over all layers
    rows_total: int = 0

    def add(self, report: StsReport) -> None:
        self.forwards += 1
        self.visual_tokens_in += report.visual_tokens_in
        self.visual_tokens_kept += report.visual_tokens_kept
        self.lm_tokens_in += report.lm_tokens_in
        self.lm_tokens_executed += report.lm_tokens_in * report.executed_fraction
        self.rows_run += sum(report.rows_run)
        self.rows_total += sum(report.rows_total)

    def merge(self, other: StsTotals) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def reset(self) -> None:
        self.__init__()

    @property
    def executed_fraction(self) -> float:
        """LM layer-FLOPs executed over these forwards relative to dense ones."""
        return self.lm_tokens_executed / self.lm_tokens_in if self.lm_tokens_in else 1.0


class StsHandle:
    """Returned by `apply_sts`: toggle with `enabled`, undo with `remove()`.

    A deepcopy (or pickle) of the patched model is patched too, by its own handle, bound to the
    copy's layers: `sts_handle(copy)`. `full_logits`: return logits at the caller's sequence
    length even when the model computed the loss from `labels` (by default only calls without
    `labels`, whose loss is computed outside the model, get them; see `shrink`).
    """

    def __init__(self, model: nn.Module, compressor: nn.Module | None, skipper: nn.Module | None):
        self.model = model
        self.compressor = compressor
        self.skipper = skipper
        self.enabled = True
        self.full_logits = False
        self.report = StsReport()
        # detached kwargs the model last ran on (without the vision features): no graph kept
        self.last_inputs: dict[str, Any] | None = None
        self.totals = StsTotals()  # summed over training forwards since the last reset
        self._layers: list[nn.Module] = []  # patched decoder layers and their previous
        self._previous: list[Any] = []  # instance-level forward (None: the class's)
        self._hooks: list[Any] = []  # RemovableHandles
        self._attached: list[str] = []  # modules set on the model (sts_compressor / sts_skipper)
        self._inside = False  # a patched forward is running the skipper's call
        self._generating = False  # generate() is running: the patch steps aside

    def remove(self) -> None:
        """Restore the model: same module objects, forwards, hooks and state_dict. A no-op for a
        handle that is no longer the model's live patch (removed, or replaced by a newer one)."""
        if self.model.__dict__.get(_HANDLE_ATTR) is not self:
            return
        for hook in self._hooks:
            hook.remove()
        for layer, previous in zip(self._layers, self._previous):
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous
        for name in self._attached:
            delattr(self.model, name)
        for name in ("generate", _HANDLE_ATTR):
            self.model.__dict__.pop(name, None)

    def shrink(self, x: Tensor, fill=-100) -> Tensor:
        """`x` [B, T, ...] laid out like the last forward's `input_ids`, in the LM's layout
        [B, T', ...] (what `labels` became inside the model; `fill` where rows were re-padded).
        For losses computed outside the model from the full-length logits' counterparts."""
        cols = self.report.columns
        if cols is None:
            return x
        if x.shape[:1] != cols.shape[:1]:
            raise ValueError(
                f"shrink: x must have the last forward's batch size {cols.shape[0]} as dim 0, "
                f"got shape {tuple(x.shape)}"
            )
        index = cols.clamp_min(0).view(*cols.shape, *([1] * (x.dim() - 2)))
        out = x.gather(1, index.expand(*cols.shape, *x.shape[2:]))
        pad = (cols < 0).view_as(index)
        return out.masked_fill(pad, fill)

    def __enter__(self) -> StsHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        parts = [type(self.model).__name__, f"enabled={self.enabled}"]
        parts.append(f"compressor={self.compressor!r}" if self.compressor is not None else "no VTC")
        parts.append("LDS" if self.skipper is not None else "no LDS")
        return f"StsHandle({', '.join(parts)})"


def apply_sts(
    model: nn.Module,
    compress: None | bool | dict | nn.Module = None,
    skip: None | bool | dict | nn.Module = None,
    stage: str | None = None,
) -> StsHandle:
    """Patch a Hugging Face VLM in place (`SUPPORTED_MODELS`; one adapter per family).

    `compress` / `skip`: `None` follows `stage` (None: both on, "align": VTC only, "instruct":
    LDS only); `False` off; a dict of constructor arguments (defaults: pool 2x2 / sample-mode
    schedule with p_max=0.5, keep_first_last); or a ready `VisualTokenCompressor` /
    `LayerDynamicSkipper` (the latter built on `model.model.language_model.layers`).
    Build DDP/FSDP wrappers after this call.
    """
    model = _peft_base(model) or model  # a PEFT wrapper: patch the HF model it holds
    adapter = adapter_for(model)
    if stage not in _STAGES:
        raise ValueError(f"stage must be None, 'align' or 'instruct', got {stage!r}")
    if sts_handle(model) is not None:
        raise RuntimeError("apply_sts: this model is already patched; call handle.remove() first")
    compress_default, skip_default = _STAGES[stage]
    layers = adapter.layers(model)

    # a family without VTC (Mllama) takes stage=None as LDS only; asked for VTC (compress=True,
    # stage="align") it refuses with the reason
    vtc_default = compress_default and (bool(adapter.modes) or stage == "align")
    compressor = _build_compressor(compress, vtc_default)
    if compressor is not None:
        adapter.check_compressor(compressor, model)
    skipper, layer_calls = _build_skipper(
        skip, skip_default, layers, adapter.hidden_size(model), adapter.skipper_arguments()
    )
    if skipper is not None:
        adapter.check_skipper(skipper)
    handle = StsHandle(model, compressor, skipper)
    weight = next(model.parameters())

    for name, module in (("sts_compressor", compressor), ("sts_skipper", skipper)):
        if module is None:
            continue
        # trainable parts (the router policy's Linear layers) must be model parameters for the
        # optimizer, DDP and checkpoints, in the model's dtype; parameter-free modules stay off
        # the model so its state_dict keeps its keys
        if _has_own_parameters(module, model):
            module.to(device=weight.device, dtype=weight.dtype)
            setattr(model, name, module)
            handle._attached.append(name)
        else:
            module.to(weight.device)
    if skipper is not None:
        handle._layers = list(layers)
        handle._previous = [layer.__dict__.get("forward") for layer in layers]
        handle._calls = layer_calls
        for i, layer in enumerate(layers):
            # partials of module-level functions, not closures: a deepcopy / pickle of the
            # model rebinds them to the copy's handle and layers
            layer.forward = functools.partial(_layer_forward, handle, i)

    pre = functools.partial(_pre_hook, handle, adapter)
    handle._hooks = [
        model.register_forward_pre_hook(pre, with_kwargs=True),
        model.register_forward_hook(functools.partial(_post_hook, handle)),
        # even when the forward raises: decisions drawn for it must not serve a later call
        model.register_forward_hook(functools.partial(_drop_steps, handle), always_call=True),
    ]
    model.generate = functools.partial(_generate, handle)
    model.__dict__[_HANDLE_ATTR] = handle
    return handle


def sts_handle(model: nn.Module) -> StsHandle | None:
    """The live patch of `model` (or of the module DDP / torch.compile / PEFT wrappers hold,
    nested too: DDP(PeftModel)), or None: how to reach the handle of a deepcopied or unpickled
    model."""
    pending, seen = [model], set()
    while pending:
        candidate = pending.pop(0)
        if not isinstance(candidate, nn.Module) or id(candidate) in seen:
            continue
        seen.add(id(candidate))
        if _HANDLE_ATTR in candidate.__dict__:
            return candidate.__dict__[_HANDLE_ATTR]
        wrapped = (getattr(candidate, "module", None), getattr(candidate, "_orig_mod", None))
        pending += [*wrapped, _peft_base(candidate)]
    return None


def _peft_base(model: nn.Module) -> nn.Module | None:
    """The model a `peft.PeftModel` wraps (its `get_base_model()`), else None."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else None


# ---------------------------------------------------------------------------------------------
# construction


def _build_compressor(compress, default_on: bool) -> nn.Module | None:
    from ..nn import VisualTokenCompressor

    if compress is False or (compress is None and not default_on):
        return None
    if isinstance(compress, VisualTokenCompressor):
        return compress
    if compress is None or compress is True:
        return VisualTokenCompressor(**_DEFAULT_COMPRESS)
    if isinstance(compress, dict):
        return VisualTokenCompressor(**{**_DEFAULT_COMPRESS, **compress})
    raise TypeError(
        "compress must be None, a bool, a dict of VisualTokenCompressor arguments or a "
        f"VisualTokenCompressor, got {type(compress).__name__}"
    )


def _unpatched_forward(layer: nn.Module, previous) -> Any:
    """The forward `layer` had before the patch: an instance-level one (e.g. accelerate's), or
    its class's."""
    return previous if previous is not None else type(layer).forward.__get__(layer)


class _LayerCall(nn.Module):
    """Stands in for a decoder layer inside the skipper: calls the layer's own forward, without
    going through the layer's `__call__` again (its hooks already ran on the outer call, and
    output recorders such as `output_hidden_states` must see only full-batch outputs)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not a submodule: no duplicate parameters
        self.previous = layer.__dict__.get("forward")

    def forward(self, *args, **kwargs):
        return _unpatched_forward(self.layer, self.previous)(*args, **kwargs)

    def parameters(self, recurse: bool = True):
        """The layer's: the skipper joins a layer skipped for every row to their graph (zero
        gradients, so DDP's default flags hold). Not registered here: `model.parameters()`
        and `state_dict()` walk submodules, and see each parameter once, at the layer."""
        return self.layer.parameters(recurse)


def _build_skipper(skip, default_on: bool, layers: nn.ModuleList, hidden_size: int, family: dict):
    """Returns (skipper, per-layer callables the patched forwards route to). `family`: the
    adapter's skipper arguments (e.g. its arg_slicer), below the user's."""
    from ..nn import LayerDynamicSkipper

    if skip is False or (skip is None and not default_on):
        return None, None
    if isinstance(skip, LayerDynamicSkipper):
        if len(skip.layers) != len(layers):
            raise ValueError(
                f"skip: the skipper wraps {len(skip.layers)} layers, the model has {len(layers)}"
            )
        return skip, list(skip.layers)
    if skip is None or skip is True:
        skip = {}
    if not isinstance(skip, dict):
        raise TypeError(
            "skip must be None, a bool, a dict of LayerDynamicSkipper arguments or a "
            f"LayerDynamicSkipper, got {type(skip).__name__}"
        )
    calls = nn.ModuleList(_LayerCall(layer) for layer in layers)
    kwargs = {**_DEFAULT_SKIP, **family, **skip}
    kwargs.setdefault("token_arg_builder", token_layer_args)
    skipper = LayerDynamicSkipper(calls, hidden_size, **kwargs)
    return skipper, list(skipper.layers)


def _has_own_parameters(module: nn.Module, model: nn.Module) -> bool:
    """Whether `module` has parameters and none of them is already the model's."""
    model_params = {id(p) for p in model.parameters()}
    params = [id(p) for p in module.parameters()]
    return bool(params) and not any(p in model_params for p in params)


def _follow(module: nn.Module, training: bool, device: torch.device) -> None:
    """Keep a module that is not attached to the model in its mode and on its device."""
    if module.training != training:
        module.train(training)
    buffer = next(module.buffers(), None)
    if buffer is not None and buffer.device != device:
        module.to(device)


def _layer_forward(handle: StsHandle, idx: int, *args, **kwargs):
    """Patched forward of decoder layer `idx`: through the skipper in training. Nothing here
    reads `idx` on the training path, so under torch.compile this frame is not specialised
    per layer."""
    # a user-built skipper calls the real layer back (`_inside`): run it plainly then
    if handle._inside or handle._generating or not (handle.enabled and handle.model.training):
        return _unpatched_forward(handle._layers[idx], handle._previous[idx])(*args, **kwargs)
    return _skipper_call(handle, idx, *args, **kwargs)


def _skipper_call(handle: StsHandle, idx: int, *args, **kwargs):
    """The skipper's call for layer `idx`: traced under torch.compile, with the decision the
    pre-hook drew for this layer (`_plan_step`; the router policy draws it here, eagerly)."""
    layer = handle._layers[idx]
    if not layer.training:  # a layer the user put in eval() inside a training model
        return _unpatched_forward(layer, handle._previous[idx])(*args, **kwargs)
    _follow(handle.skipper, True, args[0].device if args else kwargs["hidden_states"].device)
    handle._inside = True
    try:
        return handle._calls[idx](*args, **kwargs)
    finally:
        handle._inside = False


def _generate(handle: StsHandle, *args, **kwargs):
    """Patched `model.generate`: the patch steps aside (dense, uncompressed, in train() too:
    a KV cache needs every row of every layer and the prompt's full placeholders)."""
    model = handle.model
    previous = type(model).generate.__get__(model)
    handle._generating = True
    try:
        return previous(*args, **kwargs)
    finally:
        handle._generating = False


# ---------------------------------------------------------------------------------------------
# forward hooks


@functools.cache
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _pre_hook(handle: StsHandle, adapter, module, args, kwargs):
    """The model's forward pre-hook: compress the visual tokens, shrink the text side to match,
    switch the cache off under LDS; returns the arguments the model runs on."""
    if not handle.enabled or handle._generating:
        return None
    model = handle.model
    bound = _forward_signature(type(model)).bind(module, *args, **kwargs)
    kw = dict(bound.arguments)
    kw.pop("self", None)
    kw.update(kw.pop("kwargs", {}))
    ids = kw.get("input_ids")
    report = StsReport(lm_tokens_in=ids.numel() if ids is not None else 0)
    report.lm_tokens = report.lm_tokens_in
    compressor = handle.compressor
    if (
        compressor is not None
        and (module.training or getattr(compressor, "enabled_in_eval", False))
        and adapter.has_visual(kw)
    ):
        if ids is None:
            raise ValueError("apply_sts: VTC needs input_ids (got inputs_embeds)")
        _follow(compressor, module.training, ids.device)
        labels, mask = kw.get("labels"), kw.get("attention_mask")
        _COLUMN_MAPS.append([])  # shrink_placeholders appends one map per call
        try:
            kw, counts = adapter.compress(model, compressor, kw)
            report.columns = _compose_columns(_COLUMN_MAPS[-1])
        finally:
            _COLUMN_MAPS.pop()
        _check_target_count(labels, mask, kw.get("labels"), kw.get("num_items_in_batch"))
        for modality, (n_in, n_kept) in counts.items():  # "image" / "video"
            setattr(report, f"{modality}_tokens_in", n_in)
            setattr(report, f"{modality}_tokens_kept", n_kept)
        report.visual_tokens_in = sum(n for n, _ in counts.values())
        report.visual_tokens_kept = sum(k for _, k in counts.values())
        report.lm_tokens = kw["input_ids"].numel()
    if handle.skipper is not None and module.training:
        kw["use_cache"] = False  # a subset of rows must not write a shared KV cache
        _check_router_logits(kw, model)
        _plan_step(handle.skipper, kw, model)
    handle.report = report
    handle.last_inputs = {
        name: value.detach() if isinstance(value, Tensor) else value
        for name, value in kw.items()
        if name != "mm_encoder_outputs"  # the compressed features and their graph
    }
    return (), kw


def _check_router_logits(kw: dict[str, Any], model: nn.Module) -> None:
    """A mixture-of-experts LM asked for its router logits (for the load-balancing loss)
    would get, from a layer LDS ran on K of its rows, logits for those rows only, which the
    loss cannot line up with the other layers' (it fails deep inside, or would weigh layers
    unevenly): refused with the reason."""
    requested = kw.get("output_router_logits")
    if requested is None:
        config = getattr(model.config, "text_config", model.config)
        requested = getattr(config, "output_router_logits", False)
    if requested:
        raise ValueError(
            "apply_sts: LDS skips rows of the decoder layers, so a mixture-of-experts model "
            "cannot return every layer's router logits (output_router_logits=True, for the "
            "load-balancing loss); turn them off, or train this stage without LDS (skip=False)"
        )


def _plan_step(skipper: nn.Module, kw: dict[str, Any], model: nn.Module) -> None:
    """The skipper's decisions for every decoder layer of this forward, drawn before it runs
    (`LayerDynamicSkipper.plan_step`): the LM's hidden states are `[B, T, D]` for the
    (compressed) `input_ids` or `inputs_embeds` the model now runs on."""
    tokens = kw.get("input_ids")
    tokens = kw.get("inputs_embeds") if tokens is None else tokens
    if tokens is None or tokens.dim() < 2:
        return
    # the gates' dtype follows the decoder's (fp64 layers get fp64 gates, all else fp32)
    weight = next(skipper.layers[0].layer.parameters(), None) if len(skipper.layers) else None
    dtype = weight.dtype if weight is not None else torch.float32
    skipper.plan_step(tuple(tokens.shape[:2]), tokens.device, dtype)


def _check_target_count(
    before: Tensor | None, mask: Tensor | None, after: Tensor | None, num_items
) -> None:
    """Placeholders VTC drops should not be loss targets (-100, as LLaVA's recipe has it): a
    loss normalised by a count of the caller's labels (`num_items_in_batch`: the Trainer, TRL)
    would be silently scaled by kept / counted. Raises when the model itself is handed such a
    count, warns otherwise (TRL normalises outside the model). The shrink drops placeholders
    and padding (`mask` 0), so targets on padding do not count here. One host read."""
    if before is None or after is None:
        return
    targets = before != -100
    on_padding = (targets & ~mask.bool()).sum() if mask is not None else 0
    lost = int(targets.sum() - (after != -100).sum())  # one read: padding + placeholders
    if not lost:
        return
    on_padding = int(on_padding)
    message = (
        f"apply_sts: VTC dropped {lost - on_padding} visual placeholder and {on_padding} "
        "padding tokens whose labels are loss targets (not -100); a loss normalised by the "
        "caller's target count (num_items_in_batch) is scaled down by the dropped share. Set "
        "the labels of image/video placeholder and padding tokens to -100 in your collator."
    )
    if num_items is not None:
        raise ValueError(message)
    warnings.warn(message, stacklevel=2)


def _compose_columns(maps: list[Tensor]) -> Tensor | None:
    """One column map from the successive shrinks of one forward (images, then videos)."""
    if not maps:
        return None
    cols = maps[0]
    for later in maps[1:]:  # later [B, T''] indexes the previous layout
        cols = torch.where(later >= 0, cols.gather(1, later.clamp_min(0)), -1)
    return cols


def _drop_steps(handle: StsHandle, module, args, output) -> None:
    """The decisions drawn for this forward (`_plan_step`) end with it: a later call that does
    not pass through the model's pre-hook (e.g. of its inner language model) draws its own."""
    if handle.skipper is not None:
        handle.skipper._steps = None


def _post_hook(handle: StsHandle, module, args, output):
    """The model's forward hook: the skipper's counts into the report and the totals; logits
    back at the caller's length when the loss is computed outside the model."""
    if not handle.enabled or handle._generating:
        return None
    report = handle.report
    skipper = handle.skipper
    if skipper is not None and module.training:
        skip_report = skipper.report
        report.rows_run = list(skip_report.rows_run)
        report.rows_total = list(skip_report.rows_total)
        report.layer_fraction = float(skip_report.executed_fraction)
    if module.training:
        handle.totals.add(report)
    logits = getattr(output, "logits", None)
    wanted = handle.full_logits or handle.last_inputs.get("labels") is None
    if report.columns is None or logits is None or not wanted:
        return None
    length = report.lm_tokens_in // report.columns.shape[0]
    output.logits = _expand_columns(logits, report.columns, length)
    return output


def _expand_columns(x: Tensor, cols: Tensor, length: int) -> Tensor:
    """x [B, T', ...] in the LM's layout -> [B, length, ...] in the caller's; zeros in the
    columns the shrink dropped (image placeholders, whose labels LLaVA-style training sets to
    -100, and padding)."""
    dest = torch.where(cols >= 0, cols, length)  # re-padding lands in a scratch column
    dest = dest.view(*cols.shape, *([1] * (x.dim() - 2))).expand_as(x)
    out = x.new_zeros(x.shape[0], length + 1, *x.shape[2:])
    return out.scatter(1, dest, x)[:, :length]


# ---------------------------------------------------------------------------------------------
# VTC: shrink the text side to match the compressed features (adapters call this)


@torch.compiler.disable  # output shapes depend on the data: eager under torch.compile
def shrink_placeholders(
    input_ids: Tensor,
    image_token_id: int,
    n_in: list[int],
    n_out: list[int],
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    position_ids: Tensor | None = None,
    mm_token_type_ids: Tensor | None = None,
    pad_token_id: int = 0,
) -> dict[str, Tensor | None]:
    """Keep the first `n_out[k]` of image k's `n_in[k]` placeholders and drop the others.

    Images are numbered in row-major order over `input_ids` [B, L] (the order the model fills
    placeholders in). Padding (attention_mask == 0) is dropped too and rows are re-padded to
    the longest one, on the left if any row of the batch starts with padding, else on the
    right. `position_ids` [B or 1, L] are renumbered (each position minus the tokens removed
    before it), or [3/4, B, L] dropped columns only. Returns the shrunk tensors by name; an
    `attention_mask` is created when the input had none and rows end up of different lengths.
    """
    b, length = input_ids.shape
    dev = input_ids.device
    counts_in = torch.tensor(n_in, device=dev)
    counts_out = torch.tensor(n_out, device=dev)
    slots = (input_ids == image_token_id).reshape(-1).nonzero().squeeze(1)  # [sum n_in]
    if slots.numel() != sum(n_in):
        raise ValueError(
            f"input_ids hold {slots.numel()} image placeholders (id {image_token_id}), the "
            f"images need {sum(n_in)}"
        )
    image_of = torch.repeat_interleave(torch.arange(len(n_in), device=dev), counts_in)
    rank = torch.arange(slots.numel(), device=dev) - (counts_in.cumsum(0) - counts_in)[image_of]
    dropped = torch.zeros(b * length, dtype=torch.bool, device=dev)
    dropped[slots[rank >= counts_out[image_of]]] = True
    dropped = dropped.view(b, length)
    keep = ~dropped
    if attention_mask is not None:
        keep &= attention_mask.bool()
    left = attention_mask is not None and bool((attention_mask[:, 0] == 0).any())
    row_len = keep.sum(1)  # [B]
    new_len = int(row_len.max())
    shift = (new_len - row_len)[:, None] if left else 0
    dest = keep.long().cumsum(1) - 1 + shift  # [B, L] new column of each kept token
    dest = torch.where(keep, dest, new_len)  # everything else lands in a scratch column
    _record_columns(keep, dest, new_len, slots, (counts_in - counts_out)[image_of])

    def move(t: Tensor, fill) -> Tensor:  # t [..., B, L] -> [..., B, new_len]
        lead = t.shape[:-2]
        out = torch.full((*lead, b, new_len + 1), fill, dtype=t.dtype, device=t.device)
        out.scatter_(-1, dest.expand(*lead, b, length), t.expand(*lead, b, length))
        return out[..., :new_len]

    out: dict[str, Tensor | None] = {"input_ids": move(input_ids, pad_token_id)}
    if attention_mask is not None:
        out["attention_mask"] = move(attention_mask, 0)
    elif bool((row_len != new_len).any()):
        out["attention_mask"] = move(torch.ones_like(input_ids), 0)
    else:
        out["attention_mask"] = None
    out["labels"] = None if labels is None else move(labels, -100)
    out["mm_token_type_ids"] = None if mm_token_type_ids is None else move(mm_token_type_ids, 0)
    if position_ids is None:
        out["position_ids"] = None
    elif position_ids.dim() == 2:  # [B or 1, L]: close the gaps left by the removed tokens
        removed_before = dropped.long().cumsum(1) - dropped.long()
        out["position_ids"] = move(position_ids.expand(b, length) - removed_before, 0)
    else:
        out["position_ids"] = move(position_ids, 0)
    return out


def _record_columns(keep: Tensor, dest: Tensor, new_len: int, slots, surplus) -> None:
    """Hand the active patch (if any) this shrink's column map [B, new_len]: the source column
    of every new column, -1 for re-padding. A kept placeholder maps `surplus` columns later, to
    the last `kept` columns of its image, so that the logit predicting the text after an image
    lands next to that text when the logits are expanded back."""
    if not _COLUMN_MAPS:
        return
    maps = _COLUMN_MAPS[-1]
    b, length = keep.shape
    source = torch.arange(length, device=dest.device).repeat(b)  # [B * L]
    source[slots] += surplus  # dropped slots are never read below
    cols = torch.full((b, new_len + 1), -1, dtype=torch.long, device=dest.device)
    cols.scatter_(1, dest, torch.where(keep, source.view(b, length), -1))
    maps.append(cols[:, :new_len])


# ---------------------------------------------------------------------------------------------
# LDS token mode: the arguments of an HF decoder layer restricted to each sample's kept tokens


def token_layer_args(args: tuple, kwargs: dict, plan) -> tuple[tuple, dict]:
    """`token_arg_builder` for Llama / Qwen2-VL decoder layers.

    The layer runs on `[B, Kmax, D]` (each sample's kept tokens, padded). Rotary embeddings and
    position ids are gathered at the kept tokens' original positions; the attention mask is the
    original one (or causal on original positions when the model passed none) restricted to kept
    query/key pairs, padding keys masked. Padding query rows may attend to themselves only
    (their output is discarded) so no row is fully masked.
    """
    kwargs = dict(kwargs)
    pos = plan.positions  # [B, Kmax] original t of each kept token
    valid = plan.valid  # [B, Kmax]
    b, kmax = pos.shape

    def gather_t(x: Tensor, t_dim: int) -> Tensor:  # gather along the sequence dim
        # sizes read from `pos`, not closed over as ints: under torch.compile this may be its
        # own frame, and an int in a closure would be a guard (a recompile per Kmax)
        x = (
            x.expand(*x.shape[:t_dim], pos.shape[0], *x.shape[t_dim + 1 :])
            if x.shape[t_dim] == 1
            else x
        )
        shape = [1] * x.dim()
        shape[t_dim], shape[t_dim + 1] = pos.shape
        index = pos.view(shape).expand(*x.shape[: t_dim + 1], pos.shape[1], *x.shape[t_dim + 2 :])
        return x.gather(t_dim + 1, index)

    cos, sin = kwargs["position_embeddings"]  # [1 or B, T, hd]
    kwargs["position_embeddings"] = (gather_t(cos, 0), gather_t(sin, 0))
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = gather_t(kwargs["position_ids"], kwargs["position_ids"].dim() - 2)
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 4:
        raise ValueError(
            "LDS token mode needs a 4D attention mask (eager or sdpa attention), got "
            f"attention_mask of shape {tuple(mask.shape)}"
        )
    if mask is None:  # sdpa without padding: causal on the original positions
        allowed = pos[:, :, None] >= pos[:, None, :]
    else:
        m = mask[:, 0].expand(b, -1, -1)  # [B, T, T]
        m = m.gather(1, pos[:, :, None].expand(-1, -1, m.shape[-1]))
        m = m.gather(2, pos[:, None, :].expand(-1, kmax, -1))  # [B, Kmax, Kmax]
        allowed = m if m.dtype == torch.bool else m == 0
    eye = torch.eye(kmax, dtype=torch.bool, device=pos.device)
    allowed = (allowed & valid[:, None, :]) | (~valid[:, :, None] & eye)
    allowed = allowed | (eye & ~allowed.any(-1, keepdim=True))  # fully masked rows (left pad)
    if mask is not None and mask.dtype != torch.bool:  # eager: additive float mask
        additive = torch.zeros(allowed.shape, dtype=mask.dtype, device=mask.device)
        kwargs["attention_mask"] = additive.masked_fill(~allowed, torch.finfo(mask.dtype).min)[
            :, None
        ]
    else:
        kwargs["attention_mask"] = allowed[:, None]
    kwargs["cache"] = None
    kwargs["use_cache"] = False
    return args, kwargs


def __getattr__(name: str):  # StsCallback imports transformers: only when asked for
    if name == "StsCallback":
        from .callback import StsCallback

        return StsCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
