"""LLaVA-OneVision-1.5 (`LlavaOnevision15ForConditionalGeneration`): Qwen2-VL's dynamic grids
and placeholders (images and videos) with a plain 1-D position LM."""

from __future__ import annotations

from .qwen2_vl import Qwen2VLAdapter


class LlavaOnevision15Adapter(Qwen2VLAdapter):
    """The Qwen2-VL path: each item (video frame) pooled on its merged (h/m, w/m) grid, its
    placeholders one run. Positions are 1-D (the model numbers `arange(T)` itself): the
    pooled grids reported back in `image_grid_thw` / `video_grid_thw` are read by nothing;
    caller `position_ids` are renumbered like any family's. Merge mode: each item (frame)
    merged on its own; with no M-RoPE (`mrope = False`) there are no anchor positions to
    keep, the shrunk sequence is numbered like a pooled one."""

    name = "LLaVA-OneVision-1.5"
    classes = ("LlavaOnevision15ForConditionalGeneration",)
    packs = True
    mrope = False


ADAPTER = LlavaOnevision15Adapter()
