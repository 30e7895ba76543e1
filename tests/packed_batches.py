"""Packed (padding-free) batches of the tiny VLMs in hf_models, and their unpacked reference.

`samples(family, model)`: single-sample batches (one row, no padding) built with hf_models'
helpers: an image row with several images, an image (+ video) row, a text-only row.
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
    llava_batch,
    llava_next_batch,
    make_gemma3,
    make_internvl,
    make_llava,
    make_llava_next,
    make_qwen2_5_vl,
    make_qwen2_vl,
    make_qwen3_vl,
    make_smolvlm,
    qwen_batch,
)

from bench.packing import mrope_rows, pack, segments_of, summed_loss

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
PROJECTORS = ("multi_modal_projector", "connector", "visual.merger")

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
    """The first `rows` single-sample batches of `family` (one row each, no padding)."""
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
    else:
        out = [_tiled_sample(family, row, seed) for seed, row in enumerate(TILED_ROWS)]
    return out[:rows]


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
    inner = model.model
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
    "QWEN",
    "mrope_rows",
    "pack",
    "packed_loss",
    "projector",
    "projector_grads",
    "samples",
    "segments_of",
    "summed_loss",
    "unpacked_loss",
]
