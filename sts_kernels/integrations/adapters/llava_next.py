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
    ends in a newline. Two index gathers over the whole batch move tokens in and out of that
    layout: the cost does not grow with the number of images. Merge mode would leave no rows
    for the newlines: pool only."""

    name = "LLaVA-NeXT"
    classes = ("LlavaNextForConditionalGeneration",)
    modes = ("pool",)
    mode_reason = "image_newline ends every row of the crop grid; merged tokens have no rows"

    def compress(self, model, compressor, kw):
        return kw, {"image": self._compress_images(model, compressor, kw)}

    def _compress_images(self, model, compressor, kw) -> tuple[int, int]:
        import numpy as np  # layout indices are built on the host; numpy comes with transformers

        inner = model.model
        strategy = kw.get("vision_feature_select_strategy")
        features = inner.get_image_features(
            kw["pixel_values"],
            kw["image_sizes"],
            vision_feature_layer=kw.get("vision_feature_layer"),
            vision_feature_select_strategy=strategy,
            return_dict=True,
        )
        packed = list(features.pooler_output)  # per image [h*w + H*(W+1), D]
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        crop_grids = [self._crop_grid(model, size) for size in kw["image_sizes"].tolist()]
        lengths = [f.shape[0] for f in packed]
        for n, (hc, wc) in zip(lengths, crop_grids):
            if n != side * side + hc * (wc + 1):
                raise ValueError(
                    f"compress: a LLaVA-NeXT image packs {n} tokens, expected {side}x{side} "
                    f"base + {hc}x({wc}+1) crops (vision_feature_select_strategy='default')"
                )
        flat = torch.cat(packed)  # [sum n, D]
        starts = [0, *itertools.accumulate(lengths)][:-1]
        crop_rows = [s + side * side + _rows(h, w, w + 1) for s, (h, w) in zip(starts, crop_grids)]
        crops = flat[_index(crop_rows, flat.device)]  # [sum H*W, D]: newlines left out
        crops = crops.split([h * w for h, w in crop_grids])
        base = [f[None, : side * side] for f in packed]
        bases = compressor.compress_many(base, [(side, side)] * len(packed))
        pooled = compressor.compress_many([c[None] for c in crops], crop_grids)

        # re-pack: bases, crops and one newline in a pool, then gather each image's layout
        newline = inner.image_newline.to(flat.dtype)[None]
        pool = torch.cat([*(b.x[0] for b in bases), *(p.x[0] for p in pooled), newline])
        base_len = [b.x.shape[1] for b in bases]
        base_at = [0, *itertools.accumulate(base_len)]
        crop_at = [
            base_at[-1] + n for n in itertools.accumulate([0, *(p.x.shape[1] for p in pooled)])
        ]
        layout, out_len = [], []
        for i, p in enumerate(pooled):
            (hp, wp), newline_at = p.grid, len(pool) - 1
            rows = (crop_at[i] + _rows(hp, wp, wp)).reshape(hp, wp)
            rows = np.concatenate([rows, np.full((hp, 1), newline_at)], 1)  # [H', W' + 1]
            layout += [base_at[i] + np.arange(base_len[i]), rows.ravel()]
            out_len.append(base_len[i] + rows.size)
        compressed = list(pool[_index(layout, pool.device)].split(out_len))
        return feed_features(model, kw, "image", features, compressed, model.config.image_token_id)

    @staticmethod
    def _crop_grid(model, image_size) -> tuple[int, int]:
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


def _rows(h: int, w: int, stride: int):
    """Flat indices of an (h, w) block stored in rows of `stride` entries: [h * w]."""
    import numpy as np

    return (np.arange(h)[:, None] * stride + np.arange(w)).ravel()


def _index(parts, device):
    """One int64 index tensor from host-side numpy pieces (built on the host: no kernels)."""
    import numpy as np

    return torch.as_tensor(np.concatenate(parts), dtype=torch.int64, device=device)


ADAPTER = LlavaNextAdapter()
