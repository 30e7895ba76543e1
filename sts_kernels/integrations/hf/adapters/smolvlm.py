"""SmolVLM / Idefics3 (`SmolVLMForConditionalGeneration`, `Idefics3ForConditionalGeneration`):
images split into tiles, each a pixel-shuffled square grid, tiles framed by row/column markers."""

from __future__ import annotations

from ._base import TiledAdapter


class SmolVLMAdapter(TiledAdapter):
    """`get_image_features` returns one `[tiles_i * k, D]` per sample; every tile's `k`
    placeholders are a run of their own (text markers sit between tiles), so each tile keeps the
    first k' of its own run. The decoder layers are `model.model.text_model.layers`."""

    name = "SmolVLM / Idefics3"
    classes = ("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration")
    packs = True

    def image_features(self, model, kw):
        return model.model.get_image_features(
            kw["pixel_values"], kw.get("pixel_attention_mask"), return_dict=True
        )

    def layers(self, model):
        return model.model.text_model.layers

    def tokens_per_tile(self, model):
        config = model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        return (side // config.scale_factor) ** 2


ADAPTER = SmolVLMAdapter()
