"""GLM-4.1V / GLM-4.5V (`Glm4vForConditionalGeneration`, `Glm4vMoeForConditionalGeneration`):
Qwen-style merged grids and 3-D positions from `mm_token_type_ids`; video frames are image
tokens (typed 2), each frame a run between timestamp text."""

from __future__ import annotations

import torch

from .qwen2_vl import TIMESTAMPED_FRAMES, Qwen2VLAdapter


class Glm4vAdapter(Qwen2VLAdapter):
    """The Qwen2-VL path: every image (and video frame) pooled on its merged (h/m, w/m) grid,
    the pooled grid reported back times m in `image_grid_thw` / `video_grid_thw`, and the model's
    own `get_rope_index` numbers the shrunk sequence from it (text after an item resumes at
    start + max(h, w) / m of the pooled grid; caller 3-D positions are rebuilt per segment the
    same way). GLM marks video placeholders with the image token id (`mm_token_type_ids` 2
    tells them apart): they are shrunk under `video_token_id` and given back the image id.
    Frames are separated by timestamp text, so averaging frames (`time_window`) is refused.
    Merge mode: Qwen2-VL's anchors (every frame its own placeholder run); GLM's `get_rope_index`
    reads `mm_token_type_ids` and the grids only, never the token ids, so the unmerged layout's
    positions are the same under the swapped video id. The MoE LM's router logits are refused
    under LDS (the handle's `check_router_logits`)."""

    name = "GLM-4V"
    classes = ("Glm4vForConditionalGeneration", "Glm4vMoeForConditionalGeneration")
    frame_window_reason = TIMESTAMPED_FRAMES
    frame_runs = True
    packs = True

    def placeholder_ids(self, model):
        return {"image": model.config.image_token_id}  # video frames are image tokens too

    def compress(self, model, compressor, kw):
        config, types = model.config, kw.get("mm_token_type_ids")
        video = kw.get("pixel_values_videos") is not None and types is not None
        if video:  # video placeholders under their own id while they are shrunk
            frames = (types == 2) & (kw["input_ids"] == config.image_token_id)
            kw["input_ids"] = kw["input_ids"].masked_fill(frames, config.video_token_id)
        kw, shrinks = super().compress(model, compressor, kw)
        if video:
            frames = (kw["mm_token_type_ids"] == 2) & (kw["input_ids"] == config.video_token_id)
            kw["input_ids"] = torch.where(frames, config.image_token_id, kw["input_ids"])
        return kw, shrinks


ADAPTER = Glm4vAdapter()
