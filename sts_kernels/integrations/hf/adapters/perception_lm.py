"""PerceptionLM (`PerceptionLMForConditionalGeneration`): images as tiles (a base view and
crops), each tile a square grid that the projector has already average-pooled by
`projector_pooling_ratio`; VTC pools (or merges) every tile's grid again."""

from __future__ import annotations

from ._base import TiledAdapter


class PerceptionLMAdapter(TiledAdapter):
    """`pixel_values` `[images, tiles, C, H, W]`; `get_image_features` returns
    `[images * tiles, k, D]`. An image's placeholders are one run of tiles * k: each k of them
    (one tile) keeps its first k', which leaves the run tiles * k' long, in tile order. Videos
    (`pixel_values_videos`, frames as tiles) reach the LM uncompressed."""

    name = "PerceptionLM"
    classes = ("PerceptionLMForConditionalGeneration",)
    video_reason = "videos (frames as tiles) reach the LM uncompressed; images are compressed"

    def tokens_per_tile(self, model):
        tower, ratio = model.model.vision_tower, model.config.projector_pooling_ratio
        timm_model = getattr(tower, "timm_model", None)  # the released towers: timm ViTs
        if timm_model is not None:
            h, w = timm_model.patch_embed.grid_size
        else:
            vision = model.config.vision_config
            h = w = vision.image_size // vision.patch_size
        return (h // ratio) * (w // ratio)


ADAPTER = PerceptionLMAdapter()
