"""FastVLM (`FastVlmForConditionalGeneration`): LLaVA's layout over a convolutional tower whose
last feature map (`[images, C, h, w]`, flattened row-major) is the grid."""

from __future__ import annotations

from ._base import TiledAdapter


class FastVlmAdapter(TiledAdapter):
    """`get_image_features` returns `[images, image_seq_length, D]`; each image's placeholders
    are one run (the processor writes `image_seq_length` of them)."""

    name = "FastVLM"
    classes = ("FastVlmForConditionalGeneration",)
    packs = True

    def tokens_per_tile(self, model):
        return model.config.image_seq_length


ADAPTER = FastVlmAdapter()
