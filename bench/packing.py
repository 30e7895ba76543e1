"""Packed (padding-free) rows the way `transformers.DataCollatorWithFlattening(
return_flash_attn_kwargs=True)` lays them out, for the demo's `--packed` (bench/demo.py) and the
packing tests (tests/packed_batches.py imports these).

`pack(samples, model)`: ONE row of single-row samples: input_ids concatenated, position_ids
restarting at 0 per sample, cu_seq_lens_q/k (int32), max_length_q/k (ints), labels with each
sample's first label -100, no attention_mask; visual inputs concatenated in sample order. Qwen
families: position_ids [4, 1, T] (text row + the 3 M-RoPE rows of `model.model.get_rope_index`
on each sample alone: transformers' Qwen text models split a [4, B, T] position_ids into
`position_ids[0]`, used for the masks / varlen, and `position_ids[1:]` for M-RoPE) and
mm_token_type_ids. `split_rows(batch)`: a padded-free batch of equal rows cut into those
single-row samples. `summed_loss(logits, labels)`: (summed CE over the shifted targets, target
count), so that packed loss == sum of the samples' summed losses / their total targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def split_rows(batch: dict) -> list[dict]:
    """The rows of an unpadded batch as single-row samples (for `pack`): per-token tensors
    [B, T] cut by row; `pixel_values` by image, or (Qwen's flat patches, with `image_grid_thw`)
    by each image's patch count."""
    b = batch["input_ids"].shape[0]
    grids = batch.get("image_grid_thw")
    counts = grids.prod(-1).tolist() if grids is not None else None
    starts = [0, *torch.tensor(counts).cumsum(0).tolist()] if counts else None
    out = []
    for i in range(b):
        sample = {}
        for key, value in batch.items():
            if key == "pixel_values" and starts is not None:
                sample[key] = value[starts[i] : starts[i + 1]]
            elif isinstance(value, torch.Tensor):
                sample[key] = value[i : i + 1]
        out.append(sample)
    return out
