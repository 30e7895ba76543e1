"""PaliGemma (`PaliGemmaForConditionalGeneration`): every image a SigLIP square grid, all image
tokens first, then the prompt; image and prompt are a prefix that attends both ways."""

from __future__ import annotations

from ._base import TiledAdapter


class PaliGemmaAdapter(TiledAdapter):
    """`get_image_features` returns `[images, (image_size / patch)^2, D]`. The prefix (images
    and prompt) is where `token_type_ids` is 0 (the suffix, the only loss targets, 1): they are
    shrunk with the placeholders, so the kept image tokens stay in the bidirectional prefix.
    Token-mode LDS gathers that 4-D mask at the kept tokens."""

    name = "PaliGemma"
    classes = ("PaliGemmaForConditionalGeneration",)
    packs = True
    type_ids = "token_type_ids"

    def tokens_per_tile(self, model):
        vision = model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2


ADAPTER = PaliGemmaAdapter()
