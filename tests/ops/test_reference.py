"""The reference ops (`sts_kernels.reference`) against independent formulations of the spec.

Every expected value here is computed another way than the reference computes it: PyTorch's
own pooling, plain Python loops over tokens, ToMe's algorithm, dense masked arithmetic.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from tolerances import DTYPES, assert_close

import sts_kernels
from sts_kernels import _backend, reference

LOWP = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------- token_pool


def pool_avg2d(x: torch.Tensor, grid: tuple[int, int], window: tuple[int, int]) -> torch.Tensor:
    """The spec's formulation: avg_pool2d with ceil_mode and count_include_pad=False."""
    b, _, d = x.shape
    h, w = grid
    img = x.view(b, h, w, d).permute(0, 3, 1, 2)  # [B, D, H, W]
    out = F.avg_pool2d(img, window, window, ceil_mode=True, count_include_pad=False)
    return out.permute(0, 2, 3, 1).reshape(b, -1, d)


POOL_CASES = [
    ((1, 1), (2, 2)),
    ((4, 4), (2, 2)),
    ((6, 4), (3, 2)),
    ((5, 7), (2, 2)),
    ((5, 7), (3, 3)),
    ((3, 2), (5, 4)),  # window larger than the grid in both directions
    ((2, 9), (1, 4)),
    ((7, 1), (2, 1)),
]


def _pool_window_count(grid, window):
    """[N] number of grid tokens in the window each token belongs to, by loops."""
    (h, w), (kh, kw) = grid, window
    counts = []
    for i in range(h):
        for j in range(w):
            r0, c0 = (i // kh) * kh, (j // kw) * kw
            counts.append((min(r0 + kh, h) - r0) * (min(c0 + kw, w) - c0))
    return torch.tensor(counts, dtype=torch.float64)


@pytest.mark.parametrize("grid,window", POOL_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_pool_matches_avg_pool2d(grid, window, dtype):
    x = torch.randn(2, grid[0] * grid[1], 5)
    xd = x.to(dtype)
    out = reference.token_pool(xd, grid, window)
    oh, ow = -(-grid[0] // window[0]), -(-grid[1] // window[1])
    assert out.shape == (2, oh * ow, 5) and out.dtype == dtype
    expected = pool_avg2d(xd.float(), grid, window)
    assert_close(out, expected, reference_lowp=pool_avg2d(xd, grid, window))


def test_token_pool_float64_keeps_float64_precision():
    """A float64 input must be averaged in float64, not rounded through float32."""
    x = 1 + 1e-9 * torch.randn(1, 35, 4, dtype=torch.float64)
    out = reference.token_pool(x, (5, 7), (3, 3))
    torch.testing.assert_close(out, pool_avg2d(x, (5, 7), (3, 3)), atol=1e-12, rtol=1e-12)


def test_token_pool_int_window_and_public_op():
    x = torch.randn(1, 20, 3)
    torch.testing.assert_close(
        sts_kernels.token_pool(x, (4, 5), 2), pool_avg2d(x, (4, 5), (2, 2)), atol=1e-6, rtol=1e-6
    )


@pytest.mark.parametrize("grid,window", POOL_CASES)
def test_token_pool_backward_is_grad_over_count(grid, window):
    x = torch.randn(2, grid[0] * grid[1], 4, requires_grad=True)
    out = reference.token_pool(x, grid, window)
    g = torch.randn_like(out)
    out.backward(g)
    (h, w), (kh, kw) = grid, window
    ow = -(-w // kw)
    dest = [(i // kh) * ow + j // kw for i in range(h) for j in range(w)]
    count = _pool_window_count(grid, window).float()
    expected = g[:, dest] / count[None, :, None]
    torch.testing.assert_close(x.grad, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("grid,window", [((5, 7), (2, 2)), ((3, 3), (3, 3)), ((2, 3), (4, 4))])
def test_token_pool_gradcheck(grid, window):
    x = torch.randn(2, grid[0] * grid[1], 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: reference.token_pool(t, grid, window), (x,))


# ---------------------------------------------------------------------- bipartite_merge


def merge_loops(x, r, metric, size, protected):
    """One sample of the spec, token by token, in float64.

    x [N, D], metric [N, C], size [N]. Returns (x_out [N_out, D], size_out [N_out], index [N]).
    """
    n = x.shape[0]
    x, metric, size = x.double(), metric.double(), size.double()
    r_eff = min(r, (n - protected) // 2)
    if r_eff <= 0:
        return x, size, list(range(n))
    sources = [p for p in range(protected, n) if p % 2 == 0]
    dests = [p for p in range(protected, n) if p % 2 == 1]

    def cos(u, v):
        return float(u @ v) / max(float(u.norm()) * float(v.norm()), 1e-300)

    best, dst_of = {}, {}
    for a in sources:
        for b in dests:  # strictly greater: ties keep the lowest destination
            s = cos(metric[a], metric[b])
            if a not in best or s > best[a]:
                best[a], dst_of[a] = s, b
    ranked = sorted(sources, key=lambda a: (-best[a], a))  # stable descending
    merged = set(ranked[:r_eff])
    kept = [a for a in sources if a not in merged]

    order = list(range(protected)) + kept + dests
    out_pos = {p: i for i, p in enumerate(order)}
    rows, sizes = [], []
    for p in order:
        if p in dests:
            group = [p] + [a for a in sources if a in merged and dst_of[a] == p]
            tot = sum(float(size[q]) for q in group)
            rows.append(sum(size[q] * x[q] for q in group) / tot)
            sizes.append(tot)
        else:
            rows.append(x[p])
            sizes.append(float(size[p]))
    index = [out_pos[dst_of[p]] if p in merged else out_pos[p] for p in range(n)]
    return torch.stack(rows), torch.tensor(sizes, dtype=torch.float64), index


def check_merge(x, r, metric=None, size=None, protected=0):
    """Reference vs loops on every sample: order, size and index exact, values close."""
    res = reference.bipartite_merge(x, r, metric, size, protected)
    b, n, _ = x.shape
    met = x if metric is None else metric
    sz = torch.ones(b, n) if size is None else size
    for i in range(b):
        ex, es, ei = merge_loops(x[i], r, met[i], sz[i], protected)
        assert res.index[i].tolist() == ei, f"sample {i}: index"
        torch.testing.assert_close(res.size[i].double(), es, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(res.x[i].double(), ex, atol=1e-5, rtol=1e-5)
    assert res.index.dtype == torch.int64 and res.index.shape == (b, n)
    return res


@pytest.mark.parametrize("protected", [0, 1, 2])
@pytest.mark.parametrize("n", [9, 10])
@pytest.mark.parametrize("r", [0, 1, 3, "max", 100])
def test_merge_matches_loops(protected, n, r):
    r = (n - protected) // 2 if r == "max" else r
    x = torch.randn(3, n, 4)
    res = check_merge(x, r, protected=protected)
    r_eff = min(r, (n - protected) // 2)
    assert res.x.shape == (3, n - r_eff, 4)
    if r_eff == 0:  # nothing moves
        assert torch.equal(res.x, x) and torch.equal(res.index, torch.arange(n).expand(3, n))
        assert torch.equal(res.size, torch.ones(3, n))


def test_merge_custom_metric_and_size():
    x = torch.randn(2, 11, 3)
    metric = torch.randn(2, 11, 6)
    size = torch.randint(1, 5, (2, 11)).float()
    check_merge(x, 4, metric=metric, size=size, protected=1)


def _one_hot_tokens(codes: list[list[int]], c: int, scale: torch.Tensor | None = None):
    """Metric tokens that are positive multiples of basis vectors: cosines are exactly 0 or 1."""
    m = F.one_hot(torch.tensor(codes), c).float()
    return m if scale is None else m * scale[..., None]


def test_merge_ties_lowest_destination_and_lowest_source():
    # sources 0,2,4,6,8 ; destinations 1,3,5,7
    codes = [[0, 1, 0, 0, 1, 1, 2, 0, 0], [2, 2, 1, 2, 0, 0, 1, 1, 2]]
    metric = _one_hot_tokens(codes, 3, scale=torch.rand(2, 9) + 0.5)
    x = torch.randn(2, 9, 4)
    for r in range(0, 5):
        for protected in (0, 1, 2):
            check_merge(x, r, metric=metric, protected=protected)
    # sample 0: source 0 ties with destinations 3 and 7 -> 3; sources 0, 4, 8 all score 1
    res = reference.bipartite_merge(x, 2, metric)
    assert res.index[0, 0] == res.index[0, 3]  # merged into the lowest of the tied destinations
    assert res.index[0, 2] == res.index[0, 3]  # best ties: the lower sources 0 and 2 go first
    assert res.index[0, 4] == 0 and res.index[0, 8] == 2  # kept 4, 6, 8 lead the output


def test_merge_duplicate_tokens_tie():
    # three distinct +-1 vectors (norm 2: normalising and dotting them is exact), each
    # appearing 4 times, so every source's best score is exactly 1 for several destinations
    base = torch.tensor([[1.0, -1, 1, 1], [-1, -1, 1, -1], [1, 1, 1, -1]])
    x = base[None].repeat(2, 4, 1)
    x[1] = x[1, torch.randperm(12)]
    for r in (1, 3, 6):
        for protected in (0, 1):
            check_merge(x, r, protected=protected)


def test_merge_repeated_calls_accumulate_sizes():
    b, n = 2, 16
    x = torch.randn(b, n, 5)
    first = check_merge(x, 5)
    second = check_merge(first.x, 3, size=first.size)
    total = second.index.gather(1, first.index)  # [B, N] final position of each input token
    for i in range(b):
        for j in range(second.x.shape[1]):
            members = (total[i] == j).nonzero().squeeze(1)
            assert second.size[i, j].item() == members.numel()
            torch.testing.assert_close(second.x[i, j], x[i, members].mean(0), atol=1e-5, rtol=1e-5)
    assert torch.equal(second.size.sum(1), torch.full((b,), float(n)))


@pytest.mark.parametrize("protected", [0, 1, 2])
@pytest.mark.parametrize("r", [0, 2, 5])
def test_unmerge_round_trip(protected, r):
    x = torch.randn(2, 11, 3)
    res = reference.bipartite_merge(x, r, protected=protected)
    back = sts_kernels.unmerge(res.x, res.index)
    assert back.shape == x.shape
    expected = torch.stack([res.x[i, res.index[i]] for i in range(2)])
    assert torch.equal(back, expected)
    if min(r, (11 - protected) // 2) == 0:
        assert torch.equal(back, x)
    # every token that kept its own slot gets its own value back
    alone = torch.stack([torch.bincount(res.index[i], minlength=res.x.shape[1]) for i in range(2)])
    solo = alone.gather(1, res.index) == 1
    assert torch.equal(back[solo], x[solo])


@pytest.mark.parametrize("protected", [0, 1, 2])
def test_merge_gradcheck_x(protected):
    x = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    metric = torch.randn(2, 9, 4, dtype=torch.float64)
    size = torch.rand(2, 9, dtype=torch.float64) + 0.5
    fn = lambda t: reference.bipartite_merge(t, 3, metric, size, protected).x
    assert torch.autograd.gradcheck(fn, (x,))


def test_merge_backward_is_weighted_scatter():
    x = torch.randn(2, 10, 3, requires_grad=True)
    size = torch.randint(1, 4, (2, 10)).float()
    res = reference.bipartite_merge(x, 3, size=size, protected=1)
    g = torch.randn_like(res.x)
    res.x.backward(g)
    # each input token gets size[n] / size_out[j] of its output's gradient
    w = size / res.size.gather(1, res.index)
    expected = g.gather(1, res.index[..., None].expand(-1, -1, 3)) * w[..., None]
    torch.testing.assert_close(x.grad, expected, atol=1e-6, rtol=1e-6)


def test_merge_metric_and_size_get_no_gradient():
    x = torch.randn(2, 10, 3, requires_grad=True)
    metric = torch.randn(2, 10, 4, requires_grad=True)
    size = (torch.rand(2, 10) + 0.5).requires_grad_()
    res = reference.bipartite_merge(x, 3, metric, size)
    grads = torch.autograd.grad(res.x.sum() + res.size.sum(), (metric, size), allow_unused=True)
    assert grads[0] is None, "metric received a gradient"
    assert grads[1] is None, "size received a gradient"


def test_merge_float64_keeps_float64_precision():
    x = 1 + 1e-9 * torch.randn(1, 10, 3, dtype=torch.float64)
    metric = torch.randn(1, 10, 4)  # well-separated scores: the same matching in fp32 and fp64
    check = merge_loops(x[0], 3, metric[0], torch.ones(10), 0)[0]
    out = reference.bipartite_merge(x, 3, metric).x[0]
    torch.testing.assert_close(out, check, atol=1e-13, rtol=1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_dtypes(dtype):
    x = torch.randn(2, 12, 8)
    metric = torch.randn(2, 12, 4)  # fixed matching across dtypes
    res = reference.bipartite_merge(x.to(dtype), 4, metric)
    exp = reference.bipartite_merge(x, 4, metric)
    assert res.x.dtype == dtype and torch.equal(res.index, exp.index)
    # the low-precision reference: the same weighted average computed in `dtype`
    lowp = torch.stack(
        [merge_loops(x[i].to(dtype), 4, metric[i], torch.ones(12), 0)[0] for i in range(2)]
    )
    assert_close(res.x, exp.x, reference_lowp=lowp.to(dtype))


def tome_merge(x, r, class_token=False, distill_token=False):
    """ToMe's bipartite_soft_matching + merge_wavg (facebookresearch/ToMe, tome/merge.py).

    Returns (x, size, unm_idx) with `unm_idx` the source indices ToMe kept, in its order.
    """
    protected = int(class_token) + int(distill_token)
    t = x.shape[1]
    r = min(r, (t - protected) // 2)
    size = torch.ones_like(x[..., 0, None])
    if r <= 0:
        return x, size[..., 0], None
    with torch.no_grad():
        metric = x / x.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(v, mode):
        src, dst = v[..., ::2, :], v[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    xs = merge(x * size, "sum")
    size = merge(size, "sum")
    return xs / size, size[..., 0], unm_idx[..., 0]


@pytest.mark.parametrize("protected", [0, 1, 2])
@pytest.mark.parametrize("r", [0, 3, 6])
def test_merge_matches_tome(protected, r):
    x = torch.randn(3, 14, 8, dtype=torch.float64)
    res = reference.bipartite_merge(x, r, protected=protected)
    tx, ts, unm = tome_merge(x, r, class_token=protected >= 1, distill_token=protected == 2)
    if unm is not None:
        # ToMe: [unmerged sources (in its order, CLS first), destinations (distill first)];
        # the spec: [protected, unmerged sources in position order, destinations]
        n_unm = unm.shape[1]
        perm = torch.cat(
            [unm.argsort(dim=1), n_unm + torch.arange(tx.shape[1] - n_unm).expand(3, -1)], 1
        )
        if protected == 2:  # move the distillation token (first destination) to the front
            perm = torch.cat(
                [perm[:, :1], perm[:, n_unm : n_unm + 1], perm[:, 1:n_unm], perm[:, n_unm + 1 :]], 1
            )
        tx = tx.gather(1, perm[..., None].expand(-1, -1, 8))
        ts = ts.gather(1, perm)
    torch.testing.assert_close(res.x, tx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.size.double(), ts, atol=0, rtol=0)


# ---------------------------------------------------------------------------- route


MASKS = {
    "tokens": lambda: torch.rand(4, 7) < 0.5,
    "samples": lambda: torch.tensor([True, False, True, True, False]),
    "all_true": lambda: torch.ones(3, 5, dtype=torch.bool),
    "all_false": lambda: torch.zeros(3, 5, dtype=torch.bool),
    "all_false_samples": lambda: torch.zeros(4, dtype=torch.bool),
    "b1": lambda: torch.tensor([[False, True, True, False, True]]),
    "t1": lambda: torch.tensor([[True], [False], [True]]),
    "b1_t1": lambda: torch.tensor([[True]]),
    "one_sample_empty": lambda: torch.tensor([[True, True, False], [False, False, False]]),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_route_matches_dense(name):
    mask = MASKS[name]()
    plan = sts_kernels.route(mask)
    b = mask.shape[0]
    flat = mask.reshape(-1).tolist()
    assert plan.index.tolist() == [i for i, m in enumerate(flat) if m]
    assert plan.index.dtype == plan.counts.dtype == plan.offsets.dtype == torch.int64
    per = mask.reshape(b, -1)
    counts = [int(sum(row)) for row in per.tolist()]
    assert plan.counts.tolist() == counts
    assert plan.offsets.tolist() == [sum(counts[:i]) for i in range(b + 1)]
    assert plan.shape == tuple(mask.shape) and plan.num_active == sum(counts)
    assert plan.num_rows == mask.numel() and plan.max_count == max(counts)

    # padded layout by loops
    kmax = max(counts)
    row_len = per.shape[1]
    pad_idx = [[-1] * kmax for _ in range(b)]
    pos = [[0] * kmax for _ in range(b)]
    for i, row in enumerate(per.tolist()):
        kept = [t for t, m in enumerate(row) if m]
        for j, t in enumerate(kept):
            pad_idx[i][j], pos[i][j] = i * row_len + t, t
    assert plan.padded_index.shape == (b, kmax)
    assert plan.padded_index.tolist() == pad_idx
    assert plan.valid.tolist() == [[p >= 0 for p in row] for row in pad_idx]
    assert plan.positions.tolist() == pos


def test_route_reference_equals_public():
    mask = torch.rand(3, 6) < 0.4
    a, b = reference.route(mask), sts_kernels.route(mask)
    for field in ("index", "counts", "offsets"):
        assert torch.equal(getattr(a, field), getattr(b, field))


# ---------------------------------------------------------------------- gather_rows


def gather_dense(x, mask, padded):
    b = mask.shape[0]
    rows = x.reshape(mask.numel(), *x.shape[mask.dim() :])
    if not padded:
        return rows[mask.reshape(-1)]
    per = mask.reshape(b, -1)
    kmax = int(per.sum(1).max())
    out = torch.zeros(b, kmax, *rows.shape[1:], dtype=x.dtype)
    for i in range(b):
        kept = x[i][per[i]]
        out[i, : kept.shape[0]] = kept
    return out


GATHER_CASES = [
    ("tokens", (4, 7, 3), False),
    ("tokens", (4, 7, 3), True),
    ("tokens", (4, 7, 2, 3), True),
    ("samples", (5, 4, 3), False),
    ("all_true", (3, 5, 2), True),
    ("all_false", (3, 5, 2), False),
    ("all_false", (3, 5, 2), True),
    ("t1", (3, 1, 4), True),
    ("one_sample_empty", (2, 3, 4), True),
]


@pytest.mark.parametrize("name,shape,padded", GATHER_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_rows_matches_dense(name, shape, padded, dtype):
    mask = MASKS[name]()
    plan = sts_kernels.route(mask)
    x = torch.randn(shape).to(dtype)
    out = reference.gather_rows(x, plan, padded)
    assert out.dtype == dtype
    assert torch.equal(out, gather_dense(x, mask, padded))  # a gather is exact


@pytest.mark.parametrize("name,shape,padded", GATHER_CASES)
def test_gather_rows_backward_zero_outside_plan(name, shape, padded):
    mask = MASKS[name]()
    plan = sts_kernels.route(mask)
    x = torch.randn(shape, requires_grad=True)
    out = reference.gather_rows(x, plan, padded)
    g = torch.randn_like(out)
    out.backward(g)
    rows_mask = mask.reshape(mask.shape + (1,) * (x.dim() - mask.dim())).expand_as(x)
    assert torch.equal(x.grad[~rows_mask], torch.zeros_like(x.grad[~rows_mask]))
    packed_g = g[plan.valid] if padded else g
    assert torch.equal(x.grad[mask], packed_g)


@pytest.mark.parametrize("padded", [False, True])
def test_gather_rows_gradcheck(padded):
    plan = sts_kernels.route(MASKS["tokens"]())
    x = torch.randn(4, 7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: reference.gather_rows(t, plan, padded), (x,))


# ---------------------------------------------------------------------- skip_residual


def skip_dense(x, delta, mask, gate):
    """`x + mask * gate * delta_scattered` in float64."""
    rows = x.double().reshape(mask.numel(), -1)
    scattered = torch.zeros_like(rows)
    g = torch.ones(delta.shape[0], dtype=torch.float64) if gate is None else gate.double()
    scattered[mask.reshape(-1)] = g[:, None] * delta.double().reshape(delta.shape[0], rows.shape[1])
    return (rows + mask.reshape(-1, 1).double() * scattered).view(x.shape)


def _skip_inputs(mask, feat, dtype=torch.float32, gate=True):
    plan = sts_kernels.route(mask)
    x = torch.randn(*mask.shape, *feat).to(dtype)
    delta = torch.randn(plan.num_active, *feat).to(dtype)
    g = (torch.rand(plan.num_active) + 0.5).to(dtype) if gate else None
    return plan, x, delta, g


def to_padded(delta, plan):
    out = torch.zeros(plan.shape[0], plan.max_count, *delta.shape[1:], dtype=delta.dtype)
    out[plan.valid] = delta
    return out


SKIP_MASKS = ["tokens", "samples", "all_true", "all_false", "b1_t1", "one_sample_empty"]


@pytest.mark.parametrize("name", SKIP_MASKS)
@pytest.mark.parametrize("use_gate", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_skip_residual_matches_dense(name, use_gate, dtype):
    mask = MASKS[name]()
    plan, x, delta, gate = _skip_inputs(mask, (6,), dtype, use_gate)
    x0 = x.clone()
    out = reference.skip_residual(x, delta, plan, gate)
    assert out.dtype == dtype and out.shape == x.shape and torch.equal(x, x0)
    expected = skip_dense(x, delta, mask, gate)
    lowp = None
    if dtype in LOWP:  # the same formula computed in `dtype`
        lowp = x.clone()
        upd = delta * gate[:, None] if use_gate else delta
        lowp.view(-1, 6)[plan.index] = lowp.view(-1, 6)[plan.index] + upd
    assert_close(out, expected.float(), reference_lowp=lowp)
    # skipped rows are x exactly
    assert torch.equal(out[~mask], x[~mask])


@pytest.mark.parametrize("name", ["tokens", "one_sample_empty", "all_false"])
def test_skip_residual_padded_delta(name):
    mask = MASKS[name]()
    plan, x, delta, gate = _skip_inputs(mask, (2, 3))
    padded = to_padded(delta, plan).requires_grad_()
    out = reference.skip_residual(x, padded, plan, gate)
    assert torch.equal(out, reference.skip_residual(x, delta, plan, gate))
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.equal(padded.grad[~plan.valid], torch.zeros_like(padded.grad[~plan.valid]))
    torch.testing.assert_close(padded.grad[plan.valid], gate[:, None, None] * g[mask])


@pytest.mark.parametrize("name", ["tokens", "samples"])
def test_skip_residual_backward_formulas(name):
    mask = MASKS[name]()
    plan, x, delta, gate = _skip_inputs(mask, (5,))
    for t in (x, delta, gate):
        t.requires_grad_()
    out = reference.skip_residual(x, delta, plan, gate)
    g = torch.randn_like(out)
    out.backward(g)
    g_rows = g.reshape(plan.num_rows, 5)[plan.index]  # grad_out[i] for each active row
    assert torch.equal(x.grad, g)
    torch.testing.assert_close(delta.grad, gate.detach()[:, None] * g_rows)
    torch.testing.assert_close(gate.grad, (g_rows * delta.detach()).sum(-1))


@pytest.mark.parametrize("name", ["tokens", "samples", "all_false"])
def test_skip_residual_from_output_formulas(name):
    """from_output: out = x + g * (y - x) on active rows; grad_x = (1 - g) * grad_out there."""
    mask = MASKS[name]()
    plan, x, y, gate = _skip_inputs(mask, (5,), torch.float64)
    for t in (x, y, gate):
        t.requires_grad_()
    out = reference.skip_residual(x, y, plan, gate, from_output=True)
    x_rows = x.detach().reshape(plan.num_rows, 5)[plan.index]
    delta = y.detach() - x_rows
    torch.testing.assert_close(out, skip_dense(x.detach(), delta, mask, gate.detach()))
    g = torch.randn_like(out)
    out.backward(g)
    g_rows = g.reshape(plan.num_rows, 5)[plan.index]
    expected_x = g.clone().reshape(plan.num_rows, 5)
    expected_x[plan.index] = (1 - gate.detach()[:, None]) * g_rows
    torch.testing.assert_close(x.grad, expected_x.view(x.shape))
    torch.testing.assert_close(y.grad, gate.detach()[:, None] * g_rows)
    torch.testing.assert_close(gate.grad, (g_rows * delta).sum(-1))


@pytest.mark.parametrize("name", ["tokens", "samples", "all_false"])
def test_skip_residual_stats_is_cosine(name):
    mask = MASKS[name]()
    plan, x, delta, gate = _skip_inputs(mask, (3, 4))
    out, cos = reference.skip_residual(x, delta, plan, gate, stats=True)
    assert cos.dtype == torch.float32 and cos.shape == (plan.num_active,)
    xa = x[mask].reshape(plan.num_active, 12).double()
    oa = skip_dense(x, delta, mask, gate)[mask].reshape(plan.num_active, 12)
    torch.testing.assert_close(
        cos.double(), F.cosine_similarity(xa, oa, dim=-1), atol=1e-6, rtol=1e-6
    )
    assert torch.equal(out, reference.skip_residual(x, delta, plan, gate))
    _, cos16 = reference.skip_residual(x.half(), delta.half(), plan, gate.half(), stats=True)
    assert cos16.dtype == torch.float32


@pytest.mark.parametrize("padded", [False, True])
def test_skip_residual_gradcheck(padded):
    mask = MASKS["tokens"]()
    plan, x, delta, gate = _skip_inputs(mask, (3,), torch.float64)
    if padded:
        delta = to_padded(delta, plan)
    for t in (x, delta, gate):
        t.requires_grad_()
    fn = lambda a, d, g: reference.skip_residual(a, d, plan, g)
    assert torch.autograd.gradcheck(fn, (x, delta, gate))


# ---------------------------------------------------------------------- public dispatch


def _run_all_ops():
    """Every public op once on fixed CPU inputs; returns a flat list of tensors."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 4, generator=gen)
    mask = torch.rand(2, 12, generator=gen) < 0.5
    plan = sts_kernels.route(mask)
    delta = torch.randn(plan.num_active, 4, generator=gen)
    gate = torch.rand(plan.num_active, generator=gen)
    merged = sts_kernels.bipartite_merge(x, 3, protected=1)
    out, cos = sts_kernels.skip_residual(x, delta, plan, gate, stats=True)
    return [
        sts_kernels.token_pool(x, (3, 4), (2, 2)),
        *merged,
        sts_kernels.unmerge(merged.x, merged.index),
        plan.index,
        plan.counts,
        plan.offsets,
        sts_kernels.gather_rows(x, plan),
        sts_kernels.gather_rows(x, plan, padded=True),
        out,
        cos,
    ]


def _assert_same(results, expected):
    assert len(results) == len(expected)
    for got, exp in zip(results, expected):
        assert got.dtype == exp.dtype
        if exp.is_floating_point():
            assert_close(got, exp)
        else:
            assert torch.equal(got, exp)


def test_backend_reference_equals_auto(monkeypatch):
    monkeypatch.delenv("STS_BACKEND", raising=False)
    auto = _run_all_ops()
    with sts_kernels.use_backend("reference"):
        assert sts_kernels.requested_backend() == "reference"
        _assert_same(_run_all_ops(), auto)
    monkeypatch.setenv("STS_BACKEND", "reference")
    assert sts_kernels.requested_backend() == "reference"
    _assert_same(_run_all_ops(), auto)
    with sts_kernels.use_backend("auto"):  # the context wins over the environment
        assert sts_kernels.requested_backend() == "auto"
        _assert_same(_run_all_ops(), auto)


def test_backend_bogus_name(monkeypatch):
    with pytest.raises(ValueError, match="backend"), sts_kernels.use_backend("bogus"):
        pass
    monkeypatch.setenv("STS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend"):
        sts_kernels.token_pool(torch.randn(1, 4, 2), (2, 2))


def test_reference_always_available():
    assert "reference" in sts_kernels.available_backends("cpu")
    assert _backend.select("token_pool", torch.device("cpu")) == "reference"


def test_imports_and_runs_without_triton(tmp_path):
    """With `triton` unimportable and no extension, every public op still runs on CPU."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None
        import torch
        import sts_kernels
        from sts_kernels import _backend, _triton
        assert not _triton.HAS_TRITON and not _backend.has_triton()
        assert _backend.extension() is None
        assert sts_kernels.available_backends("cpu") == ["reference"]
        x = torch.randn(2, 6, 3)
        assert sts_kernels.token_pool(x, (2, 3)).shape == (2, 2, 3)
        m = sts_kernels.bipartite_merge(x, 2, protected=1)
        assert sts_kernels.unmerge(m.x, m.index).shape == x.shape
        plan = sts_kernels.route(torch.tensor([[True, False] * 3, [False, True] * 3]))
        assert sts_kernels.gather_rows(x, plan).shape == (6, 3)
        assert sts_kernels.gather_rows(x, plan, padded=True).shape == (2, 3, 3)
        out, cos = sts_kernels.skip_residual(x, torch.randn(6, 3), plan, stats=True)
        assert out.shape == x.shape and cos.shape == (6,)
        print("ok")
        """
    )
    env = {**os.environ, "STS_DISABLE_EXT": "1", "TRITON_INTERPRET": "1"}
    env.pop("STS_BACKEND", None)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
