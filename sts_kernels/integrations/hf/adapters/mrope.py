"""M-RoPE positions (Qwen-VL families) for a shrunk batch, rebuilt the way the model numbers a
sample: per row, and per packed sample (segment) inside a row, each numbered from 0 by the
model's own `get_rope_index` on that sample's ids and its items' (pooled) grids."""

from __future__ import annotations

from itertools import accumulate
from typing import Any

import torch
from torch import Tensor, nn

from ..packing import segment_ids

# modality -> (token type id, grid argument, token id attribute)
_ITEMS = {
    "image": (1, "image_grid_thw", "image_token_id"),
    "video": (2, "video_grid_thw", "video_token_id"),
}


@torch.compiler.disable  # host loops over rows and segments
def rebuild_mrope(model: nn.Module, kw: dict[str, Any], text_row: bool) -> Tensor:
    """`[3, B, T]` (or `[4, B, T]` with the 1-D text positions first, as packed collators give
    them) positions of `kw["input_ids"]`: every segment (`packing.segment_ids`; else every row)
    numbered from 0 by `model.model.get_rope_index`, with the grids and `second_per_grid_ts` of
    the items whose placeholders it holds, in order. Padding gets 0."""
    ids = kw["input_ids"]
    b, t = ids.shape
    types = kw.get("mm_token_type_ids")
    if types is None:  # collators that precompute positions may send no type ids
        types = torch.zeros_like(ids)
        for type_id, _, token_attr in _ITEMS.values():
            types = torch.where(ids == getattr(model.config, token_attr), type_id, types)
    mask = kw.get("attention_mask")
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    segments = segment_ids(kw)
    segments = torch.zeros_like(ids) if segments is None else segments
    m = model.config.vision_config.spatial_merge_size
    items = {}  # modality -> (grid rows, cumulative placeholder counts, next item)
    for modality, (_, grid_key, _) in _ITEMS.items():
        grid = kw.get(grid_key)
        if grid is not None:
            counts = (grid.prod(-1) // (m * m)).tolist()
            items[modality] = [grid, [0, *accumulate(counts)], 0]
    seconds = kw.get("second_per_grid_ts")
    rope_index = model.model.get_rope_index
    out = torch.zeros(4, b, t, dtype=ids.dtype, device=ids.device)
    for row in range(b):
        for segment in torch.unique_consecutive(segments[row][valid[row]]).tolist():
            cols = ((segments[row] == segment) & valid[row]).nonzero().squeeze(1)
            seg_types = types[row, cols]
            args = {}
            for modality, entry in items.items():
                grid, bounds, first = entry
                type_id, grid_key, _ = _ITEMS[modality]
                tokens = bounds[first] + int((seg_types == type_id).sum())
                if tokens not in bounds:
                    raise ValueError(
                        f"position_ids: row {row}, packed sample {segment} holds {modality} "
                        "placeholders that do not add up to whole items of "
                        f"{grid_key}; each sample must hold all of its items' placeholders"
                    )
                last = bounds.index(tokens)
                entry[2] = last
                if last > first:
                    args[grid_key] = grid[first:last]
                    if modality == "video" and seconds is not None:
                        args["second_per_grid_ts"] = seconds[first:last]
            pos, _ = rope_index(ids[row, cols][None], seg_types[None], **args)
            out[1:, row, cols] = pos[:, 0].to(out.dtype)
            out[0, row, cols] = torch.arange(len(cols), device=ids.device, dtype=out.dtype)
    return out if text_row else out[1:]
