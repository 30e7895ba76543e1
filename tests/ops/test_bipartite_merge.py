"""bipartite_merge / unmerge: Triton kernels (interpreter on CPU) against the reference,
tie rules, ops, compile and input checks. The matching tests run both matchers (`matcher`:
the bmm + row max path and the tiled kernel), whatever the shape would pick."""

import importlib

import pytest
import torch

import sts_kernels
from sts_kernels import reference
from sts_kernels._triton import triton
from sts_kernels.ops import _common as ops_common
from tests.tolerances import DTYPES, LOW_PRECISION, assert_close

merge_module = importlib.import_module("sts_kernels.ops.bipartite_merge")
bipartite_merge, unmerge = sts_kernels.bipartite_merge, sts_kernels.unmerge


@pytest.fixture(name="matcher", params=["bmm", "tiled"])
def force_matcher(request, monkeypatch):
    """Force one matcher for every shape (dtype rules still apply: fp64 stays tiled)."""
    if request.param == "bmm":
        monkeypatch.setattr(merge_module, "_BMM_MIN_C", 0)
    else:
        monkeypatch.setattr(merge_module, "_BMM_MAX_N", 0)
    return request.param


def _triton(fn, *args, **kwargs):
    with sts_kernels.use_backend("triton"):
        return fn(*args, **kwargs)


def _merge_fwd_bwd(impl, x, grad_fn, **kwargs):
    """(MergeResult, dx) with dx the gradient of sum(out.x * grad) for grad = grad_fn(shape)."""
    x = x.detach().requires_grad_(True)
    out = impl(x, **kwargs)
    (dx,) = torch.autograd.grad(out.x, x, grad_fn(out.x.shape).to(x.dtype))
    return out, dx


def _check_merge_against_reference(x, **kwargs):
    """Triton merge of `x` against the fp32 reference on the same (rounded) input, forward and
    backward: equal index and size, x and dx within tolerance. Returns the Triton result."""
    grad = lambda shape: torch.randn(
        shape, device=x.device, generator=torch.Generator(device=x.device).manual_seed(1)
    )
    out, dx = _merge_fwd_bwd(lambda t, **k: _triton(bipartite_merge, t, **k), x, grad, **kwargs)
    # the fp32 reference on the same matching: pass the rounded input as the metric
    ref, dx_ref = _merge_fwd_bwd(reference.bipartite_merge, x.float(), grad, metric=x, **kwargs)
    lowp = {}
    if x.dtype in LOW_PRECISION:
        ref_lp, dx_lp = _merge_fwd_bwd(reference.bipartite_merge, x, grad, **kwargs)
        lowp = dict(x=ref_lp.x, dx=dx_lp)
        assert torch.equal(ref_lp.index, ref.index)
    assert torch.equal(out.index, ref.index)
    assert torch.equal(out.size, ref.size) and out.size.dtype == torch.float32
    assert out.x.dtype == x.dtype
    assert_close(out.x, ref.x, reference_lowp=lowp.get("x"), name="x")
    assert_close(dx, dx_ref, reference_lowp=lowp.get("dx"), name="dx")
    return out


def _sign_tokens(b, n, d, pool, device):
    """Tokens drawn from `pool` distinct +-1 vectors: every cosine is a multiple of 1/d computed
    exactly in any order, so equal scores are bitwise equal and the tie rules decide."""
    vectors = torch.randint(0, 2, (b, pool, d), device=device).float() * 2 - 1
    return _pick(vectors, torch.randint(0, pool, (b, n), device=device))


def _pick(vectors, which):
    """[B, N, D] tokens: token n of sample b is vectors[b, which[b, n]]."""
    return vectors.gather(1, which[..., None].expand(-1, -1, vectors.shape[-1]))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("protected", [0, 1, 2])
def test_match_kernel(dtype, protected, matcher, triton_device):
    metric = torch.randn(3, 37, 40, device=triton_device).to(dtype)
    metric[:, 7] = 0  # a zero vector: eps keeps its scores at 0
    best, dst = torch.ops.sts.bipartite_match_triton(metric, protected)
    best_ref, dst_ref = reference.bipartite_match(metric, protected)
    torch.testing.assert_close(best, best_ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(dst, dst_ref)


@pytest.mark.interpreter
def test_match_ties_go_to_lowest_destination(matcher, triton_device):
    metric = _sign_tokens(2, 40, 16, pool=3, device=triton_device)
    best, dst = torch.ops.sts.bipartite_match_triton(metric, 1)
    best_ref, dst_ref = reference.bipartite_match(metric, 1)
    assert torch.equal(best, best_ref) and torch.equal(dst, dst_ref)
    # a source equal to some destination matches the first such destination
    src, dsts = metric[:, 2::2], metric[:, 1::2]
    same = (src[:, :, None] == dsts[:, None]).all(-1)  # [B, |A|, |Bd|]
    has = same.any(-1)
    assert has.any()
    assert torch.equal(dst[has], same.float().argmax(-1)[has])


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_match_equal_directions_tie_exactly(dtype, matcher, triton_device):
    """Tokens v and 2v of 4 small-integer directions: every dot product is an integer summed
    exactly in any order and the norms scale by exact powers of 2, so all tokens of a source's
    direction score bitwise-equally and the lowest of them must win. (Duplicates of general
    vectors need not tie: a GEMM may sum duplicate columns in different orders; see
    STS_SPEC.md §1.)"""
    b, n, d = 2, 44, 72
    directions = torch.randint(-3, 4, (b, 4, d), device=triton_device).float()
    which = torch.randint(0, 8, (b, n), device=triton_device)  # direction which % 4, scale 1 or 2
    metric = _pick(torch.cat([directions, 2 * directions], 1), which).to(dtype)
    direction = which % 4
    for protected in (0, 1):
        _, dst = torch.ops.sts.bipartite_match_triton(metric, protected)
        start = protected + protected % 2
        src_dir = direction[:, start::2]
        dst_dir = direction[:, start + 1 - 2 * (protected % 2) :: 2]
        same = src_dir[:, :, None] == dst_dir[:, None]  # [B, |A|, |Bd|]
        has = same.any(-1)
        assert has.sum() > 10
        assert torch.equal(dst[has], same.float().argmax(-1)[has])


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matchers_agree(dtype, monkeypatch, triton_device):
    """The bmm path and the tiled kernel compute the same scores up to the order the dot
    products are summed: the same matching on random tokens, bitwise-equal scores where every
    partial sum is exact (+-1 tokens)."""
    random = torch.randn(2, 50, 96, device=triton_device).to(dtype)
    signs = _sign_tokens(2, 50, 96, pool=5, device=triton_device).to(dtype)
    results = {}
    monkeypatch.setattr(merge_module, "_BMM_MIN_C", 0)
    for path in ("bmm", "tiled"):
        monkeypatch.setattr(merge_module, "_BMM_MAX_N", 1 << 20 if path == "bmm" else 0)
        assert merge_module.match_path(50, 96, dtype, random.device) == path
        results[path] = [torch.ops.sts.bipartite_match_triton(m, 1) for m in (random, signs)]
    (best_b, dst_b), (sbest_b, sdst_b) = results["bmm"]
    (best_t, dst_t), (sbest_t, sdst_t) = results["tiled"]
    torch.testing.assert_close(best_b, best_t, atol=1e-6, rtol=1e-6)
    assert torch.equal(dst_b, dst_t)
    assert torch.equal(sbest_b, sbest_t) and torch.equal(sdst_b, sdst_t)


def test_match_path_choice(monkeypatch):
    cpu = torch.device("cpu")
    path = lambda n, c, dtype=torch.float32: merge_module.match_path(n, c, dtype, cpu)
    # LLaVA-1.5's 576 tokens (CLIP and LLM widths) take the bmm path, 96x96 grids the tiled one
    assert path(576, 1024) == "bmm" and path(576, 4096) == "bmm" and path(9216, 1024) == "tiled"
    assert path(merge_module._BMM_MAX_N, merge_module._BMM_MIN_C) == "bmm"
    assert path(merge_module._BMM_MAX_N + 1, 1024) == "tiled"  # the score matrix grows as N^2
    assert path(576, merge_module._BMM_MIN_C - 1) == "tiled"  # score traffic would dominate
    assert path(576, 1024, torch.float64) == "tiled"  # fp64 metrics are scored in fp32
    assert path(576, 1024, torch.bfloat16) == "bmm"
    assert path(576, 1024, torch.float16) == "bmm"
    # fp32 never silently becomes TF32, fp16 never accumulates in fp16
    matmul = torch.backends.cuda.matmul
    previous = torch.get_float32_matmul_precision(), matmul.allow_fp16_accumulation
    try:
        matmul.allow_fp16_accumulation = True
        assert path(576, 1024, torch.float16) == "tiled"
        torch.set_float32_matmul_precision("high")
        assert path(576, 1024) == "tiled"
        assert merge_module.match_path(576, 1024, torch.float32, torch.device("cuda")) == "tiled"
    finally:
        torch.set_float32_matmul_precision(previous[0])
        matmul.allow_fp16_accumulation = previous[1]
    assert merge_module.match_path(576, 1024, torch.float32, torch.device("cuda")) == "bmm"
    # a torch whose CUDA bmm cannot write fp32 from fp16/bf16 (< 2.8): those go tiled there
    assert merge_module.match_path(576, 1024, torch.bfloat16, torch.device("cuda")) == "bmm"
    monkeypatch.setattr(torch.ops.aten.bmm, "overloads", lambda: ["default", "out"])
    assert merge_module.match_path(576, 1024, torch.bfloat16, torch.device("cuda")) == "tiled"
    assert path(576, 1024, torch.bfloat16) == "bmm"  # the CPU multiplies fp32 copies


def test_match_path_reads_the_fp32_precision_api():
    """TF32 asked for through torch's per-backend `fp32_precision` (after which reading the
    legacy `allow_tf32` raises): fp32 takes the tiled path, no error."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has only the legacy flags")
    knobs = (torch.backends, torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    previous = [k.fp32_precision for k in knobs]
    path = lambda device: merge_module.match_path(576, 1024, torch.float32, torch.device(device))
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert path("cuda") == "tiled" and path("cpu") == "bmm"
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        assert path("cuda") == "tiled" and path("cpu") == "tiled"
        for knob in knobs:
            knob.fp32_precision = "ieee"
        assert path("cuda") == "bmm" and path("cpu") == "bmm"
    finally:
        for knob, value in zip(knobs, previous):
            knob.fp32_precision = value


# (B, N, D, r, protected): r = 0, 1, max, above max; odd/even N; protected 0/1/2
MERGE_CASES = [
    (2, 35, 24, 0, 0),
    (2, 35, 24, 1, 1),
    (2, 35, 24, 17, 0),
    (2, 36, 24, 100, 1),
    (3, 64, 64, 20, 2),
    (1, 2, 8, 5, 0),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("b", "n", "d", "r", "protected"), MERGE_CASES)
def test_merge_matches_reference(dtype, b, n, d, r, protected, matcher, triton_device):
    x = torch.randn(b, n, d, device=triton_device).to(dtype)
    out = _check_merge_against_reference(x, r=r, protected=protected)
    r_eff = min(r, (n - protected) // 2)
    assert out.x.shape == (b, n - r_eff, d)
    if r_eff == 0:
        assert out.x is x or torch.equal(out.x, x)
        assert torch.equal(out.index, torch.arange(n, device=triton_device).expand(b, n))


@pytest.mark.interpreter
@pytest.mark.parametrize("protected", [0, 1])
def test_merge_ties_and_duplicates(protected, matcher, triton_device):
    metric = _sign_tokens(3, 30, 16, pool=3, device=triton_device)  # many exact duplicates
    x = torch.randn_like(metric)  # values independent of the matching, to see where they went
    for r in (1, 5, 14):
        out = _triton(bipartite_merge, x, r, metric=metric, protected=protected)
        ref = reference.bipartite_merge(x, r, metric=metric, protected=protected)
        assert torch.equal(out.index, ref.index)
        assert torch.equal(out.size, ref.size)
        torch.testing.assert_close(out.x, ref.x)


@pytest.mark.interpreter
def test_merge_all_identical_tokens_by_hand(triton_device):
    """8 identical tokens, r=2: every score ties at 1, so sources 0 and 2 (lowest positions)
    merge into destination 1 (the lowest destination)."""
    x = torch.ones(1, 8, 4, device=triton_device)
    x = x * torch.arange(1.0, 9.0, device=triton_device)[None, :, None]
    metric = torch.ones(1, 8, 4, device=triton_device)
    out = _triton(bipartite_merge, x, 2, metric=metric)
    assert out.index.tolist() == [[2, 2, 2, 3, 0, 4, 1, 5]]
    assert out.size.tolist() == [[1, 1, 3, 1, 1, 1]]
    # outputs: kept sources 4, 6; destinations (1+2+3)/3, 4, 6, 8 (token n has value n+1)
    expected = torch.tensor([5.0, 7.0, 2.0, 4.0, 6.0, 8.0], device=triton_device)
    torch.testing.assert_close(out.x[0, :, 0], expected)


@pytest.mark.interpreter
def test_merge_with_metric_and_size(triton_device):
    b, n, d, c = 2, 33, 16, 24
    x = torch.randn(b, n, d, device=triton_device)
    metric = torch.randn(b, n, c, device=triton_device)
    size = torch.rand(b, n, device=triton_device) * 3 + 0.5
    grad = lambda shape: torch.ones(shape, device=triton_device)
    kwargs = dict(r=9, metric=metric, size=size, protected=1)
    out, dx = _merge_fwd_bwd(lambda t, **k: _triton(bipartite_merge, t, **k), x, grad, **kwargs)
    ref, dx_ref = _merge_fwd_bwd(reference.bipartite_merge, x, grad, **kwargs)
    assert torch.equal(out.index, ref.index)
    torch.testing.assert_close(out.size, ref.size)
    torch.testing.assert_close(out.x, ref.x)
    torch.testing.assert_close(dx, dx_ref)
    # samples differ: the batch is not one sample repeated
    assert not torch.equal(out.index[0], out.index[1])
    # a second merge on the output keeps accumulating sizes
    again = _triton(bipartite_merge, out.x, 4, size=out.size, protected=1)
    again_ref = reference.bipartite_merge(ref.x, 4, size=ref.size, protected=1)
    assert torch.equal(again.index, again_ref.index)
    torch.testing.assert_close(again.size, again_ref.size)
    torch.testing.assert_close(again.size.sum(1), size.sum(1))


@pytest.mark.interpreter
def test_inputs_not_modified(triton_device):
    x = torch.randn(2, 20, 8, device=triton_device)
    size = torch.rand(2, 20, device=triton_device) + 1
    x0, size0 = x.clone(), size.clone()
    _triton(bipartite_merge, x, 6, size=size, protected=1)
    assert torch.equal(x, x0) and torch.equal(size, size0)


@pytest.mark.interpreter
def test_non_contiguous_inputs(triton_device):
    x = torch.randn(2, 8, 21, device=triton_device).transpose(1, 2)  # [2, 21, 8] strided
    metric = torch.randn(2, 6, 21, device=triton_device).transpose(1, 2)
    out = _triton(bipartite_merge, x, 5, metric=metric)
    ref = reference.bipartite_merge(x, 5, metric=metric)
    assert torch.equal(out.index, ref.index)
    torch.testing.assert_close(out.x, ref.x)
    torch.testing.assert_close(
        _triton(unmerge, out.x.transpose(1, 2).contiguous().transpose(1, 2), out.index),
        reference.unmerge(ref.x, ref.index),
    )


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unmerge_matches_reference(dtype, triton_device):
    m = reference.bipartite_merge(torch.randn(2, 30, 8, device=triton_device), 11, protected=1)
    y32 = torch.randn(2, 19, 8, device=triton_device)
    y = y32.to(dtype).requires_grad_(True)
    g = torch.randn(2, 30, 8, device=triton_device).to(dtype)
    out = _triton(unmerge, y, m.index)
    (dy,) = torch.autograd.grad(out, y, g)
    y_ref = y.detach().float().requires_grad_(True)
    out_ref = reference.unmerge(y_ref, m.index)
    (dy_ref,) = torch.autograd.grad(out_ref, y_ref, g.float())
    lowp = None
    if dtype in LOW_PRECISION:
        y_lp = y.detach().clone().requires_grad_(True)
        (lowp,) = torch.autograd.grad(reference.unmerge(y_lp, m.index), y_lp, g)
    assert torch.equal(out, out_ref.to(dtype))  # a gather is exact
    assert_close(dy, dy_ref, reference_lowp=lowp, name="dy")


@pytest.mark.interpreter
def test_gradcheck_float64(triton_device):
    kw = dict(dtype=torch.float64, device=triton_device)
    x = torch.randn(1, 7, 2, **kw, requires_grad=True)
    metric = torch.randn(1, 7, 5, **kw)  # fixed: the matching must not move with x
    size = torch.rand(1, 7, **kw) + 1
    merge = lambda t: _triton(bipartite_merge, t, 2, metric=metric, size=size, protected=1).x
    assert torch.autograd.gradcheck(merge, (x,))
    index = reference.bipartite_merge(x.detach(), 2, metric=metric, protected=1).index
    y = torch.randn(1, 5, 2, **kw, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _triton(unmerge, t, index), (y,))
    assert torch.autograd.gradgradcheck(lambda t: _triton(unmerge, t, index), (y,))


@pytest.mark.interpreter
def test_opcheck_match(matcher, triton_device):
    metric = torch.randn(2, 21, 8, device=triton_device)
    torch.library.opcheck(torch.ops.sts.bipartite_match_triton.default, (metric, 1))


@pytest.mark.interpreter
def test_opcheck(triton_device):
    kw = dict(device=triton_device)
    x = torch.randn(2, 21, 8, **kw, requires_grad=True)
    best, dst = reference.bipartite_match(x.detach(), 1)
    torch.library.opcheck(torch.ops.sts.merge_index_triton.default, (best, dst, 21, 1, 6))
    m = reference.bipartite_merge(x.detach(), 6, protected=1)
    weight = torch.rand(2, 21, **kw) + 1
    torch.library.opcheck(torch.ops.sts.merge_wavg_triton.default, (x, weight, m.index, 15))
    torch.library.opcheck(torch.ops.sts.merge_wavg_triton.default, (x, None, m.index, 15))
    grad = torch.randn(2, 15, 8, **kw)
    den = torch.rand(2, 15, **kw) + 1
    torch.library.opcheck(
        torch.ops.sts.merge_wavg_backward_triton.default, (grad, weight, m.index, den)
    )
    torch.library.opcheck(
        torch.ops.sts.unmerge_triton.default, (grad.requires_grad_(True), m.index)
    )
    torch.library.opcheck(
        torch.ops.sts.unmerge_backward_triton.default,
        (x.detach().requires_grad_(True), m.index, 15),
    )


@pytest.mark.interpreter
def test_compile_fullgraph(triton_device):
    x = torch.randn(2, 21, 8, device=triton_device, requires_grad=True)

    def fn(t):
        merged = bipartite_merge(t, 6, protected=1)
        return unmerge(merged.x, merged.index), merged.size

    with sts_kernels.use_backend("triton"):
        y, size = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    ref = reference.bipartite_merge(x, 6, protected=1)
    y_ref = reference.unmerge(ref.x, ref.index)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(size, ref.size)
    (dx,) = torch.autograd.grad(y.sum(), x)
    (dx_ref,) = torch.autograd.grad(y_ref.sum(), x)
    torch.testing.assert_close(dx, dx_ref)


@pytest.mark.interpreter
def test_triton_path_is_used(monkeypatch, triton_device):
    calls = []
    real = merge_module._merge_wavg_triton
    monkeypatch.setattr(merge_module, "_merge_wavg_triton", lambda *a: calls.append(a) or real(*a))
    x = torch.randn(1, 8, 4, device=triton_device)
    _triton(bipartite_merge, x, 2)
    assert len(calls) == 1
    with sts_kernels.use_backend("reference"):
        bipartite_merge(x, 2)
    assert len(calls) == 1


def _bad_merge_cases():
    x = torch.zeros(2, 10, 4)
    return [
        (dict(r=-1), ValueError, "r"),
        (dict(r=2.0), TypeError, "r"),
        (dict(protected=10), ValueError, "protected"),
        (dict(protected=-1), ValueError, "protected"),
        (dict(metric=torch.zeros(2, 9, 4)), ValueError, "metric"),
        (dict(metric=torch.zeros(3, 10, 4)), ValueError, "metric"),
        (dict(metric=torch.zeros(2, 10, 4, dtype=torch.int32)), TypeError, "metric"),
        (dict(size=torch.ones(2, 9)), ValueError, "size"),
        (dict(size=torch.ones(2, 10, dtype=torch.int64)), TypeError, "size"),
        (dict(x=x.long()), TypeError, "x"),
        (dict(x=x[0]), ValueError, "x"),
    ]


@pytest.mark.parametrize(("kwargs", "exc", "words"), _bad_merge_cases())
def test_bad_merge_input(kwargs, exc, words):
    args = dict(x=torch.zeros(2, 10, 4), r=2, metric=None, size=None, protected=0) | kwargs
    with pytest.raises(exc, match=words):
        bipartite_merge(**args)


@pytest.mark.parametrize(
    ("y", "index", "exc", "words"),
    [
        (torch.zeros(2, 5, 4), torch.zeros(2, 10, dtype=torch.int32), TypeError, "index"),
        (torch.zeros(2, 5, 4), torch.zeros(3, 10, dtype=torch.int64), ValueError, "index"),
        (
            torch.zeros(2, 5, 4, dtype=torch.int64),
            torch.zeros(2, 10, dtype=torch.int64),
            TypeError,
            "y",
        ),
    ],
)
def test_bad_unmerge_input(y, index, exc, words):
    with pytest.raises(exc, match=words):
        unmerge(y, index)


@pytest.mark.interpreter
def test_many_programs(matcher, triton_device, monkeypatch):
    """16-element tiles: the segment reduction, the gather and the matching run as many
    programs along tokens and features, partial tiles at both ends."""
    monkeypatch.setattr(ops_common, "_INTERPRETER_TILE", 16)
    monkeypatch.setattr(ops_common, "_GPU_TILE", 16)
    # the tiled matcher: several destination tiles and feature chunks per program
    tiles = dict(BLOCK_A=16, BLOCK_B=16, BLOCK_C=16)
    monkeypatch.setattr(merge_module._match_kernel, "configs", [triton.Config(tiles)])
    # the counting kernels (selection, index, counting sort) in 16-element programs and chunks
    monkeypatch.setattr(merge_module, "_COUNT_BLOCK", 16)
    monkeypatch.setattr(merge_module, "_COUNT_BLOCK_K", 16)
    x = torch.randn(2, 35, 24, device=triton_device)
    _check_merge_against_reference(x, r=10, protected=1)
    _check_merge_against_reference(x, r=17, protected=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("protected", [0, 1])
def test_gpu_large(dtype, protected, matcher):
    b, n, d = 4, 576, 1024
    x = torch.randn(b, n, d, device="cuda").to(dtype)
    # seeded random tokens: score gaps (~1e-4) dwarf fp32 rounding (~1e-7), so the matching
    # is exact; the scores themselves match to fp32 rounding
    best, _ = torch.ops.sts.bipartite_match_triton(x, protected)
    best_ref, _ = reference.bipartite_match(x, protected)
    torch.testing.assert_close(best, best_ref, atol=1e-5, rtol=1e-5)
    _check_merge_against_reference(x, r=n // 4, protected=protected)
