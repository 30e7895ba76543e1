"""The convention fallback: a VLM class with no adapter of its own is served when it has the
shape most transformers VLMs share — `model.model.get_image_features` and
`get_placeholder_mask`, a `model.model.language_model` with `layers`, one image token id in the
config and a `text_config` — with LDS always and VTC where every image's features form a
square grid (checked on the features, per forward). A one-time warning names the class."""

from __future__ import annotations

import inspect
import math
import warnings

import torch
from torch import Tensor, nn

from ._base import Adapter, Shrink, feed_features

_WARNED: set[str] = set()


class GenericAdapter(Adapter):
    """Every image's projected features `[k, D]` (a `[images, k, D]` tensor or one per image)
    are taken as a square row-major grid of side sqrt(k) and compressed on it, one placeholder
    run per image; positions are 1-D (renumbered). Features that are not square grids (a class
    token, a crop layout) raise a ValueError at the forward: use skip only."""

    name = "generic (convention)"
    packs = True
    video_reason = "the convention knows one image token and a square grid; videos pass as they are"
    mode_reason = "any mode, where each image's features form a square grid"

    def compress(self, model, compressor, kw):
        getter = model.model.get_image_features
        named = inspect.signature(getter).parameters
        extra = {k: kw[k] for k in named if k != "pixel_values" and kw.get(k) is not None}
        features = getter(pixel_values=kw["pixel_values"], return_dict=True, **extra)
        items = features.pooler_output
        if isinstance(items, Tensor) and items.dim() != 3:
            raise ValueError(
                f"compress: {type(model).__name__} (served by the convention) gives image "
                f"features of shape {tuple(items.shape)}, not [images, tokens, D]: use skip only"
            )
        grids = []
        for f in items:
            side = math.isqrt(f.shape[0])
            if side * side != f.shape[0]:
                raise ValueError(
                    f"compress: {type(model).__name__} (served by the convention) gives "
                    f"{f.shape[0]} tokens an image, not a square grid: use skip only "
                    "(compress=False)"
                )
            grids.append((side, side))
        token_id = self.placeholder_ids(model)["image"]
        shrink = compress_on_grids(model, compressor, kw, features, grids, token_id)
        return kw, {"image": shrink}


def compress_on_grids(model, compressor, kw, features, grids, token_id: int) -> Shrink:
    """Compress image k's features `[h_k * w_k, D]` (row-major) on `grids[k]`, one placeholder
    run each, and feed them (a tensor again where the model gave one)."""
    items = features.pooler_output
    outs = compressor.compress_many([f[None] for f in items], grids)
    compressed = [o.x[0] for o in outs]
    if isinstance(items, Tensor):
        compressed = torch.stack(compressed)
    return feed_features(model, kw, "image", features, compressed, token_id)


def follows_convention(model: nn.Module) -> bool:
    """Whether `model` has the common transformers VLM shape (see the module docstring)."""
    inner = getattr(model, "model", None)
    lm = getattr(inner, "language_model", None)
    config = getattr(model, "config", None)
    token = getattr(config, "image_token_id", getattr(config, "image_token_index", None))
    return (
        callable(getattr(inner, "get_image_features", None))
        and callable(getattr(inner, "get_placeholder_mask", None))
        and isinstance(getattr(lm, "layers", None), nn.ModuleList)
        and isinstance(token, int)
        and getattr(config, "text_config", None) is not None
    )


def convention_adapter(model: nn.Module) -> GenericAdapter | None:
    """The generic adapter for a model that follows the convention (warning once per class)."""
    if not follows_convention(model):
        return None
    name = type(model).__name__
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(
            f"apply_sts: {name} has no adapter of its own; serving it by the common VLM "
            "convention (LDS; VTC where each image's features form a square grid)",
            stacklevel=3,
        )
    return ADAPTER


ADAPTER = GenericAdapter()
