"""LLaVA-OneVision-1.5 (`LlavaOnevision15ForConditionalGeneration`): Qwen2-VL's dynamic grids
and placeholders (images and videos) with a plain 1-D position LM."""

from __future__ import annotations

from .qwen2_vl import Qwen2VLAdapter


class LlavaOnevision15Adapter(Qwen2VLAdapter):
    """The Qwen2-VL path: each item (video frame) pooled on its merged (h/m, w/m) grid, its
    placeholders one run. Positions are 1-D (the model numbers `arange(T)` itself): the
    pooled grids reported back in `image_grid_thw` / `video_grid_thw` are read by nothing;
    caller `position_ids` are renumbered like any family's. Merge mode: the shared Qwen merge
    path calls `get_rope_index`, which this model has not."""

    name = "LLaVA-OneVision-1.5"
    classes = ("LlavaOnevision15ForConditionalGeneration",)
    packs = False  # packed rows not tested for this family yet
    modes = ("pool",)
    mode_reason = "the Qwen2-VL merge path rebuilds M-RoPE positions, which this 1-D LM has none of"


ADAPTER = LlavaOnevision15Adapter()
