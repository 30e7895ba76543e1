"""Qwen3-VL (`Qwen3VLForConditionalGeneration`, `Qwen3VLMoeForConditionalGeneration`): the
Qwen2-VL layout plus DeepStack features, and video frames separated by timestamp text."""

from __future__ import annotations

from .qwen2_vl import Qwen2VLAdapter, _compress_items


class Qwen3VLAdapter(Qwen2VLAdapter):
    """DeepStack adds features of intermediate vision layers to the hidden states of the first
    LM layers at the visual positions, so every DeepStack level is pooled exactly like the main
    tokens (same grids, same windows): the i-th kept token of each level still belongs to the
    i-th kept position. Video frames are separate placeholder runs (a timestamp and vision
    start/end tokens around each), so each frame keeps its own first tokens; averaging frames
    (`time_window`) would need to remove the timestamps of merged frames too and is refused."""

    name = "Qwen3-VL"
    classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    timestamped_frames = True
    frame_runs = True
    modes = ("pool",)
    mode_reason = "DeepStack features would need the same merge at every level"

    needs_encoder_outputs = True

    def _compress_extra(self, compressor, features, grids):
        levels = getattr(features, "deepstack_features", None) or []
        features.deepstack_features = [
            [o.x.reshape(-1, o.x.shape[-1]) for o in _compress_items(compressor, level, grids)]
            for level in levels
        ]


ADAPTER = Qwen3VLAdapter()
