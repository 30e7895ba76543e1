"""Gemma 3 (`Gemma3ForConditionalGeneration`): a fixed `mm_tokens_per_image` square grid per
image, image tokens attending to each other bidirectionally."""

from __future__ import annotations

from ._base import TiledAdapter


class Gemma3Adapter(TiledAdapter):
    """The bidirectional mask over each image is built from `token_type_ids` (1 on image
    tokens), so those are shrunk with the placeholders. Token-mode LDS is not offered: its
    layers take a mask per layer type (sliding / full) that token mode does not rebuild."""

    name = "Gemma 3"
    classes = ("Gemma3ForConditionalGeneration",)
    packs = True
    lds_modes = ("sample",)
    type_ids = "token_type_ids"

    def tokens_per_tile(self, model):
        return model.config.mm_tokens_per_image


ADAPTER = Gemma3Adapter()
