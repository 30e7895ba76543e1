"""The text side of VTC: shrink a batch's placeholders to the compressed visual tokens, and map
tensors between the caller's layout [B, T] and the language model's [B, T'].

Plain functions returning values: a shrink returns its column map (`columns`), the adapters
return it to the handle, which composes the maps of one forward (`compose_columns`) into
`StsReport.columns`.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .packing import padding_columns, segment_starts


@torch.compiler.disable  # output shapes depend on the data: eager under torch.compile
def shrink_placeholders(
    input_ids: Tensor,
    image_token_id: int,
    n_in: list[int],
    n_out: list[int],
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    position_ids: Tensor | None = None,
    mm_token_type_ids: Tensor | None = None,
    pad_token_id: int = 0,
    segments: Tensor | None = None,
) -> dict[str, Tensor | None]:
    """Keep the first `n_out[k]` of image k's `n_in[k]` placeholders and drop the others.

    Images are numbered in row-major order over `input_ids` [B, L] (the order the model fills
    placeholders in). Padding (attention_mask == 0; in packed rows with `labels`, segments
    of `pad_token_id` only and no target) is dropped too and rows are re-padded to
    the longest one, on the left if any row of the batch starts with padding, else on the
    right. `position_ids` [B or 1, L] (and the text row of [4, B, L] ones) are renumbered (each
    position minus the tokens removed before it in its segment: `segments` [B, L], packed rows,
    see `packing.py`); M-RoPE rows keep their kept columns. Returns the shrunk tensors by name; an `attention_mask` is created
    when the input had none and (unpacked) rows end up of different lengths. `columns` [B, new_len]: the
    caller's column each new column came from (see `_column_map`); `segments` [B, new_len]
    moved along (-1 on re-padding) when given.
    """
    b, length = input_ids.shape
    dev = input_ids.device
    counts_in = torch.tensor(n_in, device=dev)
    counts_out = torch.tensor(n_out, device=dev)
    slots = (input_ids == image_token_id).reshape(-1).nonzero().squeeze(1)  # [sum n_in]
    if slots.numel() != sum(n_in):
        raise ValueError(
            f"input_ids hold {slots.numel()} image placeholders (id {image_token_id}), the "
            f"images need {sum(n_in)}"
        )
    image_of = torch.repeat_interleave(torch.arange(len(n_in), device=dev), counts_in)
    rank = torch.arange(slots.numel(), device=dev) - (counts_in.cumsum(0) - counts_in)[image_of]
    dropped = torch.zeros(b * length, dtype=torch.bool, device=dev)
    dropped[slots[rank >= counts_out[image_of]]] = True
    dropped = dropped.view(b, length)
    keep = ~dropped
    if attention_mask is not None:  # padding goes; a kept placeholder stays even if masked
        keep &= attention_mask.bool() | (input_ids == image_token_id)
    elif segments is not None and labels is not None:
        # packed: segments of padding only go (earlier re-padding too); without labels a
        # sample made only of the pad id could not be told from padding, so they stay
        keep &= ~padding_columns(input_ids, segments, pad_token_id, labels)
    left = attention_mask is not None and bool((attention_mask[:, 0] == 0).any())
    row_len = keep.sum(1)  # [B]
    new_len = int(row_len.max())
    shift = (new_len - row_len)[:, None] if left else 0
    dest = keep.long().cumsum(1) - 1 + shift  # [B, L] new column of each kept token
    dest = torch.where(keep, dest, new_len)  # everything else lands in a scratch column

    def move(t: Tensor, fill) -> Tensor:  # t [..., B, L] -> [..., B, new_len]
        lead = t.shape[:-2]
        out = torch.full((*lead, b, new_len + 1), fill, dtype=t.dtype, device=t.device)
        out.scatter_(-1, dest.expand(*lead, b, length), t.expand(*lead, b, length))
        return out[..., :new_len]

    out: dict[str, Tensor | None] = {"input_ids": move(input_ids, pad_token_id)}
    out["columns"] = _column_map(keep, dest, new_len, slots, (counts_in - counts_out)[image_of])
    if attention_mask is not None:
        out["attention_mask"] = move(attention_mask, 0)
    elif segments is None and bool((row_len != new_len).any()):
        # (packed rows get none: transformers reads packing from positions only without a
        # mask; re-padding, at position 0, is a segment of its own)
        out["attention_mask"] = move(torch.ones_like(input_ids), 0)
    else:
        out["attention_mask"] = None
    out["labels"] = None if labels is None else move(labels, -100)
    out["mm_token_type_ids"] = None if mm_token_type_ids is None else move(mm_token_type_ids, 0)
    if position_ids is None:
        out["position_ids"] = None
    else:
        # 1-D positions (and the text row of [4, B, L] M-RoPE ones): close the gaps left by
        # the removed tokens, counted from the start of each packed sample; M-RoPE rows: the
        # kept columns (the adapter rebuilds them for the pooled grids)
        removed_before = dropped.long().cumsum(1) - dropped.long()
        if segments is not None:
            removed_before = removed_before - removed_before.gather(1, segment_starts(segments))
        if position_ids.dim() == 2:  # [B or 1, L]
            out["position_ids"] = move(position_ids.expand(b, length) - removed_before, 0)
        else:
            shifted = position_ids.expand(-1, b, length).clone()
            if shifted.shape[0] == 4:
                shifted[0] -= removed_before
            out["position_ids"] = move(shifted, 0)
    if segments is not None:
        out["segments"] = move(segments, -1)
    return out


def _column_map(keep: Tensor, dest: Tensor, new_len: int, slots, surplus) -> Tensor:
    """This shrink's column map [B, new_len]: the source column of every new column, -1 for
    re-padding. A kept placeholder maps `surplus` columns later, to the last `kept` columns of
    its image, so that the logit predicting the text after an image
    lands next to that text when the logits are expanded back."""
    b, length = keep.shape
    source = torch.arange(length, device=dest.device).repeat(b)  # [B * L]
    source[slots] += surplus  # dropped slots are never read below
    cols = torch.full((b, new_len + 1), -1, dtype=torch.long, device=dest.device)
    cols.scatter_(1, dest, torch.where(keep, source.view(b, length), -1))
    return cols[:, :new_len]


def compose_columns(maps: list[Tensor]) -> Tensor | None:
    """One column map from the successive shrinks of one forward (images, then videos); None
    entries (a modality that shrank no sequence) are skipped."""
    maps = [m for m in maps if m is not None]
    if not maps:
        return None
    cols = maps[0]
    for later in maps[1:]:  # later [B, T''] indexes the previous layout
        cols = torch.where(later >= 0, cols.gather(1, later.clamp_min(0)), -1)
    return cols


def expand_columns(x: Tensor, cols: Tensor, length: int) -> Tensor:
    """x [B, T', ...] in the LM's layout -> [B, length, ...] in the caller's; zeros in the
    columns the shrink dropped (image placeholders, whose labels LLaVA-style training sets to
    -100, and padding)."""
    dest = torch.where(cols >= 0, cols, length)  # re-padding lands in a scratch column
    dest = dest.view(*cols.shape, *([1] * (x.dim() - 2))).expand_as(x)
    out = x.new_zeros(x.shape[0], length + 1, *x.shape[2:])
    return out.scatter(1, dest, x)[:, :length]


def pad_id(model) -> int:
    """The token id rows are (re-)padded with: the LM's pad_token_id, else 0."""
    config = getattr(model.config, "text_config", model.config)
    return getattr(config, "pad_token_id", None) or 0


@torch.compiler.disable  # host read
def count_placeholders(input_ids: Tensor, token_ids: dict[str, int]) -> dict[str, int]:
    """{modality: placeholders of its token id in `input_ids`}, one host read."""
    if not token_ids:
        return {}
    counts = torch.stack([(input_ids == i).sum() for i in token_ids.values()]).tolist()
    return dict(zip(token_ids, counts))


def check_target_count(
    before: Tensor | None, mask: Tensor | None, after: Tensor | None, num_items
) -> None:
    """Placeholders VTC drops should not be loss targets (-100, as LLaVA's recipe has it): a
    loss normalised by a count of the caller's labels (`num_items_in_batch`: the Trainer, TRL)
    would be silently scaled by kept / counted. Raises when the model itself is handed such a
    count, warns otherwise (TRL normalises outside the model). The shrink drops placeholders
    and padding (`mask` 0), so targets on padding do not count here. One host read."""
    if before is None or after is None:
        return
    targets = before != -100
    on_padding = (targets & ~mask.bool()).sum() if mask is not None else 0
    lost = int(targets.sum() - (after != -100).sum())  # one read: padding + placeholders
    if not lost:
        return
    on_padding = int(on_padding)
    message = (
        f"apply_sts: VTC dropped {lost - on_padding} visual placeholder and {on_padding} "
        "padding tokens whose labels are loss targets (not -100); a loss normalised by the "
        "caller's target count (num_items_in_batch) is scaled down by the dropped share. Set "
        "the labels of image/video placeholder and padding tokens to -100 in your collator."
    )
    if num_items is not None:
        raise ValueError(message)
    warnings.warn(message, stacklevel=2)
