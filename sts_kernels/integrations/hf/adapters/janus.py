"""Janus / Janus-Pro (`JanusForConditionalGeneration`), understanding: a SigLIP tower whose
square patch grid the aligner projects, one `<begin_of_image>` placeholders `<end_of_image>`
run per image. (Its image-generation path, VQ tokens through `generation_embeddings`, does not
go through `pixel_values` and is left alone.)"""

from __future__ import annotations

from ._base import TiledAdapter


class JanusAdapter(TiledAdapter):
    """`get_image_features` returns `[images, num_image_tokens, D]` (24 x 24 for the released
    384 px / 16 px towers), the count the processor writes between the begin / end markers.
    The convention fallback would serve it too; this adapter states its claims before any
    forward (the grid from the config) and passes the support table's checks."""

    name = "Janus"
    classes = ("JanusForConditionalGeneration",)
    packs = True

    def tokens_per_tile(self, model):
        return model.config.vision_config.num_image_tokens


ADAPTER = JanusAdapter()
