"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT's anyres images with
the crop grid capped (`anyres_max_N`), base-only images in multi-image rows, and videos of
bilinearly pooled frames closed by one newline token."""

from __future__ import annotations

import math

from .llava_next_video import LlavaNextVideoAdapter


class LlavaOnevisionAdapter(LlavaNextVideoAdapter):
    """The crop grid is the LLaVA-NeXT one shrunk as `pack_image_features` does when it holds
    more than N tiles' worth of tokens; rows with several images get the base tile and a newline
    (`batch_num_images`). Each video is `[frames * k, D]` plus a final newline, which is kept."""

    name = "LLaVA-OneVision"
    classes = ("LlavaOnevisionForConditionalGeneration",)
    packs = True
    video_newline = True
    feature_options = LlavaNextVideoAdapter.feature_options + (
        "vision_aspect_ratio",
        "batch_num_images",
    )

    def _crop_grid(self, model, image_size):
        hc, wc = super()._crop_grid(model, image_size)
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        max_tiles = int(model.config.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(hc * wc / (max_tiles * side**2))
        return (int(hc // ratio), int(wc // ratio)) if ratio > 1.1 else (hc, wc)


ADAPTER = LlavaOnevisionAdapter()
