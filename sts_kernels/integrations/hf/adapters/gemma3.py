"""Gemma 3 (`Gemma3ForConditionalGeneration`): a fixed `mm_tokens_per_image` square grid per
image, image tokens attending to each other bidirectionally."""

from __future__ import annotations

import functools

from ....nn.layer_args import token_layer_args
from ._base import TiledAdapter


class Gemma3Adapter(TiledAdapter):
    """The bidirectional mask over each image is built from `token_type_ids` (1 on image
    tokens), so those are shrunk with the placeholders. Token-mode LDS: every layer gets its
    own 4-D mask (sliding or full), which token mode gathers at the kept tokens' original
    positions, so a kept token's window is the one of its original position; flash-attention
    varlen would apply the window over the kept tokens instead and is refused."""

    name = "Gemma 3"
    classes = ("Gemma3ForConditionalGeneration",)
    packs = True
    type_ids = "token_type_ids"

    def skipper_arguments(self):
        return {"token_arg_builder": functools.partial(token_layer_args, windowed=True)}

    def tokens_per_tile(self, model):
        return model.config.mm_tokens_per_image


ADAPTER = Gemma3Adapter()
