"""Ovis2 (`Ovis2ForConditionalGeneration`): every tile (the global view first) a fixed square
grid of visual-vocabulary embeddings; the indicator tokens between tiles come from the same
visual embedding table."""

from __future__ import annotations

from ._base import TiledAdapter


class Ovis2Adapter(TiledAdapter):
    """`get_image_features` returns `[tiles, k, D]` (k = (image_size / patch / hidden_stride)^2,
    the tower's probabilities over the visual vocabulary through its embedding table) and the
    indicator embeddings separately; each tile's `<IMG_ATOM>` run is pooled on its own grid and
    the indicator tokens (`<IMG_START>`, `<IMG_GRID>`, `<IMG_COL>`, `<IMG_ROW>`, `<IMG_END>`)
    stay, still embedded from the visual table by the model."""

    name = "Ovis2"
    classes = ("Ovis2ForConditionalGeneration",)
    packs = True

    def tokens_per_tile(self, model):
        vision = model.config.vision_config
        side = -(-(vision.image_size // vision.patch_size) // vision.hidden_stride)
        return side * side


ADAPTER = Ovis2Adapter()
