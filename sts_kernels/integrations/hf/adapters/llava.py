"""LLaVA (`LlavaForConditionalGeneration`): one fixed grid of CLIP patches per image."""

from __future__ import annotations

import torch

from ._base import Adapter, feed_features
from .mistral3 import LLAVA_PIXTRAL


class LlavaAdapter(Adapter):
    """Every image is `image_size / patch_size` squared patches (or `image_sizes // patch` with
    a variable-size tower), placeholders are one run per image, positions are 1-D: a plain
    renumbering after the shrink. With vision_feature_select_strategy="full" the CLS token
    leads each image and is passed through uncompressed. A Pixtral tower (no CLS, variable
    sizes, row-break markers) is served by `mistral3.LLAVA_PIXTRAL`."""

    name = "LLaVA"
    classes = ("LlavaForConditionalGeneration",)
    packs = True

    def check_compressor(self, compressor, model):
        if _pixtral(model):
            return LLAVA_PIXTRAL.check_compressor(compressor, model)
        super().check_compressor(compressor, model)

    def compress(self, model, compressor, kw):
        if _pixtral(model):
            return LLAVA_PIXTRAL.compress(model, compressor, kw)
        config = model.config
        strategy = kw.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        image_sizes = kw.get("image_sizes")
        features = model.model.get_image_features(
            pixel_values=kw["pixel_values"],
            vision_feature_layer=kw.get("vision_feature_layer"),
            vision_feature_select_strategy=strategy,
            image_sizes=image_sizes,
            return_dict=True,
        )
        images = list(features.pooler_output)  # per image [cls + h*w, D]
        patch = config.vision_config.patch_size
        if image_sizes is not None:
            grids = [(int(h) // patch, int(w) // patch) for h, w in image_sizes.tolist()]
        else:
            grids = [(config.vision_config.image_size // patch,) * 2] * len(images)
        cls = 1 if strategy == "full" else 0  # "full" keeps CLS first: it takes no part
        outs = compressor.compress_many([f[None, cls:] for f in images], grids)
        compressed = [o.x[0] for o in outs]
        if cls:  # CLS back in front of each image: one concatenation for the whole batch
            pieces = [t for f, c in zip(images, compressed) for t in (f[:cls], c)]
            compressed = list(torch.cat(pieces).split([cls + c.shape[0] for c in compressed]))
        shrink = feed_features(model, kw, "image", features, compressed, config.image_token_id)
        return kw, {"image": shrink}


def _pixtral(model) -> bool:
    return model.config.vision_config.model_type == "pixtral"


ADAPTER = LlavaAdapter()
