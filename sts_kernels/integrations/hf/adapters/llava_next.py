"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres images = a base tile plus a grid of
crops, each crop-grid row ended by the learned `image_newline` token."""

from __future__ import annotations

import itertools

import torch

from ._base import Adapter, feed_features


class LlavaNextAdapter(Adapter):
    """The model packs each image as `[base h*w] + [H rows of (W crop tokens + newline)]`,
    (h, w) the tile's patch grid and (H, W) the unpadded crop grid. VTC pools the base on
    (h, w) and the crops on (H, W) (all bases in one call, crops one call per distinct grid),
    then re-packs `[base'] + [H' rows of (W' tokens + newline)]`, so every pooled row still
    ends in a newline. Merge mode merges the base as a whole and every crop row on its own
    (all rows of one width in one call): `[base'] + [H rows of (W' tokens + newline)]`, the
    newlines kept. Two index gathers over the whole batch move tokens in and out of that
    layout: the cost does not grow with the number of images."""

    name = "LLaVA-NeXT"
    classes = ("LlavaNextForConditionalGeneration",)
    packs = True
    # the forward's keyword arguments that `get_image_features` takes too
    feature_options = ("vision_feature_layer", "vision_feature_select_strategy")

    def compress(self, model, compressor, kw):
        return kw, {"image": self._compress_images(model, compressor, kw)}

    def _compress_images(self, model, compressor, kw) -> tuple[int, int]:
        features = self._image_features(model, kw)
        packed = list(features.pooler_output)  # per image [h*w + H*(W+1), D] or [h*w + 1, D]
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        grids = [  # crop grid per image; None: base tile + newline only (multi-image rows)
            None if len(f) == side * side + 1 else self._crop_grid(model, size)
            for f, size in zip(packed, kw["image_sizes"].tolist())
        ]
        for f, grid in zip(packed, grids):
            if grid is not None and len(f) != side * side + grid[0] * (grid[1] + 1):
                raise ValueError(
                    f"compress: a {self.name} image packs {len(f)} tokens, expected "
                    f"{side}x{side} base + {grid[0]}x({grid[1]}+1) crops "
                    "(vision_feature_select_strategy='default')"
                )
        flat = torch.cat(packed)  # [sum n, D]
        bases = compressor.compress_many(
            [f[None, : side * side] for f in packed], [(side, side)] * len(packed)
        )
        items, crop_grids = _gather_crops(flat, packed, grids, side)
        if compressor.mode == "merge":  # every crop row its own item: the rows stay rows
            items = [c.view(h, w, -1) for c, (h, w) in zip(items, crop_grids)]
        crops = compressor.compress_many(items, crop_grids)
        newline = model.model.image_newline.to(flat.dtype)[None]
        compressed = _repack(bases, crops, grids, newline)
        return feed_features(model, kw, "image", features, compressed, model.config.image_token_id)

    def _image_features(self, model, kw):
        options = {name: kw.get(name) for name in self.feature_options}
        return model.model.get_image_features(
            kw["pixel_values"], kw["image_sizes"], **options, return_dict=True
        )

    def _crop_grid(self, model, image_size) -> tuple[int, int]:
        """(H, W) of the unpadded crop grid, as `pack_image_features` computes it."""
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            unpad_image,
        )

        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        tiles_h, tiles_w = get_anyres_image_grid_shape(
            image_size, model.config.image_grid_pinpoints, vision.image_size
        )
        empty = torch.empty(0, tiles_h * side, tiles_w * side, device="meta")
        return tuple(unpad_image(empty, image_size).shape[1:])


def _gather_crops(flat, packed, grids, side):
    """The crop tokens of every image (newlines left out) with one index gather over the
    batch: (items [1, H*W, D], grids) for `compress_many`."""
    starts = [0, *itertools.accumulate(len(f) for f in packed)][:-1]
    with_crops = [(s, g) for s, g in zip(starts, grids) if g is not None]
    if not with_crops:
        return [], []
    rows = [s + side * side + _rows(h, w, w + 1) for s, (h, w) in with_crops]
    crops = flat[_index(rows, flat.device)].split([h * w for _, (h, w) in with_crops])
    return [c[None] for c in crops], [g for _, g in with_crops]


def _repack(bases, crops, grids, newline) -> list:
    """Per image `[base'] + [H' rows of (W' tokens + newline)]` (or `[base', newline]`): the
    pooled pieces and one newline put in a pool, then one gather in each image's layout."""
    import numpy as np

    width = newline.shape[-1]
    pool = torch.cat([*(b.x[0] for b in bases), *(c.x.reshape(-1, width) for c in crops), newline])
    newline_at = len(pool) - 1
    base_len = [b.x.shape[1] for b in bases]
    base_at = [0, *itertools.accumulate(base_len)]
    crop_at = itertools.accumulate([base_at[-1], *(c.x.shape[0] * c.x.shape[1] for c in crops)])
    # pooled: (H', W') of the pooled grid; merged: every row kept, W' tokens each
    crop_grids = iter(c.grid or tuple(c.x.shape[:2]) for c in crops)
    layout, out_len = [], []
    for i, grid in enumerate(grids):
        if grid is None:
            tail = np.array([newline_at])
        else:
            hp, wp = next(crop_grids)
            tail = (next(crop_at) + _rows(hp, wp, wp)).reshape(hp, wp)
            tail = np.concatenate([tail, np.full((hp, 1), newline_at)], 1).ravel()
        layout += [base_at[i] + np.arange(base_len[i]), tail]
        out_len.append(base_len[i] + tail.size)
    return list(pool[_index(layout, pool.device)].split(out_len))


def _rows(h: int, w: int, stride: int):
    """Flat indices of an (h, w) block stored in rows of `stride` entries: [h * w]."""
    import numpy as np

    return (np.arange(h)[:, None] * stride + np.arange(w)).ravel()


def _index(parts, device):
    """One int64 index tensor from host-side numpy pieces (built on the host: no kernels)."""
    import numpy as np

    return torch.as_tensor(np.concatenate(parts), dtype=torch.int64, device=device)


ADAPTER = LlavaNextAdapter()
