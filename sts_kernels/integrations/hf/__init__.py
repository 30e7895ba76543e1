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
- LDS: every decoder layer (the adapter knows where: `model.model.language_model.layers`,
  SmolVLM's `text_model.layers`, ...) keeps its module object,
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

The patch lives on the instance as data: hooks and layer forwards are methods of the handle,
which the model holds (`sts_handle(model)`). `copy.deepcopy` (EMA / reference models) and
`torch.save` / `pickle` of the module therefore give an independent patched model bound to its
own layers; a stale handle's `remove()` is a no-op. `handle.last_inputs` is detached.
`handle.totals` sums the reports of all training forwards (`StsCallback` logs and resets them).

Distributed: call `apply_sts` before wrapping; give each rank its own skipper seed (seed +
rank). A layer that a rank skips for every row still joins the graph with zero gradients, so
`DistributedDataParallel(model)` works with its default flags (LLaVA's unused CLIP
post_layernorm must be frozen, as without the patch). FSDP2: `fully_shard` each decoder layer
(called on every rank; only its inner work is skipped), then the root, default flags. Both
give a single process's gradients (tests/stacks/test_ddp.py, tests/stacks/test_fsdp.py, patched LLaVA).

torch.compile: the pre-hook draws the skipper's decisions for every layer before the model
runs (`LayerDynamicSkipper.plan_step`, eager), so the decoder compiles as one graph with each
layer's K an unbacked size (the router policy, which scores each layer's input, decides layer
by layer: a graph break per layer); `shrink_placeholders` runs eagerly (its output length
depends on the data). Tested in tests/stacks/test_training_stacks.py.

Pass the skipper as a dict (or None) rather than a ready `LayerDynamicSkipper`: a ready one
wraps the real layers, so their module hooks (and `output_hidden_states` recorders) also see the
row-subset call.

The package, one job per module (imports point down the list):

    patch.py     apply_sts, sts_handle: build the compressor / skipper, install the handle
    handle.py    StsHandle: the model's hooks, the patched layer forwards, remove()
    report.py    StsReport / StsTotals: what a forward fed the LM (StsCallback logs them)
    adapters/    one module per family: where features, placeholders and layers are
    sequence.py  placeholder shrinking, column maps, logits expansion (plain functions)
    layers.py    the skipper's stand-in for a decoder layer; token-mode layer arguments
    callback.py  StsCallback for transformers.Trainer (imports transformers)
"""

from __future__ import annotations

from .adapters import supported_models
from .handle import StsHandle
from .layers import token_layer_args
from .patch import apply_sts, sts_handle
from .report import StsReport, StsTotals
from .sequence import shrink_placeholders

__all__ = [
    "SUPPORTED_MODELS",
    "StsCallback",
    "StsHandle",
    "StsReport",
    "StsTotals",
    "apply_sts",
    "shrink_placeholders",
    "sts_handle",
    "token_layer_args",
]

SUPPORTED_MODELS = supported_models()


def __getattr__(name: str):  # StsCallback imports transformers: only when asked for
    if name == "StsCallback":
        from .callback import StsCallback

        return StsCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
