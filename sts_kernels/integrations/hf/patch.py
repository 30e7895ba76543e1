"""`apply_sts`: build the compressor and skipper a call asks for and install them on one model
instance (`StsHandle`); `sts_handle` finds the live patch again, through wrappers."""

from __future__ import annotations

from torch import nn

from ...nn import LayerDynamicSkipper, VisualTokenCompressor
from .adapters import adapter_for
from .handle import HANDLE_ATTR, StsHandle
from .layers import LayerCall

# stage -> (VTC on by default, LDS on by default); STS compresses during modality alignment
# and skips layers during instruction tuning
STAGES = {None: (True, True), "align": (True, False), "instruct": (False, True)}

DEFAULT_COMPRESS = {"mode": "pool", "window": (2, 2)}
DEFAULT_SKIP = {"mode": "sample", "policy": "schedule", "p_max": 0.5, "keep_first_last": True}


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
    `LayerDynamicSkipper` (the latter built on the family's decoder layers, e.g.
    `model.model.language_model.layers`).
    Build DDP/FSDP wrappers after this call.
    """
    model = _peft_base(model) or model  # a PEFT wrapper: patch the HF model it holds
    adapter = adapter_for(model)
    if stage not in STAGES:
        raise ValueError(f"stage must be None, 'align' or 'instruct', got {stage!r}")
    if sts_handle(model) is not None:
        raise RuntimeError("apply_sts: this model is already patched; call handle.remove() first")
    compress_default, skip_default = STAGES[stage]
    layers = adapter.layers(model)

    # a family without VTC (Mllama) takes stage=None as LDS only; asked for VTC (compress=True,
    # stage="align") it refuses with the reason
    vtc_default = compress_default and (bool(adapter.modes) or stage == "align")
    # the family's first VTC mode by default (pool where the layout has a grid)
    defaults = DEFAULT_COMPRESS | ({"mode": adapter.modes[0]} if adapter.modes else {})
    compressor = _build_compressor(compress, vtc_default, defaults)
    if compressor is not None:
        adapter.check_compressor(compressor, model)
    skipper, layer_calls = _build_skipper(
        skip, skip_default, layers, adapter.hidden_size(model), adapter.skipper_arguments()
    )
    if skipper is not None:
        adapter.check_skipper(skipper)
    handle = StsHandle(model, adapter, compressor, skipper, layer_calls)
    weight = next(model.parameters())
    for name, module in (("sts_compressor", compressor), ("sts_skipper", skipper)):
        if module is None:
            continue
        # trainable parts (the router policy's Linear layers) must be model parameters for the
        # optimizer, DDP and checkpoints, in the model's dtype; parameter-free modules stay off
        # the model so its state_dict keeps its keys
        if _has_own_parameters(module, model):
            module.to(device=weight.device, dtype=weight.dtype)
            handle.attach(name, module)
        else:
            module.to(weight.device)
    handle.install(layers)
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
        if HANDLE_ATTR in candidate.__dict__:
            return candidate.__dict__[HANDLE_ATTR]
        wrapped = (getattr(candidate, "module", None), getattr(candidate, "_orig_mod", None))
        pending += [*wrapped, _peft_base(candidate)]
    return None


def _peft_base(model: nn.Module) -> nn.Module | None:
    """The model a `peft.PeftModel` wraps (its `get_base_model()`), else None."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else None


def _build_compressor(compress, default_on: bool, defaults: dict) -> VisualTokenCompressor | None:
    if compress is False or (compress is None and not default_on):
        return None
    if isinstance(compress, VisualTokenCompressor):
        return compress
    if compress is None or compress is True:
        return VisualTokenCompressor(**defaults)
    if isinstance(compress, dict):
        return VisualTokenCompressor(**{**defaults, **compress})
    raise TypeError(
        "compress must be None, a bool, a dict of VisualTokenCompressor arguments or a "
        f"VisualTokenCompressor, got {type(compress).__name__}"
    )


def _build_skipper(skip, default_on: bool, layers: nn.ModuleList, hidden_size: int, family: dict):
    """Returns (skipper, per-layer callables the patched forwards route to). `family`: the
    adapter's skipper arguments (e.g. its arg_slicer), below the user's."""
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
    calls = nn.ModuleList(LayerCall(layer) for layer in layers)
    kwargs = {**DEFAULT_SKIP, **family, **skip}
    skipper = LayerDynamicSkipper(calls, hidden_size, **kwargs)
    return skipper, list(skipper.layers)


def _has_own_parameters(module: nn.Module, model: nn.Module) -> bool:
    """Whether `module` has parameters and none of them is already the model's."""
    model_params = {id(p) for p in model.parameters()}
    params = [id(p) for p in module.parameters()]
    return bool(params) and not any(p in model_params for p in params)
