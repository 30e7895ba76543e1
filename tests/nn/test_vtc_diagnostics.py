"""bipartite_merge stage by stage, and token_pool at the demo's shapes, on `triton_device`.

On a GPU these say which stage differs from the reference and where: the matcher's (best,
dst), the selection/index kernels given the reference's matching, the counting sort, and the
weighted merge given the reference's index. Shapes cover what failed on the first H100 run
(protected=2, D=16/64, B=3, exact ties) and N that is not a multiple of any tile.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

import sts_kernels
from sts_kernels import reference
from tests.tolerances import DTYPES, LOW_PRECISION, assert_close

merge_module = importlib.import_module("sts_kernels.ops.bipartite_merge")

# (B, N, C, protected): the shapes that failed on the H100 (protected=2 with D=64; D=16 with
# ties; N=33 with C=24; N=35 with C=16), N past one 64/128 tile, N=2
SHAPES = [(3, 64, 64, 2), (3, 30, 16, 0), (3, 30, 16, 1), (2, 33, 24, 1), (2, 35, 16, 1)]
SHAPES += [(2, 131, 40, 2), (1, 2, 8, 0)]


def _sign_tokens(b, n, d, pool, device, generator):
    """Tokens drawn from `pool` distinct +-1 vectors: every product is exact in fp16/bf16 and
    every cosine a multiple of 1/d, so equal scores are bitwise equal on any hardware."""
    vectors = torch.randint(0, 2, (b, pool, d), generator=generator).float() * 2 - 1
    pick = torch.randint(0, pool, (b, n), generator=generator)
    return vectors.gather(1, pick[..., None].expand(-1, -1, d)).to(device)


def _scores(metric, protected):
    """The reference's [B, |A|, |Bd|] fp32 score matrix (what the matcher must reduce)."""
    n = metric.shape[1]
    pos = torch.arange(protected, n, device=metric.device)
    src, dst = pos[pos % 2 == 0], pos[pos % 2 == 1]
    m = F.normalize(metric.float(), dim=-1, eps=1e-12)
    return m[:, src] @ m[:, dst].transpose(1, 2)


def _assert_match(metric, protected, atol=1e-6):
    """Kernel (best, dst) against the reference: best within `atol`; dst exactly where the
    reference's top two scores are more than 2*atol apart, elsewhere any destination whose
    reference score is within 2*atol of the best (fp32 rounding may pick either)."""
    best, dst = torch.ops.sts.bipartite_match_triton(metric, protected)
    best_ref, dst_ref = reference.bipartite_match(metric, protected)
    err = (best - best_ref).abs()
    assert err.max() <= atol, (
        f"matcher best: max error {err.max().item():.3g} at (b, a) = "
        f"{tuple(int(i) for i in torch.nonzero(err == err.max())[0])}"
    )
    scores = _scores(metric, protected)
    top2 = scores.topk(min(2, scores.shape[-1]), dim=-1).values
    clear = (top2[..., 0] - top2[..., -1] > 2 * atol) | (top2.shape[-1] == 1)
    wrong = clear & (dst != dst_ref)
    assert not wrong.any(), (
        f"matcher dst differs at {wrong.sum().item()} clear sources, first (b, a) = "
        f"{tuple(int(i) for i in torch.nonzero(wrong)[0])}: kernel {dst[wrong][0].item()}, "
        f"reference {dst_ref[wrong][0].item()}"
    )
    picked = scores.gather(-1, dst[..., None])[..., 0]
    assert (picked >= best_ref - 2 * atol).all(), "matcher picked a destination that is not a max"
    return best, dst


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("b", "n", "c", "protected"), SHAPES)
def test_stage_match_random(dtype, b, n, c, protected, triton_device):
    metric = torch.randn(b, n, c, device=triton_device).to(dtype)
    _assert_match(metric, protected)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("b", "n", "c", "protected"), SHAPES[:5])
def test_stage_match_exact_ties(dtype, b, n, c, protected, triton_device):
    """Exact ties (tensor-core products are exact here too): the lowest destination wins, and
    equal rows get bitwise-equal best scores. C is a power of 4 so that the reference's
    normalised entries (+-1/sqrt(C)) and their sums are exact too."""
    c = 16 if c not in (16, 64) else c
    g = torch.Generator().manual_seed(b * 1000 + n)
    metric = _sign_tokens(b, n, c, 3, triton_device, g).to(dtype)
    best, dst = torch.ops.sts.bipartite_match_triton(metric, protected)
    best_ref, dst_ref = reference.bipartite_match(metric, protected)
    assert torch.equal(dst, dst_ref), f"tie rule: kernel {dst.tolist()} != ref {dst_ref.tolist()}"
    torch.testing.assert_close(best, best_ref, atol=1e-6, rtol=0)
    # bitwise: the tie rule of the selection stage relies on equal scores staying equal
    assert torch.equal(
        best[..., None] == best[..., None, :], best_ref[..., None] == best_ref[..., None, :]
    )


@pytest.mark.interpreter
def test_stage_match_near_ties(triton_device):
    """Two destinations within ~1e-7 of each other for every source: either may be picked (the
    contract holds up to fp32 rounding), but the pick must be a maximum and best within 1e-6."""
    g = torch.Generator().manual_seed(5)
    b, n, c = 2, 48, 32
    metric = torch.randn(b, n, c, generator=g)
    # odd token 2k+1 = even token 2k plus a tiny perturbation: every source has a
    # near-duplicate destination next to it and another near-duplicate two places on
    metric[:, 1::2] = metric[:, 0::2] + 1e-7 * torch.randn(b, n // 2, c, generator=g)
    metric[:, 3::2] = metric[:, 1:-2:2] * (1 + 1e-7)
    _assert_match(metric.to(triton_device), 0)


@pytest.mark.interpreter
@pytest.mark.parametrize("protected", [0, 1, 2])
@pytest.mark.parametrize("r", [1, 7, 100])
def test_stage_index_given_matching(protected, r, triton_device):
    """sts::merge_index_triton (selection + index kernels) on the reference's matching, with many
    exactly equal best scores (quantised) so the stable tie order decides."""
    g = torch.Generator().manual_seed(r + protected)
    b, n = 3, 67
    na = (n - protected - protected % 2 + 1) // 2
    nb = (n - protected - 1 + protected % 2 + 1) // 2
    best = (torch.randint(0, 5, (b, na), generator=g).float() / 4).to(triton_device)
    dst = torch.randint(0, nb, (b, na), generator=g).to(triton_device)
    r = min(r, (n - protected) // 2)
    index = torch.ops.sts.merge_index_triton(best, dst, n, protected, r)
    expected = reference.merge_index(best, dst, n, protected, r)
    diff = index != expected
    assert not diff.any(), (
        f"index differs at {diff.sum().item()} tokens, first (b, n) = "
        f"{tuple(int(i) for i in torch.nonzero(diff)[0])}: {index[diff][:5].tolist()} vs "
        f"{expected[diff][:5].tolist()}"
    )


@pytest.mark.interpreter
@pytest.mark.parametrize("n_out", [1, 9, 40])
def test_stage_counting_sort(n_out, triton_device):
    """The CSR of an index: stable order by output row and run starts, with out-of-range
    entries (-1, n_out) left out of every segment."""
    g = torch.Generator().manual_seed(n_out)
    index = torch.randint(-1, n_out + 1, (2, 77), generator=g).to(triton_device)
    perm, offsets = merge_module._launch_csr(index, n_out)
    key = torch.where(index < 0, -1, torch.where(index >= n_out, n_out, index))
    assert torch.equal(perm.long(), torch.argsort(key, dim=1, stable=True))
    counts = torch.stack([torch.bincount(k[(k >= 0) & (k < n_out)], minlength=n_out) for k in key])
    starts = (key < 0).sum(1, keepdim=True) + F.pad(counts.cumsum(1), (1, 0))
    assert torch.equal(offsets.long(), starts)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("b", "n", "d", "r", "protected"), [(3, 64, 64, 20, 2), (3, 30, 16, 14, 1)]
)
def test_stage_wavg_given_index(dtype, b, n, d, r, protected, triton_device):
    """sts::merge_wavg_triton on the reference's index: the weighted means and sizes alone, with long
    segments (r = 14 of 15 sources into few destinations in the second case)."""
    g = torch.Generator().manual_seed(n)
    metric = _sign_tokens(b, n, 8, 3, triton_device, g)
    x = torch.randn(b, n, d, generator=g).to(triton_device).to(dtype)
    size = (torch.rand(b, n, generator=g) * 3 + 0.5).to(triton_device)
    ref = reference.bipartite_merge(x.float(), r, metric=metric, size=size, protected=protected)
    y, den = torch.ops.sts.merge_wavg_triton(x, size, ref.index, ref.x.shape[1])
    torch.testing.assert_close(den, ref.size, msg=lambda m: f"merge_wavg sizes: {m}")
    lowp = None
    if dtype in LOW_PRECISION:
        lowp = reference.bipartite_merge(x, r, metric=metric, size=size, protected=protected).x
    assert_close(y, ref.x, reference_lowp=lowp, name="merge_wavg values")


@pytest.mark.interpreter
@pytest.mark.parametrize("protected", [0, 1, 2])
def test_merge_end_to_end_exact_ties(protected, triton_device):
    """Whole op with exact ties in the matching and in the ranking, fp16 metric (tensor cores
    on a GPU), N past a tile: index and sizes equal the reference, values within fp32."""
    g = torch.Generator().manual_seed(protected)
    metric = _sign_tokens(2, 131, 16, 4, triton_device, g)
    x = torch.randn(2, 131, 24, generator=g).to(triton_device)
    for r in (1, 40, 64):
        with sts_kernels.use_backend("triton"):
            out = sts_kernels.bipartite_merge(x, r, metric=metric.half(), protected=protected)
        ref = reference.bipartite_merge(x, r, metric=metric, protected=protected)
        assert torch.equal(out.index, ref.index), f"r={r}: index differs"
        assert torch.equal(out.size, ref.size), f"r={r}: sizes differ"
        torch.testing.assert_close(out.x, ref.x)


# ------------------------------------------------------------------ token_pool, demo shapes


@pytest.mark.interpreter
@pytest.mark.parametrize("per_image", [False, True])
def test_token_pool_demo_shapes(per_image, triton_device):
    """The demo's VTC call: 8 images of 16x16 tokens, D=256, fp32, 2x2 windows, as one batch
    or image by image from views into the batch (storage offsets), forward and backward."""
    x = torch.randn(8, 256, 256, device=triton_device, requires_grad=True)
    g = torch.randn(8, 64, 256, device=triton_device)
    with sts_kernels.use_backend("triton"):
        if per_image:
            y = torch.cat([sts_kernels.token_pool(f[None, 0:], (16, 16)) for f in x])
        else:
            y = sts_kernels.token_pool(x, (16, 16))
    (dx,) = torch.autograd.grad(y, x, g)
    xr = x.detach().requires_grad_(True)
    y_ref = reference.token_pool(xr, (16, 16))
    (dx_ref,) = torch.autograd.grad(y_ref, xr, g)
    torch.testing.assert_close(y, y_ref, msg=lambda m: f"token_pool forward: {m}")
    torch.testing.assert_close(dx, dx_ref, msg=lambda m: f"token_pool backward: {m}")
