"""Aya Vision (`AyaVisionForConditionalGeneration`): images split into tiles plus a global view,
every tile a pixel-shuffled square grid, each tile's placeholders a run between text markers."""

from __future__ import annotations

from ._base import TiledAdapter


class AyaVisionAdapter(TiledAdapter):
    """`get_image_features` returns `[tiles, (image_size / patch / downsample_factor)^2, D]`
    for all tiles of the batch. Aya Vision frames a tile as `TILE_i` (`TILE_GLOBAL`) + its
    placeholders, an image as `<|START_OF_IMG|>` ... `<|END_OF_IMG|>`; each tile keeps the
    first k' of its own run. The Cohere2 LM's sliding-window layers get their own 4-D mask,
    which token-mode LDS gathers at the kept tokens (windows on original positions)."""

    name = "Aya Vision"
    classes = ("AyaVisionForConditionalGeneration",)
    packs = True

    def image_features(self, model, kw):
        config = model.config
        strategy = kw.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        return model.model.get_image_features(
            pixel_values=kw["pixel_values"],
            vision_feature_layer=kw.get("vision_feature_layer"),
            vision_feature_select_strategy=strategy,
            return_dict=True,
        )

    def tokens_per_tile(self, model):
        config = model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        return (side // config.downsample_factor) ** 2


ADAPTER = AyaVisionAdapter()
