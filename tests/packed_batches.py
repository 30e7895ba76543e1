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
import torch.nn.functional as F
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


def mrope_rows(model, sample: dict) -> torch.Tensor:
    """[3, 1, n]: the M-RoPE positions `model.model.get_rope_index` gives the sample alone
    (a text-only sample: arange on all three rows, as the model infers it)."""
    n = sample["input_ids"].shape[1]
    grids = {k: sample.get(k) for k in ("image_grid_thw", "video_grid_thw")}
    if all(g is None for g in grids.values()):
        return torch.arange(n).view(1, 1, n).expand(3, 1, n).clone()
    positions, _ = model.model.get_rope_index(
        sample["input_ids"],
        mm_token_type_ids=sample["mm_token_type_ids"],
        attention_mask=sample["attention_mask"],
        **grids,
    )
    return positions


_CAT0 = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
_CAT1 = ("mm_token_type_ids", "token_type_ids")


def pack(samples: list[dict], model=None, mrope: bool | None = None) -> dict:
    """One packed row of `samples` (DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    layout + the visual inputs). `mrope` (default: the samples carry grids): [4, 1, T]
    position_ids from `model`."""
    lengths = [s["input_ids"].shape[1] for s in samples]
    for s in samples:
        if "attention_mask" in s and not bool(s["attention_mask"].all()):
            raise ValueError("pack() takes unpadded single-row samples")
    labels = []
    for s in samples:
        lab = s["labels"].clone()
        lab[:, 0] = -100  # the collator's separator
        labels.append(lab)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    text_pos = torch.cat([torch.arange(n) for n in lengths])[None]
    out = {
        "input_ids": torch.cat([s["input_ids"] for s in samples], 1),
        "labels": torch.cat(labels, 1),
        "position_ids": text_pos,
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu.clone(),
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }
    if mrope is None:
        mrope = any("image_grid_thw" in s or "video_grid_thw" in s for s in samples)
    if mrope:
        rows = torch.cat([mrope_rows(model, s) for s in samples], -1)
        out["position_ids"] = torch.cat([text_pos[None], rows])  # [4, 1, T]
    for key in _CAT0:
        parts = [s[key] for s in samples if key in s]
        if parts:
            # SmolVLM's [1, images, 3, H, W] (no image_sizes; LLaVA-NeXT's is [images,
            # tiles, 3, H, W]): the images of all samples in the one row
            in_row = (
                key == "pixel_values"
                and parts[0].ndim == 5
                and not any("image_sizes" in s for s in samples)
            )
            out[key] = torch.cat(parts, 1 if in_row else 0)
    for key in _CAT1:
        if any(key in s for s in samples):
            out[key] = torch.cat([s.get(key, torch.zeros_like(s["input_ids"])) for s in samples], 1)
    return out


def segments_of(packed: dict) -> list[slice]:
    cu = packed["cu_seq_lens_q"].tolist()
    return [slice(a, b) for a, b in zip(cu[:-1], cu[1:])]


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of the next-token CE over the targets != -100, their count), in float32."""
    shift_logits = logits[:, :-1].flatten(0, 1).float()
    targets = labels[:, 1:].flatten()
    loss = F.cross_entropy(shift_logits, targets, ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


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
