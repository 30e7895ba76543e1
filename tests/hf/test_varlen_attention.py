"""The CPU flash-attention-varlen oracle (tests/varlen_attention.py) against SDPA on small
tensors: two packed segments == each segment alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from varlen_attention import register, varlen_attention  # noqa: E402


class _Module(torch.nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.is_causal = causal


def _sdpa(q, k, v, causal, scale, window=None):
    """[1, H, T, D] reference: SDPA with GQA (keys repeated), output [1, T, H, D]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    t = q.shape[2]
    mask = None
    if window is not None:
        i = torch.arange(t)
        d = i[:, None] - i[None, :]
        mask = (d >= 0) & (d < window) if causal else d.abs() < window
        causal = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    return out.transpose(1, 2)


def _qkv(lengths, h=4, hk=2, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    return [torch.randn(1, n, t, d, generator=gen) for n in (h, hk, hk)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("how", ["cu_seq_lens", "position_ids"])
def test_two_segments_equal_each_alone(causal, how):
    lengths = [5, 7]
    q, k, v = _qkv(lengths)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    if how == "cu_seq_lens":
        kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7)
    else:
        if not causal:
            pytest.skip("position restarts mark text (causal) segments only")
        kw = dict(position_ids=torch.cat([torch.arange(5), torch.arange(7)])[None])
    # a padding mask is ignored when cu_seq_lens are given
    mask = torch.ones(1, 12, dtype=torch.bool) if how == "position_ids" else torch.ones(1, 12)
    out, _ = varlen_attention(_Module(causal), q, k, v, mask, scaling=0.3, **kw)
    expected = torch.cat(
        [
            _sdpa(q[:, :, s], k[:, :, s], v[:, :, s], causal, 0.3)
            for s in (slice(0, 5), slice(5, 12))
        ],
        1,
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_cu_seq_lens_flatten_over_batch():
    """cu_seq_lens over the flattened [B * T] tokens, like flash_attn_varlen_func: a segment
    may even cross a row boundary."""
    q, k, v = (x.view(x.shape[1], 2, 6, -1).transpose(0, 1) for x in _qkv([12]))
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)
    out, _ = varlen_attention(_Module(True), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    flat = [x.transpose(0, 1).reshape(1, x.shape[1], 12, -1) for x in (q, k, v)]
    expected = torch.cat(
        [_sdpa(*(x[:, :, s] for x in flat), True, None) for s in (slice(0, 4), slice(4, 12))], 1
    )
    torch.testing.assert_close(out.reshape(1, 12, 4, -1), expected, rtol=1e-5, atol=1e-6)


def test_plain_causal_padding_mask_and_window():
    q, k, v = _qkv([9])
    out, _ = varlen_attention(_Module(True), q, k, v, None)
    torch.testing.assert_close(out, _sdpa(q, k, v, True, None), rtol=1e-5, atol=1e-6)
    # sliding window: flash's (w - 1, w - 1) == the last w keys, the query's own included
    out, _ = varlen_attention(_Module(True), q, k, v, None, sliding_window=4)
    torch.testing.assert_close(out, _sdpa(q, k, v, True, None, window=4), rtol=1e-5, atol=1e-6)
    # left padding: the valid tokens alone, zeros on the padded queries
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out, _ = varlen_attention(_Module(True), q, k, v, mask)
    expected = _sdpa(q[:, :, 2:], k[:, :, 2:], v[:, :, 2:], True, None)
    torch.testing.assert_close(out[:, 2:], expected, rtol=1e-5, atol=1e-6)
    assert out[:, :2].abs().max() == 0


def test_vision_tower_ignores_foreign_cu_seq_lens():
    """A non-causal call (a tower splitting per image itself) handed the text's cu_seq_lens,
    which do not cover its tokens: full attention over its own inputs."""
    q, k, v = _qkv([6])
    cu = torch.tensor([0, 20, 31], dtype=torch.int32)
    out, _ = varlen_attention(_Module(False), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    torch.testing.assert_close(out, _sdpa(q, k, v, False, None), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cu_seq_lens"):
        varlen_attention(_Module(True), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)


def test_registered_for_models():
    from transformers import AttentionInterface

    name = register()
    assert AttentionInterface._global_mapping[name] is varlen_attention
