"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): dynamic-resolution images and videos, M-RoPE."""

from __future__ import annotations

import torch

from ._base import Adapter, feed_features


class Qwen2VLAdapter(Adapter):
    """The vision merger emits each image / video row-major over (t, h/m, w/m) (`m` =
    spatial_merge_size); every frame is pooled on its own (h/m, w/m) grid, frames of all items
    of one grid in one call, and with `time_window` consecutive frames are averaged. The model
    rebuilds M-RoPE positions from the shrunk ids and the grid we report back in
    `image_grid_thw` / `video_grid_thw` (pooled grid times `m`: `get_rope_index` divides by it),
    so any `position_ids` passed in are dropped. Merge mode has no output grid: pool only."""

    name = "Qwen2-VL"
    classes = ("Qwen2VLForConditionalGeneration",)
    modes = ("pool",)
    mode_reason = "M-RoPE positions need the output grid; merge mode has none"
    video = True
    pixel_keys = ("pixel_values", "pixel_values_videos")
    # modality -> (pixel argument, grid argument, token id attribute, feature getter)
    _INPUTS = {
        "image": ("pixel_values", "image_grid_thw", "image_token_id", "get_image_features"),
        "video": ("pixel_values_videos", "video_grid_thw", "video_token_id", "get_video_features"),
    }

    def compress(self, model, compressor, kw):
        kw["position_ids"] = None
        counts = {}
        for modality, (pixels, grid_key, token_attr, getter) in self._INPUTS.items():
            if kw.get(pixels) is None:
                continue
            thw = kw[grid_key]  # [items, 3] raw-patch grids
            features = getattr(model.model, getter)(kw[pixels], thw, return_dict=True)
            compressed, rope_grid = self._compress_items(model, compressor, features, thw)
            token_id = getattr(model.config, token_attr)
            counts[modality] = feed_features(
                model, kw, modality, features, compressed, token_id, pixels
            )
            kw[grid_key] = torch.tensor(rope_grid, dtype=thw.dtype, device=thw.device)
            if modality == "video" and kw.get("second_per_grid_ts") is not None:
                kw["second_per_grid_ts"] = kw["second_per_grid_ts"] * compressor.time_window
        return kw, counts

    @staticmethod
    def _compress_items(model, compressor, features, thw):
        m = model.config.vision_config.spatial_merge_size
        frames, grids = [], []
        for f, (t, h, w) in zip(features.pooler_output, thw.tolist()):  # f [t*(h/m)*(w/m), D]
            frames.append(f.view(t, (h // m) * (w // m), -1))
            grids.append((h // m, w // m))
        outs = compressor.compress_many(frames, grids)
        compressed = [o.x.reshape(-1, o.x.shape[-1]) for o in outs]
        rope_grid = [(o.x.shape[0], o.grid[0] * m, o.grid[1] * m) for o in outs]
        return compressed, rope_grid


ADAPTER = Qwen2VLAdapter()
