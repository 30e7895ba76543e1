"""LLaVA-OneVision-1.5 (`LlavaOnevision15ForConditionalGeneration`): Qwen2-VL's dynamic grids
and placeholders (images and videos) with a plain 1-D position LM."""

from __future__ import annotations

from .qwen2_vl import Qwen2VLAdapter


class LlavaOnevision15Adapter(Qwen2VLAdapter):
    """The Qwen2-VL path: each item (video frame) pooled on its merged (h/m, w/m) grid, its
    placeholders one run. Positions are 1-D (the model numbers `arange(T)` itself): the
    pooled grids reported back in `image_grid_thw` / `video_grid_thw` are read by nothing;
    caller `position_ids` are renumbered like any family's. Merge mode: the shared Qwen path
    reports each item's pooled grid, which merged tokens lack."""

    name = "LLaVA-OneVision-1.5"
    classes = ("LlavaOnevision15ForConditionalGeneration",)
    mode_reason = "the Qwen2-VL adapter it shares reports pooled grids, which merge has none of"


ADAPTER = LlavaOnevision15Adapter()
