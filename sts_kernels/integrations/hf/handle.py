"""`StsHandle`: the live patch of one model instance, with the hooks and layer forwards that make
it (methods of the handle, so a deepcopy or pickle of the model carries them, rebound to the
copy's own handle and layers)."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor, nn

from .layers import check_router_logits, draw_decisions, unpatched_forward
from .report import StsReport, StsTotals
from .sequence import check_target_count, compose_columns, count_placeholders, expand_columns

# the live patch of a model is a plain attribute of the model: deepcopy / pickle carry it (and
# every hook and layer forward, all bound to the handle rather than closures) to the copy
HANDLE_ATTR = "_sts_handle"


class StsHandle:
    """Returned by `apply_sts`: toggle with `enabled`, undo with `remove()`.

    A deepcopy (or pickle) of the patched model is patched too, by its own handle, bound to the
    copy's layers: `sts_handle(copy)`. `full_logits`: return logits at the caller's sequence
    length even when the model computed the loss from `labels` (by default only calls without
    `labels`, whose loss is computed outside the model, get them; see `shrink`).
    """

    def __init__(
        self,
        model: nn.Module,
        adapter,
        compressor: nn.Module | None,
        skipper: nn.Module | None,
        layer_calls: list[nn.Module] | None = None,
    ):
        self.model = model
        self.adapter = adapter  # the family's (`adapters/`)
        self.compressor = compressor
        self.skipper = skipper
        self.enabled = True
        self.full_logits = False
        self.report = StsReport()
        # detached kwargs the model last ran on (without the vision features): no graph kept
        self.last_inputs: dict[str, Any] | None = None
        self.totals = StsTotals()  # summed over training forwards since the last reset
        self._calls = layer_calls or []  # per decoder layer: the skipper's call for it
        self._layers: list[nn.Module] = []  # patched decoder layers and their previous
        self._previous: list[Any] = []  # instance-level forward (None: the class's)
        self._hooks: list[Any] = []  # RemovableHandles
        self._attached: list[str] = []  # modules set on the model (sts_compressor / sts_skipper)
        self._inside = False  # a patched forward is running the skipper's call
        self._generating = False  # generate() is running: the patch steps aside

    @property
    def adds_parameters(self) -> list[str]:
        """Names of the modules with trainable parameters this patch set on the model (a router
        skipper: `sts_skipper`); empty when the model's parameters are unchanged."""
        return list(self._attached)

    # ---- install / remove ---------------------------------------------------------------

    def attach(self, name: str, module: nn.Module) -> None:
        """Set `module` on the model as `name` (its parameters become the model's)."""
        setattr(self.model, name, module)
        self._attached.append(name)

    def install(self, layers: nn.ModuleList) -> None:
        """Hook the model and (with a skipper) route every decoder layer through it."""
        model = self.model
        if self.skipper is not None:
            self._layers = list(layers)
            self._previous = [layer.__dict__.get("forward") for layer in layers]
            for i, layer in enumerate(layers):
                layer.forward = functools.partial(self._layer_forward, i)
        self._hooks = [
            model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            model.register_forward_hook(self._post_hook),
            # even when the forward raises: decisions drawn for it must not serve a later call
            model.register_forward_hook(self._end_forward, always_call=True),
        ]
        model.generate = self._generate
        model.__dict__[HANDLE_ATTR] = self

    def remove(self) -> None:
        """Restore the model: same module objects, forwards, hooks and state_dict. A no-op for a
        handle that is no longer the model's live patch (removed, or replaced by a newer one)."""
        if self.model.__dict__.get(HANDLE_ATTR) is not self:
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
        for name in ("generate", HANDLE_ATTR):
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

    # ---- the model's hooks --------------------------------------------------------------

    def _pre_hook(self, module, args, kwargs):
        """Compress the visual tokens, shrink the text side to match, switch the cache off
        under LDS and draw the skipper's decisions; returns the arguments the model runs on."""
        if not self.enabled or self._generating:
            return None
        bound = _forward_signature(type(self.model)).bind(module, *args, **kwargs)
        kw = dict(bound.arguments)
        kw.pop("self", None)
        kw.update(kw.pop("kwargs", {}))
        ids = kw.get("input_ids")
        report = StsReport(lm_tokens_in=ids.numel() if ids is not None else 0)
        report.lm_tokens = report.lm_tokens_in
        if module.training and ids is not None:
            self._count_visual(report, ids, kw)
        compressor = self.compressor
        if (
            compressor is not None
            and (module.training or getattr(compressor, "enabled_in_eval", False))
            and self.adapter.has_visual(kw)
        ):
            if ids is None:
                raise ValueError("apply_sts: VTC needs input_ids (got inputs_embeds)")
            follow(compressor, module.training, ids.device)
            labels, mask = kw.get("labels"), kw.get("attention_mask")
            kw, shrinks = self.adapter.compress(self.model, compressor, kw)
            report.columns = compose_columns([s.columns for s in shrinks.values()])
            check_target_count(labels, mask, kw.get("labels"), kw.get("num_items_in_batch"))
            for modality, shrink in shrinks.items():  # "image" / "video"
                setattr(report, f"{modality}_tokens_in", shrink.tokens_in)
                setattr(report, f"{modality}_tokens_kept", shrink.tokens_kept)
            report.visual_tokens_in = sum(s.tokens_in for s in shrinks.values())
            report.visual_tokens_kept = sum(s.tokens_kept for s in shrinks.values())
            report.lm_tokens = kw["input_ids"].numel()
        if self.skipper is not None and module.training:
            kw["use_cache"] = False  # a subset of rows must not write a shared KV cache
            check_router_logits(kw, self.model)
            draw_decisions(self.skipper, kw, self.model)
        self.report = report
        self.last_inputs = {
            name: value.detach() if isinstance(value, Tensor) else value
            for name, value in kw.items()
            if name != "mm_encoder_outputs"  # the compressed features and their graph
        }
        return (), kw

    def _count_visual(self, report: StsReport, ids: Tensor, kw: dict[str, Any]) -> None:
        """Visual tokens the batch carries (in = kept unless VTC shrinks them below); refuses
        placeholders that no visual input fills (the LM would train on their raw embeddings)."""
        counts = count_placeholders(ids, self.adapter.placeholder_ids(self.model))
        for modality, n in counts.items():
            setattr(report, f"{modality}_tokens_in", n)
            setattr(report, f"{modality}_tokens_kept", n)
        report.visual_tokens_in = report.visual_tokens_kept = sum(counts.values())
        fed = self.adapter.has_visual(kw) or kw.get("mm_encoder_outputs") is not None
        if self.adapter.modes and report.visual_tokens_in and not fed:
            raise ValueError(
                f"apply_sts: input_ids hold {counts} visual placeholders but no visual input "
                f"arrived ({', '.join(self.adapter.pixel_keys)} are None): the model would train "
                "on the placeholders' raw embeddings. Pass the pixels (a padding-free collator may "
                "drop them) or remove the placeholders."
            )

    def _post_hook(self, module, args, output):
        """The skipper's counts into the report and the totals; logits back at the caller's
        length when the loss is computed outside the model."""
        if not self.enabled or self._generating:
            return None
        report = self.report
        skipper = self.skipper
        if skipper is not None and module.training:
            skip_report = skipper.report
            report.rows_run = list(skip_report.rows_run)
            report.rows_total = list(skip_report.rows_total)
            report.layer_fraction = float(skip_report.executed_fraction)
        if module.training:
            self.totals.add(report)
        logits = getattr(output, "logits", None)
        wanted = self.full_logits or self.last_inputs.get("labels") is None
        if report.columns is None or logits is None or not wanted:
            return None
        length = report.lm_tokens_in // report.columns.shape[0]
        output.logits = expand_columns(logits, report.columns, length)
        return output

    def _end_forward(self, module, args, output) -> None:
        """What was set up for this forward ends with it (also when it raised): the decisions
        drawn ahead (`draw_decisions`; a later call that does not pass through the model's
        pre-hook, e.g. of its inner language model, draws its own) and the adapter's state."""
        if self.skipper is not None:
            self.skipper.clear_plan()
        self.adapter.end_forward(self.model)

    # ---- decoder layers and generate ----------------------------------------------------

    def _layer_forward(self, idx: int, *args, **kwargs):
        """Patched forward of decoder layer `idx`: through the skipper in training. Nothing
        here reads `idx` on the training path, so under torch.compile this frame is not
        specialised per layer."""
        # a user-built skipper calls the real layer back (`_inside`): run it plainly then
        if self._inside or self._generating or not (self.enabled and self.model.training):
            return unpatched_forward(self._layers[idx], self._previous[idx])(*args, **kwargs)
        return self._skipper_call(idx, *args, **kwargs)

    def _skipper_call(self, idx: int, *args, **kwargs):
        """The skipper's call for layer `idx`: traced under torch.compile, with the decision the
        pre-hook drew for this layer (`draw_decisions`; the router policy draws it here, eagerly)."""
        layer = self._layers[idx]
        if not layer.training:  # a layer the user put in eval() inside a training model
            return unpatched_forward(layer, self._previous[idx])(*args, **kwargs)
        follow(self.skipper, True, args[0].device if args else kwargs["hidden_states"].device)
        self._inside = True
        try:
            return self._calls[idx](*args, **kwargs)
        finally:
            self._inside = False

    def _generate(self, *args, **kwargs):
        """Patched `model.generate`: the patch steps aside (dense, uncompressed, in train() too:
        a KV cache needs every row of every layer and the prompt's full placeholders)."""
        model = self.model
        previous = type(model).generate.__get__(model)
        self._generating = True
        try:
            return previous(*args, **kwargs)
        finally:
            self._generating = False


@functools.cache
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def follow(module: nn.Module, training: bool, device: torch.device) -> None:
    """Keep a module that is not attached to the model in its mode and on its device."""
    if module.training != training:
        module.train(training)
    buffer = next(module.buffers(), None)
    if buffer is not None and buffer.device != device:
        module.to(device)
