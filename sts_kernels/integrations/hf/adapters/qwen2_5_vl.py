"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): Qwen2-VL's layout with a window-attention
vision tower, whose merger output is already restored to row-major (t, h/m, w/m) order."""

from __future__ import annotations

from .qwen2_vl import Qwen2VLAdapter


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Same placeholders and M-RoPE as Qwen2-VL; video positions also scale with
    `second_per_grid_ts`, which the Qwen2-VL adapter multiplies by `time_window`."""

    name = "Qwen2.5-VL"
    classes = ("Qwen2_5_VLForConditionalGeneration",)


ADAPTER = Qwen2_5_VLAdapter()
