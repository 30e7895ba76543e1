"""Packed (padding-free) batches of the tiny VLMs in hf_models, and their unpacked reference.

`samples(family, model)`: single-sample batches (one row, no padding) built with hf_models'
helpers: an image row with several images, an image (+ video) row, a text-only row; for the
families of ROW_CASES, the rows of their CASES batch cut apart (`row_samples`).
`pack(samples, model)`: ONE row the way `DataCollatorWithFlattening(return_flash_attn_kwargs=
True)` lays it out: input_ids concatenated, position_ids restarting at 0 per sample,
cu_seq_lens_q/k (int32), max_length_q/k (ints), labels with each sample's first label -100,
no attention_mask; visual inputs concatenated in sample order. Qwen families: position_ids
[4, 1, T] (text row + the 3 M-RoPE rows of `model.model.get_rope_index` on each sample alone:
transformers' Qwen text models split a [4, B, T] position_ids into `position_ids[0]`, used
for the masks / varlen, and `position_ids[1:]` for M-RoPE) and mm_token_type_ids.
`summed_loss(logits, labels)`: (summed CE over the shifted targets, target count), so that
packed loss == sum of the samples' summed losses / their total targets, exactly.
"""

from __future__ import annotations

import torch
from hf_models import (
    CASES,
    IMG,
    LLAVA_NEXT_SIZES,
    LLAVA_ROWS,
    QWEN3_ROWS,
    QWEN3_VIDEOS,
    QWEN_IMAGES,
    QWEN_ROWS,
    QWEN_VIDEOS,
    TILED_ROWS,
    build_ids,
    glm4v_batch,
    llava_batch,
    llava_next_batch,
    make_gemma3,
    make_glm4v,
    make_internvl,
    make_llava,
    make_llava_next,
    make_llava_pixtral,
    make_qwen2_5_vl,
    make_qwen2_vl,
    make_qwen3_vl,
    make_smolvlm,
    perception_lm_video_batch,
    pixtral_batch,
    qwen_batch,
)

from bench.packing import mrope_rows, segments_of, summed_loss
from bench.packing import pack as _pack_layout

MAKERS = {
    "llava": make_llava,
    "llava_next": make_llava_next,
    "qwen2_vl": make_qwen2_vl,
    "qwen2_5_vl": make_qwen2_5_vl,
    "qwen3_vl": make_qwen3_vl,
    "internvl": make_internvl,
    "gemma3": make_gemma3,
    "smolvlm": make_smolvlm,
}
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# the module whose gradients the patched tests compare
PROJECTORS = (
    "multi_modal_projector",
    "connector",
    "visual.merger",
    "aligner",
    "visual_embeddings_table",
)

# Families packed from their CASES batch (tests/hf_models.py, right-padded), cut into one sample
# a row: (registered class, {visual input: its items (dim 0) in each row}); the visual inputs
# not listed are per row (dim 0 the batch: Idefics2's [B, images, 3, H, W]) or per token.
# `pixel_values` with grids (Qwen-style flat patches): the patches of the row's grids.
_IMAGES, _TILES = [2, 1, 0], [3, 1, 0]  # LLAVA_ROWS' images; an image of 3 tiles, one of 1
_NEXT = {
    "pixel_values": [1, 0, 1, 0],
    "image_sizes": [1, 0, 1, 0],
    "pixel_values_videos": [0, 1, 1, 0],
}
_QWEN_LIKE = {"image_grid_thw": [1, 1, 0], "video_grid_thw": [0, 1, 0]}
ROW_CASES = {
    "llava_next_video": ("LlavaNextVideoForConditionalGeneration", _NEXT),
    "llava_onevision": (
        "LlavaOnevisionForConditionalGeneration",
        _NEXT | {"pixel_values": [1, 0, 2, 0], "image_sizes": [1, 0, 2, 0]},
    ),
    "mistral3": (
        "Mistral3ForConditionalGeneration",
        {"pixel_values": _IMAGES, "image_sizes": _IMAGES},
    ),
    # LLaVA's class with a Pixtral tower: the Mistral 3 path (row markers, image_sizes)
    "llava_pixtral": (
        "LlavaForConditionalGeneration",
        {"pixel_values": _IMAGES, "image_sizes": _IMAGES},
    ),
    "vipllava": ("VipLlavaForConditionalGeneration", {"pixel_values": _IMAGES}),
    "fast_vlm": ("FastVlmForConditionalGeneration", {"pixel_values": _IMAGES}),
    "perception_lm": ("PerceptionLMForConditionalGeneration", {"pixel_values": _IMAGES}),
    # an image + a video row, a video row, a text row (PLM_ROWS)
    "perception_lm_video": (
        "PerceptionLMForConditionalGeneration",
        {"pixel_values": [1, 0, 0], "pixel_values_videos": [1, 1, 0]},
    ),
    "aya_vision": ("AyaVisionForConditionalGeneration", {"pixel_values": _IMAGES}),
    "cohere2_vision": ("Cohere2VisionForConditionalGeneration", {"pixel_values": _IMAGES}),
    "paligemma": ("PaliGemmaForConditionalGeneration", {"pixel_values": [1, 2, 0]}),
    "janus": ("JanusForConditionalGeneration", {"pixel_values": _IMAGES}),
    "llama4": ("Llama4ForConditionalGeneration", {"pixel_values": _TILES}),
    "ovis2": ("Ovis2ForConditionalGeneration", {"pixel_values": _TILES}),
    "idefics2": ("Idefics2ForConditionalGeneration", {}),
    "deepseek_vl": ("DeepseekVLForConditionalGeneration", {"pixel_values": _IMAGES}),
    "got_ocr2": ("GotOcr2ForConditionalGeneration", {"pixel_values": _IMAGES}),
    "glm4v": ("Glm4vForConditionalGeneration", {"image_grid_thw": [1, 1, 0]}),
    "glm4v_moe": ("Glm4vMoeForConditionalGeneration", {"image_grid_thw": [1, 1, 0]}),
    # a video row (2 frames, each its own run) and a text row; videos never share its batch
    "glm4v_video": ("Glm4vForConditionalGeneration", {"video_grid_thw": [1, 0]}),
    "llava_onevision1_5": ("LlavaOnevision15ForConditionalGeneration", _QWEN_LIKE),
    "lfm2_vl": (
        "Lfm2VlForConditionalGeneration",
        {k: _TILES for k in ("pixel_values", "spatial_shapes", "pixel_attention_mask")},
    ),
}
for _family, (_cls, _) in ROW_CASES.items():
    MAKERS[_family] = CASES[_cls].make
MAKERS["glm4v_moe"] = lambda attn="sdpa": make_glm4v(attn, moe=True)
MAKERS["llava_pixtral"] = make_llava_pixtral


def family_class(family: str) -> str:
    """The registered class `family`'s tiny model is built as (no model built)."""
    if family in ROW_CASES:
        return ROW_CASES[family][0]
    return next(cls for cls, case in CASES.items() if case.make is MAKERS[family])


# models without sdpa in transformers 5.25 (their towers): the reference attention is eager
EAGER = ("gemma3", "fast_vlm", "got_ocr2")

# (images, videos) of each row, Qwen: QWEN_ROWS / QWEN3_ROWS
_QWEN_ITEMS = [(QWEN_IMAGES[:1], []), (QWEN_IMAGES[1:], QWEN_VIDEOS), ([], [])]
_QWEN3_ITEMS = [(QWEN_IMAGES[:1], []), (QWEN_IMAGES[1:], QWEN3_VIDEOS), ([], [])]


def _images_in(row) -> int:
    return sum(part == "image" for part in row)


def _text_only(row, keep_types: bool = False) -> dict:
    batch = build_ids([row], {}, False)
    if not keep_types:
        del batch["mm_token_type_ids"]
    return batch


def _tiled_sample(family: str, row, seed: int) -> dict:
    k = _images_in(row)
    batch = build_ids([row], {"image": [16] * k}, False)
    types = batch.pop("mm_token_type_ids")
    if family == "gemma3":
        batch["token_type_ids"] = types
    if k:
        gen = torch.Generator().manual_seed(seed)
        pixels = torch.randn(k, 3, 32, 32, generator=gen)
        batch["pixel_values"] = pixels[None] if family == "smolvlm" else pixels
    return batch


def samples(family: str, model, rows: int = 3) -> list[dict]:
    """The first `rows` single-sample batches of `family` (one row each, no padding); ROW_CASES
    families: every row of their CASES batch."""
    out = []
    if family == "llava":
        for row in LLAVA_ROWS:
            k = _images_in(row)
            out.append(llava_batch(False, images=k, rows=[row]) if k else _text_only(row))
    elif family == "llava_next":
        sizes = iter(LLAVA_NEXT_SIZES)
        for row in LLAVA_ROWS:
            k = _images_in(row)
            mine = [next(sizes) for _ in range(k)]
            out.append(llava_next_batch(model, False, mine, [row]) if k else _text_only(row))
    elif family in QWEN:
        frame_runs = family == "qwen3_vl"
        table = QWEN3_ROWS if frame_runs else QWEN_ROWS
        items = _QWEN3_ITEMS if frame_runs else _QWEN_ITEMS
        for row, (images, videos) in zip(table, items):
            out.append(qwen_batch(False, images, videos, rows=[row], frame_runs=frame_runs))
    elif family in ROW_CASES:
        return row_samples(row_batch(family, model), ROW_CASES[family][1])
    else:
        out = [_tiled_sample(family, row, seed) for seed, row in enumerate(TILED_ROWS)]
    return out[:rows]


def row_batch(family: str, model) -> dict:
    """A ROW_CASES family's CASES batch, right-padded: its samples as one padded batch."""
    special = {
        "glm4v_video": lambda: glm4v_batch(False, videos=[(2, 4, 4)]),
        "llava_pixtral": lambda: pixtral_batch(False),
        "perception_lm_video": lambda: perception_lm_video_batch(False),
    }
    if family in special:
        return special[family]()
    return CASES[ROW_CASES[family][0]].batch(model, False)


def _starts(counts) -> list[int]:
    return [0, *torch.tensor(counts).cumsum(0).tolist()]


def row_samples(batch: dict, items: dict[str, list[int]]) -> list[dict]:
    """The rows of a right-padded batch as single-row samples (padding cut off; the demo's
    `bench.packing.split_rows` takes unpadded LLaVA / Qwen rows only): the inputs in
    `items` cut along dim 0 by their count in each row (a row without any: left out),
    `pixel_values` / `pixel_values_videos` beside grids by the patches of the row's grids, the
    other tensors with the batch as dim 0 by row (and their column dim cut to the row's
    length); an all-zero pixel_values row (Idefics2's text-only row) is left out."""
    b, t = batch["input_ids"].shape
    items = dict(items)
    for grids, pixels in (
        ("image_grid_thw", "pixel_values"),
        ("video_grid_thw", "pixel_values_videos"),
    ):
        if grids in items and grids in batch:
            per_item = batch[grids].prod(-1)
            ends = _starts(items[grids])
            items[pixels] = [int(per_item[a:e].sum()) for a, e in zip(ends[:-1], ends[1:])]
    starts = {key: _starts(counts) for key, counts in items.items()}
    out = []
    for i in range(b):
        n, sample = int(batch["attention_mask"][i].sum()), {}
        for key, value in batch.items():
            if key in starts:
                a, e = starts[key][i], starts[key][i + 1]
                if e > a:
                    sample[key] = value[a:e]
            elif value.shape[0] != b:
                sample[key] = value
            elif value.ndim >= 2 and value.shape[1] == t:
                sample[key] = value[i : i + 1, :n]
            elif key != "pixel_values" or bool(value[i].any()):
                sample[key] = value[i : i + 1]
        out.append(sample)
    return out


# inputs that `bench.packing.pack` does not lay out: concatenated along dim 0
_CAT_EXTRA = ("spatial_shapes", "pixel_attention_mask", "batch_num_images")
# classes whose pixel_values [B, images, 3, H, W] hold a row's images (a packed row: all of them)
_IMAGES_IN_ROW = ("SmolVLM", "Idefics3", "Idefics2")


def pack(samples: list[dict], model=None) -> dict:
    """`bench.packing.pack`, and the inputs it does not know: the per-item ones of _CAT_EXTRA,
    5-D pixel_values of image tiles ([images, tiles, 3, H, W]: PerceptionLM) along dim 0, and
    M-RoPE positions only for models with get_rope_index (LLaVA-OneVision-1.5's grids are the
    tower's alone)."""
    inner = getattr(model, "model", model)
    mrope = any("image_grid_thw" in s or "video_grid_thw" in s for s in samples)
    pixels = [s["pixel_values"] for s in samples if "pixel_values" in s]
    tiles = (
        bool(pixels) and pixels[0].ndim == 5 and not type(model).__name__.startswith(_IMAGES_IN_ROW)
    )
    if tiles:
        samples = [{k: v for k, v in s.items() if k != "pixel_values"} for s in samples]
    out = _pack_layout(samples, model, mrope=mrope and hasattr(inner, "get_rope_index"))
    for key in _CAT_EXTRA:
        parts = [s[key] for s in samples if key in s]
        if parts:
            out[key] = torch.cat(parts)
    if tiles:
        out["pixel_values"] = torch.cat(pixels)
    return out


def _labels_for(out, labels: torch.Tensor, handle) -> torch.Tensor:
    """The labels the logits line up with: a patched model (handle) that shrank the row (VTC)
    returns logits for the shrunk row, whose labels are in handle.last_inputs."""
    if handle is not None and out.logits.shape[1] != labels.shape[1]:
        return handle.last_inputs["labels"]
    return labels


def packed_loss(model, packed: dict, handle=None, **extra):
    """(model output, loss from the logits, the model's own .loss)."""
    out = model(**packed, **extra)
    total, count = summed_loss(out.logits, _labels_for(out, packed["labels"], handle))
    return out, total / count, out.loss


def unpacked_loss(model, samples: list[dict], handle=None, **extra):
    """(per-sample outputs, token-weighted loss: summed losses / total targets)."""
    outs, total, count = [], 0.0, 0
    for s in samples:
        out = model(**s, **extra)
        loss, n = summed_loss(out.logits, _labels_for(out, s["labels"], handle))
        outs.append(out)
        total, count = total + loss, count + n
    return outs, total / count


def projector(model) -> torch.nn.Module:
    inner = getattr(model, "model", model)  # Llama 4: the modules on the top model
    for path in PROJECTORS:
        mod = inner
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if mod is not None:
            return mod
    raise AttributeError(f"no projector among {PROJECTORS} in {type(inner).__name__}")


def projector_grads(model) -> dict[str, torch.Tensor]:
    return {
        name: p.grad.clone()
        for name, p in projector(model).named_parameters()
        if p.grad is not None
    }


__all__ = [
    "IMG",
    "MAKERS",
    "family_class",
    "QWEN",
    "mrope_rows",
    "pack",
    "packed_loss",
    "projector",
    "projector_grads",
    "row_batch",
    "samples",
    "segments_of",
    "summed_loss",
    "unpacked_loss",
]
