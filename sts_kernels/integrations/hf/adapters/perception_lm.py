"""PerceptionLM (`PerceptionLMForConditionalGeneration`): images as tiles (a base view and
crops) and videos as frames, each tile / frame a square grid that the projector has already
average-pooled by `projector_pooling_ratio`; VTC pools (or merges) every grid again."""

from __future__ import annotations

from ._base import TiledAdapter, takes_encoder_outputs


class PerceptionLMAdapter(TiledAdapter):
    """`pixel_values` `[images, tiles, C, H, W]`; `get_image_features` returns
    `[images * tiles, k, D]`. An image's placeholders are one run of tiles * k: each k of them
    (one tile) keeps its first k', which leaves the run tiles * k' long, in tile order. Videos
    (`pixel_values_videos` `[videos, frames, C, H, W]`) go through the same getter, one run of
    frames * k video placeholders a video: every frame is compressed like a tile."""

    name = "PerceptionLM"
    classes = ("PerceptionLMForConditionalGeneration",)
    packs = True
    video = True
    pixel_keys = ("pixel_values", "pixel_values_videos")

    frame_window_reason = (
        "every video frame is compressed on its own grid; averaging frames is not implemented "
        "for it"
    )

    def compress(self, model, compressor, kw):
        videos = kw.get("pixel_values_videos") is not None
        # transformers without mm_encoder_outputs fetch video features through the image
        # getter, which one answered call cannot tell from the images' own; refused before
        # the images are answered (an answer left behind would serve the next forward)
        if videos and not takes_encoder_outputs(model):
            raise ValueError(
                f"compress: {self.name} videos need a transformers whose models take "
                "mm_encoder_outputs (5.24 does, 5.17 not)"
            )
        shrinks = {}
        if kw.get("pixel_values") is not None:
            kw, shrinks = super().compress(model, compressor, kw)
        if videos:
            pixels = kw["pixel_values_videos"]
            features = model.model.get_image_features(pixel_values=pixels, return_dict=True)
            token_id = model.config.video_token_id
            shrinks["video"] = self.compress_tiles(
                model, compressor, kw, features, token_id, "video", "pixel_values_videos"
            )
        return kw, shrinks

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
