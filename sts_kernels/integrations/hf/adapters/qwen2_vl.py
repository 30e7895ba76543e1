"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): dynamic-resolution images and videos, M-RoPE."""

from __future__ import annotations

import torch

from ._base import Adapter, feed_features, forward_parameters
from .mrope import rebuild_mrope

# Qwen3-VL's and GLM-4V's `frame_window_reason`
TIMESTAMPED_FRAMES = "timestamp text separates video frames; averaging frames would orphan it"


class Qwen2VLAdapter(Adapter):
    """The vision merger emits each image / video row-major over (t, h/m, w/m) (`m` =
    spatial_merge_size); every frame is pooled on its own (h/m, w/m) grid, frames of all items
    of one grid in one call, and with `time_window` consecutive frames are averaged. The model
    rebuilds M-RoPE positions from the shrunk ids and the grid we report back in
    `image_grid_thw` / `video_grid_thw` (pooled grid times `m`: `get_rope_index` divides by it).
    M-RoPE `position_ids` the caller passed ([3 or 4, B, T], e.g. packed rows) are rebuilt the
    same way, segment by segment (`mrope.py`); 1-D ones are renumbered like any family's.
    Pooled video frames are `time_window` times as far apart (`second_per_grid_ts`, default
    1 s). Merge mode (each frame merged on its own) has no output grid: a merged token keeps
    the M-RoPE position of the token it stands at (the destination its sources merged into,
    STS_SPEC §3), and text keeps the positions of the unmerged layout (`mrope = False`: a
    1-D LM numbers the shrunk sequence like a pooled one)."""

    name = "Qwen2-VL"
    classes = ("Qwen2VLForConditionalGeneration",)
    packs = True
    modes = ("pool", "merge")
    video = True
    pixel_keys = ("pixel_values", "pixel_values_videos")
    # modality -> (pixel argument, grid argument, token id attribute, feature getter)
    _INPUTS = {
        "image": ("pixel_values", "image_grid_thw", "image_token_id", "get_image_features"),
        "video": ("pixel_values_videos", "video_grid_thw", "video_token_id", "get_video_features"),
    }

    frame_runs = False  # video placeholders split per frame (Qwen3-VL's timestamps)
    # the LM takes M-RoPE positions from get_rope_index (else 1-D ones it numbers itself, and
    # merge mode leaves positions to the shrink)
    mrope = True

    def compress(self, model, compressor, kw):
        given = kw.get("position_ids")
        rebuild = given is not None and given.dim() == 3  # the caller's M-RoPE positions
        if rebuild and kw.get("pixel_values_videos") is not None:
            _infer_frame_interval(model, kw)
        merge = compressor.mode == "merge" and compressor.active
        anchored = merge and self.mrope  # merged tokens take their anchors' M-RoPE positions
        if anchored:  # the unmerged layout's positions
            kw["position_ids"] = rebuild_mrope(model, kw, text_row=rebuild and given.shape[0] == 4)
        shrinks = {}
        m = model.config.vision_config.spatial_merge_size
        for modality, (pixels, grid_key, token_attr, getter) in self._INPUTS.items():
            if kw.get(pixels) is None:
                continue
            thw = kw[grid_key]  # [items, 3] raw-patch grids
            grids = [(t, h // m, w // m) for t, h, w in thw.tolist()]  # merged-token grids
            features = getattr(model.model, getter)(kw[pixels], thw, return_dict=True)
            outs = _compress_items(compressor, features.pooler_output, grids)
            compressed = [o.x.reshape(-1, o.x.shape[-1]) for o in outs]
            runs = None
            frame_runs = modality == "video" and self.frame_runs  # one placeholder run a frame
            if frame_runs:
                runs = (
                    [h * w for t, h, w in grids for _ in range(t)],
                    [o.x.shape[1] for o in outs for _ in range(o.x.shape[0])],
                )
            self._compress_extra(compressor, features, grids)
            token_id = getattr(model.config, token_attr)
            if anchored:
                kw["position_ids"] = _anchor_positions(kw, token_id, outs, grids, frame_runs)
            shrinks[modality] = feed_features(
                model, kw, modality, features, compressed, token_id, pixels, runs=runs
            )
            if merge:
                continue
            # get_rope_index divides the grid by the merge size again
            rope_grid = [(o.x.shape[0], o.grid[0] * m, o.grid[1] * m) for o in outs]
            kw[grid_key] = torch.tensor(rope_grid, dtype=thw.dtype, device=thw.device)
            if modality == "video":
                self._space_frames(model, kw, len(grids), compressor.time_window)
        if rebuild and not merge:
            kw["position_ids"] = rebuild_mrope(model, kw, text_row=given.shape[0] == 4)
        return kw, shrinks

    @staticmethod
    def _space_frames(model, kw, videos: int, window: int) -> None:
        """A pooled frame stands for `window` frames: their temporal positions are that much
        further apart (models that take `second_per_grid_ts`; absent means 1 s per frame)."""
        if window == 1 or "second_per_grid_ts" not in forward_parameters(model):
            return
        seconds = kw.get("second_per_grid_ts")
        if seconds is None:
            device = kw["video_grid_thw"].device
            seconds = torch.ones(videos, dtype=torch.float32, device=device)
        kw["second_per_grid_ts"] = seconds * window

    def _compress_extra(self, compressor, features, grids) -> None:
        """Compress any further per-token features consistently (Qwen3-VL's DeepStack)."""


def _infer_frame_interval(model, kw) -> None:
    """The caller's M-RoPE positions are rebuilt for the compressed grids from the batch's
    metadata; for a model whose video positions follow `second_per_grid_ts` and a batch that
    does not carry it, read it from the positions: frame f of a video sits at
    floor(f * tokens_per_second * seconds) after frame 0 on the temporal row, so the last
    frame gives it (+ 0.5 undoes the floor; 1 s where a video has one frame)."""
    if (
        "second_per_grid_ts" not in forward_parameters(model)
        or kw.get("second_per_grid_ts") is not None
    ):
        return
    pos, grids = kw["position_ids"], kw["video_grid_thw"]
    temporal = pos[pos.shape[0] - 3].reshape(-1)  # the temporal row of [3 or 4, B, T]
    slots = (kw["input_ids"] == model.config.video_token_id).reshape(-1).nonzero().squeeze(1)
    m = model.config.vision_config.spatial_merge_size
    per_second = model.config.vision_config.tokens_per_second
    seconds, start = [], 0
    for t, h, w in grids.tolist():
        frame = h * w // (m * m)
        last = temporal[slots[start + (t - 1) * frame]] - temporal[slots[start]]
        seconds.append((float(last) + 0.5) / ((t - 1) * per_second) if t > 1 else 1.0)
        start += t * frame
    kw["second_per_grid_ts"] = torch.tensor(seconds, device=grids.device)


def _anchor_positions(kw, token_id: int, outs, grids, frame_runs: bool) -> torch.Tensor:
    """`kw["position_ids"]` [3 or 4, B, T] with the M-RoPE rows of the placeholder that frame f's
    j-th merged token will fill set to those of the placeholder it stands at (frame f's
    `CompressedTokens.anchors[f, j]`). The filled placeholders are the ones the shrink keeps:
    an item's first t * n_out (`j + f * n_out` within the item), or with `frame_runs` (one
    placeholder run a frame) every frame's first n_out (`j + f * h * w`)."""
    pos = kw["position_ids"]
    rows = pos.shape[0]
    flat = pos.reshape(rows, -1).clone()  # [R, B * T]
    slots = (kw["input_ids"] == token_id).reshape(-1).nonzero().squeeze(1)  # row-major
    first = rows - 3  # the M-RoPE rows (after the text row of a [4, B, T] layout)
    start = 0
    for out, (t, h, w) in zip(outs, grids):
        n_out = out.anchors.shape[1]
        frame = torch.arange(t, device=slots.device)[:, None]
        anchors = (out.anchors.to(slots.device) + frame * (h * w)).reshape(-1)
        kept = torch.arange(n_out, device=slots.device) + frame * (h * w if frame_runs else n_out)
        item = slots[start : start + t * h * w]  # the item's placeholders, in order
        flat[first:, item[kept.reshape(-1)]] = pos.reshape(rows, -1)[first:, item[anchors]]
        start += t * h * w
    return flat.view_as(pos)


def _compress_items(compressor, items, grids, metrics=None):
    """Each item [t*h*w, D] as t frames of (h, w), one compressor call per distinct grid;
    `metrics` (merge mode): per item [t*h*w, C], what chooses the pairs (default the items)."""
    if metrics is not None:
        metrics = _frames(metrics, grids)
    return compressor.compress_many(_frames(items, grids), [(h, w) for _, h, w in grids], metrics)


def _frames(items, grids):
    """Each item [t*h*w, D] as its t frames [t, h*w, D]."""
    return [f.view(t, h * w, -1) for f, (t, h, w) in zip(items, grids)]


ADAPTER = Qwen2VLAdapter()
