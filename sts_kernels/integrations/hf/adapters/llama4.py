"""Llama 4 (`Llama4ForConditionalGeneration`): images split into tiles plus a global view, every
tile a pixel-shuffled square grid, each tile's `<|patch|>` placeholders a run between separator
tokens; a mixture-of-experts LM whose layers alternate chunked and full attention."""

from __future__ import annotations

import functools

from torch import Tensor

from ....nn.layer_args import token_layer_args
from ._base import TiledAdapter


class Llama4Adapter(TiledAdapter):
    """The model keeps its parts on itself (no `.model`): `model.get_image_features` returns
    `[tiles, ((image_size / patch) * pixel_shuffle_ratio)^2, D]` for the flat tile list of the
    batch (each image's tiles, then its global view). The processor lays an image out as
    `<|image_start|>` tile (`<|tile_x_separator|>` tile)* `<|tile_y_separator|>` per tile row,
    `<|image|>`, the global view's run, `<|image_end|>`: each tile keeps the first k' of its own
    run and the markers stay. Decoder layers: `model.language_model.model.layers`.

    LDS token mode: every layer gets the 4-D mask of its own type (chunked or full), gathered
    at the kept tokens' original positions, so a kept token attends within its original chunk;
    the complex rotary factors are gathered the same way. The NoPE layers' attention
    temperature is computed from the row's length, not from positions: exact while a row is
    shorter than `floor_scale` tokens (the temperature is 1 there), refused beyond. MoE router
    logits are refused under LDS by the handle (`check_router_logits`)."""

    name = "Llama 4"
    classes = ("Llama4ForConditionalGeneration",)
    packs = True

    def image_features(self, model, kw):
        return model.get_image_features(pixel_values=kw["pixel_values"], return_dict=True)

    def layers(self, model):
        return model.language_model.model.layers

    def tokens_per_tile(self, model):
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        return int(side * vision.pixel_shuffle_ratio) ** 2

    def skipper_arguments(self):
        return {"token_arg_builder": token_args}

    def check_skipper(self, skipper):
        super().check_skipper(skipper)
        if (
            getattr(skipper, "mode", "sample") != "token"
            or skipper.token_arg_builder is not token_args
        ):
            return
        # the layers' temperature-tuned NoPE attention bounds the exact row length: bound to the
        # builder (skipper_arguments has no model to read it from)
        layers = [getattr(call.layer, "layer", call.layer) for call in skipper.layers]
        attns = [layer.self_attn for layer in layers]
        tuned = [a.floor_scale for a in attns if a.attn_temperature_tuning and not a.use_rope]
        if tuned:
            skipper.token_arg_builder = functools.partial(token_args, max_length=min(tuned) - 1)


def token_args(args: tuple, kwargs: dict, plan, max_length: int | None = None):
    """`token_layer_args` for a Llama 4 decoder layer: its rotary embedding is one complex
    tensor `[1 or B, T, head_dim / 2]` (not a (cos, sin) pair), gathered at the kept tokens;
    the layer's own 4-D mask gathered likewise (windowed: flash varlen refused)."""
    length = plan.shape[1]
    if max_length is not None and length > max_length:
        raise ValueError(
            f"LDS token mode: Llama 4's NoPE layers scale attention by a temperature computed "
            f"from the row's length, which over {max_length} tokens (floor_scale - 1; this "
            f"batch has {length}) differs for a row of kept tokens; use mode='sample'"
        )
    mask = kwargs.get("attention_mask")
    if mask is not None and not isinstance(mask, Tensor):
        raise ValueError(
            f"LDS token mode needs a 4D attention mask (eager or sdpa attention), got a "
            f"{type(mask).__name__} (flex attention)"
        )
    freqs = kwargs["position_embeddings"]
    args, kwargs = token_layer_args(
        args, {**kwargs, "position_embeddings": (freqs, freqs)}, plan, windowed=True
    )
    kwargs["position_embeddings"] = kwargs["position_embeddings"][0]
    return args, kwargs


ADAPTER = Llama4Adapter()
