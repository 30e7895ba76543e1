"""Qwen3-VL (`Qwen3VLForConditionalGeneration`, `Qwen3VLMoeForConditionalGeneration`): the
Qwen2-VL layout plus DeepStack features, and video frames separated by timestamp text."""

from __future__ import annotations

from .qwen2_vl import TIMESTAMPED_FRAMES, Qwen2VLAdapter, _compress_items


class Qwen3VLAdapter(Qwen2VLAdapter):
    """DeepStack adds features of intermediate vision layers to the hidden states of the first
    LM layers at the visual positions, so every DeepStack level is compressed exactly like the
    main tokens: pooled on the same grids and windows, or merged with the main features as the
    metric (the pairs depend on the metric alone, so every level merges the same token groups
    into the same slots, unit sizes: the same means). The i-th kept token of each level still
    belongs to the i-th kept position. Video frames are separate placeholder runs (a timestamp
    and vision start/end tokens around each), so each frame keeps its own first tokens (merge
    mode: the anchors' positions follow the same runs); averaging frames (`time_window`) would
    need to remove the timestamps of merged frames too and is refused."""

    name = "Qwen3-VL"
    classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    frame_window_reason = TIMESTAMPED_FRAMES
    frame_runs = True

    needs_encoder_outputs = True

    def _compress_extra(self, compressor, features, grids):
        levels = getattr(features, "deepstack_features", None) or []
        # merge mode: the main tokens choose the pairs of every level
        metrics = features.pooler_output if compressor.mode == "merge" else None
        features.deepstack_features = [
            [
                o.x.reshape(-1, o.x.shape[-1])
                for o in _compress_items(compressor, level, grids, metrics)
            ]
            for level in levels
        ]


ADAPTER = Qwen3VLAdapter()
