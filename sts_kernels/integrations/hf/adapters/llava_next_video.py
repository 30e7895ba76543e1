"""LLaVA-NeXT-Video (`LlavaNextVideoForConditionalGeneration`): LLaVA-NeXT's anyres images plus
videos, each frame a pooled square grid, one placeholder run per video."""

from __future__ import annotations

import math

import torch

from ._base import feed_features
from .llava_next import LlavaNextAdapter


class LlavaNextVideoAdapter(LlavaNextAdapter):
    """Images as LLaVA-NeXT. A video's features are `[frames * k, D]` (every frame the
    resampler's square grid of k tokens, no newline): all frames of all videos are pooled (or
    merged, frame by frame) in one call, then with `time_window` consecutive frames are
    averaged (pool mode)."""

    name = "LLaVA-NeXT-Video"
    classes = ("LlavaNextVideoForConditionalGeneration",)
    packs = True
    video = True
    pixel_keys = ("pixel_values", "pixel_values_videos")
    video_newline = False  # LLaVA-OneVision ends each video with one image_newline token
    needs_encoder_outputs = True

    def compress(self, model, compressor, kw):
        shrinks = {}
        if kw.get("pixel_values") is not None:
            shrinks["image"] = self._compress_images(model, compressor, kw)
        if kw.get("pixel_values_videos") is not None:
            shrinks["video"] = self._compress_videos(model, compressor, kw)
        return kw, shrinks

    def _compress_videos(self, model, compressor, kw) -> tuple[int, int]:
        pixels = kw["pixel_values_videos"]  # [videos, frames, C, H, W]
        features = model.model.get_video_features(
            pixels,
            vision_feature_layer=kw.get("vision_feature_layer"),
            vision_feature_select_strategy=kw.get("vision_feature_select_strategy"),
            return_dict=True,
        )
        videos = features.pooler_output  # [videos, frames * k (+ newline), D]
        tokens = videos[:, :-1] if self.video_newline else videos
        frames = pixels.shape[1]
        k = tokens.shape[1] // frames
        side = math.isqrt(k)
        outs = compressor.compress_many(
            [v.view(frames, k, -1) for v in tokens], [(side, side)] * len(videos)
        )
        compressed = [o.x.reshape(-1, o.x.shape[-1]) for o in outs]
        if self.video_newline:  # the model's own newline row back after the pooled frames
            compressed = torch.cat([torch.stack(compressed), videos[:, -1:]], 1)
        token_id = model.config.video_token_id
        return feed_features(
            model, kw, "video", features, compressed, token_id, "pixel_values_videos"
        )


ADAPTER = LlavaNextVideoAdapter()
