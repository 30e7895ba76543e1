"""Mistral 3 (`Mistral3ForConditionalGeneration`) and LLaVA with a Pixtral tower: one grid per
image, sized by `image_sizes`, laid out as the Pixtral processor does: `[IMG_BREAK]` after
every row of placeholders, `[IMG_END]` instead of the last one."""

from __future__ import annotations

import torch

from ._base import Adapter, Shrink, feed_features


class Mistral3Adapter(Adapter):
    """Image k is an `(H_k / step, W_k / step)` grid (step: the Pixtral patch times Mistral 3's
    `spatial_merge_size`), its features row-major. Pooled, the text becomes the layout the
    processor builds for the pooled grid: a break after every pooled row, the end last
    (`feed_rows`). Merged, every row is merged on its own (an item of W tokens: `ratio`, `r`
    and `protected` apply per row), so the grid keeps its H rows, each W' tokens and its
    marker — the layout of an (H, W') grid; tokens never merge across a row break. The break /
    end ids are not in the config: they are the tokens after each row's placeholders."""

    name = "Mistral 3"
    classes = ("Mistral3ForConditionalGeneration",)
    packs = True

    def step(self, config) -> int:
        """Pixels per visual token along each side."""
        return config.vision_config.patch_size * config.spatial_merge_size

    def image_features(self, model, kw, image_sizes):
        return model.model.get_image_features(
            pixel_values=kw["pixel_values"],
            image_sizes=image_sizes,
            vision_feature_layer=kw.get("vision_feature_layer"),
            return_dict=True,
        )

    def compress(self, model, compressor, kw):
        pixels, image_sizes = kw["pixel_values"], kw.get("image_sizes")
        if image_sizes is None:  # Pixtral's own default: every image the full pixel size
            image_sizes = torch.tensor([pixels.shape[-2:]] * len(pixels), device=pixels.device)
        features = self.image_features(model, kw, image_sizes)
        step = self.step(model.config)
        grids = [(int(h) // step, int(w) // step) for h, w in image_sizes.tolist()]
        images = features.pooler_output  # per image [h * w, D], row-major
        if compressor.mode == "merge":  # every row its own item: rows and markers stay
            rows = [f.view(h, w, -1) for f, (h, w) in zip(images, grids)]
            outs = compressor.compress_many(rows, [None] * len(rows))
            kept = [tuple(o.x.shape[:2]) for o in outs]  # (h, w') per image
        else:
            outs = compressor.compress_many([f[None] for f in images], grids)
            kept = [o.grid for o in outs]
        compressed = [o.x.reshape(-1, o.x.shape[-1]) for o in outs]
        token_id = model.config.image_token_id
        shrink = feed_rows(model, kw, features, compressed, grids, kept, token_id)
        return kw, {"image": shrink}


def feed_rows(model, kw, features, compressed, grids, kept, token_id: int) -> Shrink:
    """`feed_features` for a layout with a marker after every row of placeholders (break, and
    end after the last row): image k on `grids[k]` = (h, w) keeps its first h' rows' markers
    but the last, that row's end marker, and the first w' placeholders of each of those rows
    (`kept[k]` = (h', w'), h' <= h, w' <= w: a pooled grid, or h rows merged to w' tokens
    each) — the processor's layout for the kept grid, selected column by
    column (labels and masks of the markers move with them).

    How: the breaks of rows h'-1 .. h-2 are dropped as if they were placeholders (counted into
    the run of rows h'-1 .. h-1, which keeps its first w'); the shrunk ids are the original
    columns. ValueError when a row's placeholders are not followed by a marker."""
    ids = kw["input_ids"]
    flat = ids.reshape(-1)
    slots = (flat == token_id).nonzero().squeeze(1)
    n_in, n_out, row_ends, dropped = [], [], [], []
    start = 0
    for (h, w), (hp, wp) in zip(grids, kept):
        ends = [start + w * (r + 1) - 1 for r in range(h)]  # slot of each row's last token
        row_ends += ends
        dropped += ends[hp - 1 : h - 1]
        n_in += [w] * (hp - 1) + [w * (h - hp + 1) + h - hp]
        n_out += [wp] * hp
        start += h * w
    if start != slots.numel():
        raise ValueError(
            f"input_ids hold {slots.numel()} image placeholders (id {token_id}), the images "
            f"need {start}"
        )
    markers = slots[torch.tensor(row_ends, device=ids.device)] + 1
    beyond = markers >= flat.numel()
    if bool((beyond | (flat[markers.clamp_max(flat.numel() - 1)] == token_id)).any()):
        raise ValueError(
            "compress: every row of an image's placeholders must be followed by a marker "
            "([IMG_BREAK], [IMG_END] after the last row), as the Pixtral processor lays them out"
        )
    relabeled = flat.clone()
    relabeled[slots[torch.tensor(dropped, device=ids.device, dtype=torch.long)] + 1] = token_id
    kw["input_ids"] = relabeled.view_as(ids)
    shrink = feed_features(model, kw, "image", features, compressed, token_id, runs=(n_in, n_out))
    return Shrink(start, sum(hp * wp for hp, wp in kept), shrink.columns)


class LlavaPixtralAdapter(Mistral3Adapter):
    """`LlavaForConditionalGeneration` with a Pixtral tower (no class token, whatever
    `vision_feature_select_strategy` says: "full" is the only one its features allow); the
    LLaVA adapter hands such models to this one."""

    name = "LLaVA (Pixtral tower)"
    classes = ()  # reached through the LLaVA adapter

    def step(self, config) -> int:
        return config.vision_config.patch_size

    def image_features(self, model, kw, image_sizes):
        return model.model.get_image_features(
            pixel_values=kw["pixel_values"],
            vision_feature_layer=kw.get("vision_feature_layer"),
            vision_feature_select_strategy=kw.get("vision_feature_select_strategy"),
            image_sizes=image_sizes,
            return_dict=True,
        )


ADAPTER = Mistral3Adapter()
LLAVA_PIXTRAL = LlavaPixtralAdapter()
