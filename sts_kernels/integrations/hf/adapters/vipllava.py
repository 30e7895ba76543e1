"""VipLlava (`VipLlavaForConditionalGeneration`): LLaVA's layout, features from several CLIP
layers concatenated (the class token dropped by the model)."""

from __future__ import annotations

from ._base import TiledAdapter


class VipLlavaAdapter(TiledAdapter):
    """`get_image_features` returns `[images, (image_size / patch)^2, D]`; each image's
    placeholders are one run, as LLaVA's."""

    name = "VipLlava"
    classes = ("VipLlavaForConditionalGeneration",)
    packs = True

    def image_features(self, model, kw):
        return model.model.get_image_features(
            pixel_values=kw["pixel_values"],
            vision_feature_layer=kw.get("vision_feature_layer"),
            return_dict=True,
        )

    def tokens_per_tile(self, model):
        vision = model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2


ADAPTER = VipLlavaAdapter()
