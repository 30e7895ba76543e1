"""A CPU oracle for flash-attention varlen semantics, as a transformers attention function.

`register()` adds the implementation "sts_varlen" to `transformers.AttentionInterface` (and
`flash_attention_mask` under the same name to `AttentionMaskInterface`, so the attention gets a
2-D padding mask or None, never a 4-D mask: it decides the segments itself). Then
`model.set_attn_implementation("sts_varlen")`, or `attn_implementation="sts_varlen"`.

How a call decides its segments (the token -> segment map over the batch flattened to
[B * T], like `flash_attn_varlen_func`), first that applies:

1. `cu_seq_lens_q` / `cu_seq_lens_k` in the kwargs and ending at B * T_q / B * T_k: those
   boundaries; the attention mask is ignored (the brief's rule; transformers' flash path would
   unpad by a mask with padding first, but its mask function turns an all-ones mask into None).
   A non-causal call (vision tower) uses them only when they end at its own length: towers
   that split per image themselves (the non-flash path of the Qwen towers) receive the text's
   kwargs and must not apply them.
2. A 2-D padding mask: every row's valid tokens one segment (padded queries give zeros).
3. `position_ids` [1, T] (B == 1) that restart: a segment starts wherever the position equals
   the minimum (transformers' `prepare_fa_kwargs_from_position_ids`).
4. Otherwise every batch row is one segment.

Within a segment: causal (bottom-right aligned when T_q != T_k, like flash) unless the call is
non-causal (`is_causal=False` or `module.is_causal` False: vision towers, full attention),
flash's sliding window `(w - 1, w - 1)` when the keys are longer than `w`, softcap, GQA
(key/value heads repeated), `scaling` (default D ** -0.5). Returns ([B, T_q, H, D], None).
Every call's segment layout is appended to `CALLS` while `record()` is active.
"""

from __future__ import annotations

import contextlib

import torch

NAME = "sts_varlen"
CALLS: list[dict] | None = None
_LAYOUT_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "position_ids", "cu_seqlens")


def _segments_from_cu(cu: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment id, index within the segment) of each of n flattened tokens."""
    cu = cu.to(torch.long)
    idx = torch.arange(n)
    seg = torch.bucketize(idx, cu[1:], right=True)
    return seg, idx - cu[seg]


def _segments(
    b: int, t: int, cu, mask: torch.Tensor | None, position_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(segment, local index, valid) per flattened token, and which rule decided."""
    n = b * t
    valid = torch.ones(n, dtype=torch.bool)
    if cu is not None:
        seg, local = _segments_from_cu(cu, n)
        return seg, local, valid, "cu_seq_lens"
    rows = torch.arange(b).repeat_interleave(t)
    if mask is not None:
        m = mask[:, -t:].to(torch.bool)
        local = (m.long().cumsum(-1) - 1).reshape(-1)
        return rows, local, m.reshape(-1), "attention_mask"
    if (
        position_ids is not None
        and b == 1
        and position_ids.ndim == 2
        and position_ids.shape[-1] == t
    ):
        pos = position_ids.reshape(-1)
        starts = pos == pos.min()
        starts[0] = True
        if bool(starts[1:].any()):
            cu = torch.cat([starts.nonzero().view(-1), torch.tensor([n])])
            seg, local = _segments_from_cu(cu, n)
            return seg, local, valid, "position_ids"
    return rows, torch.arange(t).repeat(b), valid, "rows"


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    b, h, tq, d = query.shape
    hk, tk = key.shape[1], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is not None and attention_mask.ndim != 2:
        raise ValueError(f"{NAME} expects a 2-D padding mask or None, got {attention_mask.shape}")
    if attention_mask is not None and attention_mask.all():
        attention_mask = None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    given = sorted(k for k in _LAYOUT_KWARGS if kwargs.get(k) is not None)
    if cu_q is not None and (cu_k is None or int(cu_q[-1]) != b * tq or int(cu_k[-1]) != b * tk):
        if causal:
            raise ValueError(
                f"{NAME}: cu_seq_lens_q/k end at {int(cu_q[-1])}/"
                f"{None if cu_k is None else int(cu_k[-1])}, the tokens are {b * tq}/{b * tk}"
            )
        cu_q = cu_k = None  # a tower splitting per image itself, handed the text's kwargs
    if cu_q is None:
        cu_k = None
    # position restarts mark text segments only (a tower is never handed its own)
    position_ids = kwargs.get("position_ids") if causal else None
    seg_q, loc_q, ok_q, rule = _segments(b, tq, cu_q, attention_mask, position_ids)
    seg_k, loc_k, ok_k, _ = _segments(b, tk, cu_k, attention_mask, position_ids)
    if CALLS is not None:
        CALLS.append(
            dict(
                module=type(module).__name__,
                causal=causal,
                rule=rule,
                shape=(b, tq, tk),
                given=given,
                segments=int(seg_q.max()) + 1,
            )
        )

    allowed = (seg_q[:, None] == seg_k[None, :]) & ok_q[:, None] & ok_k[None, :]
    # bottom-right alignment: query i of a segment sits at key i + (len_k - len_q)
    nseg = int(max(seg_q.max(), seg_k.max())) + 1
    len_q = torch.zeros(nseg, dtype=torch.long).index_add_(0, seg_q, ok_q.long())
    len_k = torch.zeros(nseg, dtype=torch.long).index_add_(0, seg_k, ok_k.long())
    q_at = loc_q + (len_k - len_q)[seg_q]
    diff = q_at[:, None] - loc_k[None, :]  # > 0: key before the query
    if causal:
        allowed &= diff >= 0
    if sliding_window is not None and b * tk > sliding_window:
        allowed &= diff <= sliding_window - 1
        if not causal:
            allowed &= diff >= -(sliding_window - 1)

    q = query.transpose(0, 1).reshape(h, b * tq, d)
    k = key.transpose(0, 1).reshape(hk, b * tk, d).repeat_interleave(h // hk, 0)
    v = value.transpose(0, 1).reshape(hk, b * tk, -1).repeat_interleave(h // hk, 0)
    scores = (q @ k.transpose(-1, -2)) * (d**-0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), -1).nan_to_num(0.0).to(v.dtype)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, dropout)
    out = probs @ v  # [H, B*Tq, Dv]
    return out.reshape(h, b, tq, -1).permute(1, 2, 0, 3).contiguous(), None


def register(name: str = NAME) -> str:
    """Register the oracle (idempotent); returns its name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    AttentionInterface.register(name, varlen_attention)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


@contextlib.contextmanager
def record():
    """Collect every oracle call's layout (module class, causal, rule, shape, segments)."""
    global CALLS
    previous, CALLS = CALLS, []
    try:
        yield CALLS
    finally:
        CALLS = previous
