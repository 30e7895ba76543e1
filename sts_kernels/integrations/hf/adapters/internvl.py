"""InternVL (`InternVLForConditionalGeneration`): dynamic tiling, every tile a pixel-shuffled
square grid of tokens."""

from __future__ import annotations

from ._base import TiledAdapter


class InternVLAdapter(TiledAdapter):
    """`get_image_features` returns `[tiles, (side * downsample_ratio)^2, D]` for all tiles of
    the batch; each tile's placeholders are one run between `<img>` / `</img>` markers."""

    name = "InternVL"
    classes = ("InternVLForConditionalGeneration",)
    packs = True

    def tokens_per_tile(self, model):
        config = model.config
        side = config.vision_config.image_size[0] // config.vision_config.patch_size[0]
        return int(side * config.downsample_ratio) ** 2


ADAPTER = InternVLAdapter()
