"""Property tests (issue 11): every public op on every CPU backend against the reference, on
random shapes, memory layouts (non-contiguous views, size-1 dims with odd strides), dtypes
(fp32/fp16/bf16/fp64), masks (empty, full, single row, random) and B=1, forward and backward.

Tolerance: the spec's rule (tests/tolerances.py): fp32/fp64 tight, fp16/bf16 within 2x the
error the reference itself makes in that dtype. Hypothesis runs derandomized with few examples
and no example database, so CI is reproducible and bounded; Triton runs under the interpreter
on tiny shapes.
"""

from math import inf, nan

import pytest
import torch

import sts_kernels
from sts_kernels import reference
from tests.tolerances import LOW_PRECISION, assert_close

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
given = hypothesis.given

# NaN/Inf inputs are drawn on purpose: the interpreter's numpy warns when it computes with them
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LAYOUTS = ("contiguous", "sliced", "transposed", "size1_strides")
EXAMPLES = 40

bounded = hypothesis.settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)


def _backends(*implemented: str) -> list:
    """The reference plus the op's compiled backends, each a param skipped where it cannot run."""
    have = sts_kernels.available_backends("cpu")
    return ["reference"] + [
        pytest.param(name, marks=pytest.mark.skipif(name not in have, reason=f"no {name}"))
        for name in implemented
    ]


# ---- drawing inputs --------------------------------------------------------------------------


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A leaf holding `t`'s values in the given memory layout."""
    if layout == "sliced" and t.dim():  # every other element of the last dim
        wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        wide[..., ::2] = t
        t = wide[..., ::2]
    elif layout == "transposed" and t.dim() > 1:  # dims 0 and -1 swapped in memory
        t = t.transpose(0, -1).contiguous().transpose(0, -1)
    elif layout == "size1_strides":  # size-1 dims with odd strides: still "contiguous"
        strides = [7 if n == 1 else s for n, s in zip(t.shape, t.contiguous().stride())]
        t = t.contiguous().as_strided(t.shape, strides)
    else:
        t = t.clone()
    return t.detach()


def _randn(data, shape, dtype, layout=None, special=True) -> torch.Tensor:
    """Random values in a drawn layout; with `special`, sometimes one NaN or +-Inf (data,
    which every backend must propagate alike)."""
    seed = data.draw(st.integers(0, 2**16), label="seed")
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    value = data.draw(st.sampled_from([None] * 3 + [nan, inf, -inf]), label="special")
    if special and value is not None and values.numel():
        values.view(-1)[data.draw(st.integers(0, values.numel() - 1), label="at")] = value
    if layout is None:
        layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    return _layout(values, layout)


def _mask(data, token_mode: bool | None = None) -> torch.Tensor:
    """[B] or [B, T] bool: empty, full, a single row or random."""
    if token_mode is None:
        token_mode = data.draw(st.booleans(), label="token_mode")
    b = data.draw(st.integers(1, 3), label="B")
    shape = (b, data.draw(st.integers(1, 5), label="T")) if token_mode else (b,)
    kind = data.draw(st.sampled_from(["empty", "full", "single", "random"]), label="mask")
    mask = torch.zeros(shape, dtype=torch.bool)
    if kind == "full":
        mask.fill_(True)
    elif kind == "single":
        mask.view(-1)[data.draw(st.integers(0, mask.numel() - 1), label="row")] = True
    elif kind == "random":
        bits = data.draw(st.lists(st.booleans(), min_size=mask.numel(), max_size=mask.numel()))
        mask = torch.tensor(bits).view(shape)
    return mask


def _feat(data, max_dims: int = 2) -> tuple[int, ...]:
    return tuple(data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=max_dims)))


# ---- comparison ------------------------------------------------------------------------------


def _head(out):
    return out[0] if isinstance(out, tuple) else out


def _fwd_bwd(fn, inputs, diff, backend, weight):
    """fn(*inputs) under `backend` and the gradients of sum(out * weight) for inputs `diff`."""
    leaves = [t.detach().requires_grad_() if i in diff else t for i, t in enumerate(inputs)]
    with sts_kernels.use_backend(backend):
        out = fn(*leaves)
        y = _head(out)
        w = weight.to(y.dtype)
        grads = torch.autograd.grad(
            y, [leaves[i] for i in diff], w, allow_unused=True, materialize_grads=True
        )
    grads = [g.to_dense() if g.layout != torch.strided else g for g in grads]
    return out, grads


def _close(actual, expected, reference_lowp, name):
    """assert_close, where NaN/Inf in the reference must be at the same places in `actual`
    (Inf with its sign) and the finite rest is held to the tolerance rule."""
    special = ~torch.isfinite(expected)
    torch.testing.assert_close(
        actual[special], expected[special].to(actual.dtype), atol=0, rtol=0, equal_nan=True
    )
    finite = lambda t: None if t is None else t.masked_fill(special, 0)  # noqa: E731
    assert_close(finite(actual), finite(expected), reference_lowp=finite(reference_lowp), name=name)


def _compare(fn, inputs, backend, diff=(0,)):
    """fn on `backend` against the reference, forward (first output) and backward (inputs
    `diff`). Returns (output, reference output in the same dtype) for further checks."""
    dtype = next(t.dtype for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point())
    with sts_kernels.use_backend("reference"):
        probe = _head(fn(*inputs))  # the output's shape, for a fixed gradient weight
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(probe.shape, generator=gen).to(probe.dtype)
    before = [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]
    out, grads = _fwd_bwd(fn, inputs, diff, backend, weight)
    for t, b in zip(inputs, before):  # inputs are never modified
        if isinstance(t, torch.Tensor):
            torch.testing.assert_close(t, b, atol=0, rtol=0, equal_nan=True)
    same, grads_same = _fwd_bwd(fn, inputs, diff, "reference", weight)
    lowp = dtype in LOW_PRECISION
    if lowp:  # judged against the fp32 reference on the same rounded values
        wide = [
            t.float() if isinstance(t, torch.Tensor) and t.dtype in LOW_PRECISION else t
            for t in inputs
        ]
        exact, grads_exact = _fwd_bwd(fn, wide, diff, "reference", weight)
    else:
        exact, grads_exact = same, grads_same
    assert _head(out).dtype == _head(same).dtype
    ref_lp = (lambda t: t) if lowp else (lambda t: None)
    _close(_head(out), _head(exact), ref_lp(_head(same)), name="out")
    for i, g, g_exact, g_same in zip(diff, grads, grads_exact, grads_same):
        assert g.dtype == inputs[i].dtype, f"grad {i}: dtype {g.dtype}"
        _close(g, g_exact, ref_lp(g_same), name=f"grad of input {i}")
    return out, same


# ---- the ops ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", _backends("cpp"))
@bounded
@given(data=st.data())
def test_route(backend, data):
    mask = _mask(data)
    with sts_kernels.use_backend(backend):
        plan = sts_kernels.route(mask)
    ref = reference.route(mask)
    assert plan.shape == ref.shape
    for name in ("index", "counts", "offsets", "row_to_k", "padded_index"):
        got, want = getattr(plan, name), getattr(ref, name)
        assert got.dtype == torch.int64 and torch.equal(got, want), name


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", _backends("cpp", "triton"))
@bounded
@given(data=st.data())
def test_gather_rows(backend, data):
    mask = _mask(data)
    plan = reference.route(mask)
    padded = len(plan.shape) == 2 and data.draw(st.booleans(), label="padded")
    dtype = data.draw(st.sampled_from(ALL_DTYPES), label="dtype")
    x = _randn(data, (*plan.shape, *_feat(data)), dtype)

    _compare(lambda t: sts_kernels.gather_rows(t, plan, padded), [x], backend)


@pytest.mark.interpreter
@pytest.mark.parametrize("scatter", [False, True])
def test_triton_rows_one_strided_element(scatter):
    """Found by the property test: a one-element tensor keeps its stride through view(-1)."""
    x = torch.randn(1, 2)[:, ::2]  # [1, 1], strides (2, 2)
    rows = torch.zeros(1, dtype=torch.int64)
    with sts_kernels.use_backend("triton"):
        if scatter:
            out = torch.ops.sts.scatter_rows_triton(x, rows, 1)
        else:
            out = sts_kernels.gather_rows(x, reference.route(torch.tensor([True])))
    assert torch.equal(out, x)


def _scatter_rows(src, rows, num_rows):
    """`sts::scatter_rows` of the forced backend; the reference: zeros with out[rows[k]] =
    src[k]; `rows` [K] (every id a row) or padded [B, Kmax] (-1: padding, writes nothing)."""
    impl = sts_kernels.requested_backend()
    if impl == "reference":
        keep = rows >= 0
        out = src.new_zeros((num_rows, *src.shape[rows.dim() :]))
        return out.index_put((rows[keep],), src[keep])
    op = torch.ops.sts.scatter_rows if impl == "cpp" else torch.ops.sts.scatter_rows_triton
    return op(src, rows, num_rows)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", _backends("cpp", "triton"))
@bounded
@given(data=st.data())
def test_scatter_rows(backend, data):
    plan = reference.route(_mask(data, token_mode=True))
    # the padded layout's ids: -1 past each sample's count
    padded = data.draw(st.booleans(), label="padded")
    rows = plan.padded_index if padded else plan.index
    dtype = data.draw(st.sampled_from(ALL_DTYPES), label="dtype")
    src = _randn(data, (*rows.shape, *_feat(data)), dtype)

    _compare(lambda t: _scatter_rows(t, rows, plan.num_rows), [src], backend)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", _backends("cpp", "triton"))
@bounded
@given(data=st.data())
def test_skip_residual(backend, data):
    mask = _mask(data)
    plan = reference.route(mask)
    feat = _feat(data)
    dtype = data.draw(st.sampled_from(ALL_DTYPES), label="dtype")
    x = _randn(data, (*plan.shape, *feat), dtype)
    # token plans take delta packed [K, ...] or padded [B, Kmax, ...] (padding slots ignored)
    padded = len(plan.shape) == 2 and data.draw(st.booleans(), label="padded")
    rows = (plan.shape[0], plan.max_count) if padded else (plan.num_active,)
    delta = _randn(data, (*rows, *feat), dtype)
    with_gate = data.draw(st.booleans(), label="gate")
    gate = _randn(data, (plan.num_active,), dtype).sigmoid() if with_gate else None
    stats = data.draw(st.booleans(), label="stats")
    from_output = data.draw(st.booleans(), label="from_output")

    def op(x, delta, gate):
        return sts_kernels.skip_residual(x, delta, plan, gate, stats, from_output)

    diff = (0, 1, 2) if with_gate else (0, 1)
    out, same = _compare(op, [x, delta, gate], backend, diff)
    if stats:  # fp32 cosines of the same rows: as close as fp32 arithmetic allows
        assert out[1].dtype == torch.float32
        torch.testing.assert_close(out[1], same[1], atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", _backends("triton"))
@bounded
@given(data=st.data())
def test_token_pool(backend, data):
    b, h, w = (data.draw(st.integers(1, n), label=k) for n, k in ((2, "B"), (5, "H"), (5, "W")))
    window = (data.draw(st.integers(1, 3), label="kh"), data.draw(st.integers(1, 3), label="kw"))
    dtype = data.draw(st.sampled_from(ALL_DTYPES), label="dtype")
    x = _randn(data, (b, h * w, data.draw(st.integers(1, 4), label="D")), dtype)

    _compare(lambda t: sts_kernels.token_pool(t, (h, w), window), [x], backend)


def _sign_tokens(data, b, n) -> torch.Tensor:
    """A metric of 16-dim +-1 vectors: norms are 4, every cosine a multiple of 1/16, exact in
    any summation order, so all backends see the same scores and the tie rules decide."""
    seed = data.draw(st.integers(0, 2**16), label="metric seed")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (b, n, 16), generator=gen).float() * 2 - 1


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", _backends("triton"))
@bounded
@given(data=st.data())
def test_bipartite_merge(backend, data):
    b, n = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, 10), label="N")
    dtype = data.draw(st.sampled_from(ALL_DTYPES), label="dtype")
    x = _randn(data, (b, n, data.draw(st.integers(1, 4), label="D")), dtype)
    metric = _sign_tokens(data, b, n)
    size = None
    if data.draw(st.booleans(), label="size"):
        size = _randn(data, (b, n), torch.float32, special=False).abs() + 0.5  # positive
    r = data.draw(st.integers(0, n), label="r")
    protected = data.draw(st.integers(0, min(2, n - 1)), label="protected")

    def op(x):
        return sts_kernels.bipartite_merge(x, r, metric, size, protected)

    out, same = _compare(op, [x], backend)
    assert torch.equal(out.index, same.index)
    assert out.size.dtype == same.size.dtype
    torch.testing.assert_close(out.size, same.size, atol=1e-6, rtol=1e-6)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", _backends("triton"))
@bounded
@given(data=st.data())
def test_unmerge(backend, data):
    b, n = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, 8), label="N")
    n_out = data.draw(st.integers(1, n), label="N_out")
    dtype = data.draw(st.sampled_from(ALL_DTYPES), label="dtype")
    y = _randn(data, (b, n_out, data.draw(st.integers(1, 4), label="D")), dtype)
    ids = data.draw(st.lists(st.integers(0, n_out - 1), min_size=b * n, max_size=b * n))
    index = _layout(torch.tensor(ids).view(b, n), data.draw(st.sampled_from(LAYOUTS)))

    _compare(lambda t: sts_kernels.unmerge(t, index), [y], backend)


# ---- double backward -------------------------------------------------------------------------

_PLAN = reference.route(torch.tensor([[True, False, True], [False, False, True]]))
_ROWS = _PLAN.padded_index  # [B, Kmax] with a -1 slot


def _f64(*shape):
    return torch.randn(shape, dtype=torch.float64, requires_grad=True)


DOUBLE_BACKWARD = {
    "gather_rows": (("cpp", "triton"), lambda x: sts_kernels.gather_rows(x, _PLAN), (2, 3, 2)),
    "gather_rows_padded": (
        ("cpp", "triton"),
        lambda x: sts_kernels.gather_rows(x, _PLAN, padded=True),
        (2, 3, 2),
    ),
    "scatter_rows": (("cpp", "triton"), lambda s: _scatter_rows(s, _ROWS, 6), (2, 2, 2)),
    "skip_residual": (
        ("cpp", "triton"),
        lambda x, y, g: sts_kernels.skip_residual(x, y, _PLAN, g, from_output=True),
        ((2, 3, 2), (3, 2), (3,)),
    ),
    "token_pool": (("triton",), lambda x: sts_kernels.token_pool(x, (2, 3)), (1, 6, 2)),
    "bipartite_merge": (
        ("triton",),
        lambda x: sts_kernels.bipartite_merge(x, 2, protected=1).x,
        (1, 7, 2),
    ),
    "unmerge": (
        ("triton",),
        lambda y: sts_kernels.unmerge(y, torch.tensor([[2, 0, 1, 1, 2]])),
        (1, 3, 2),
    ),
}


@pytest.mark.interpreter
@pytest.mark.parametrize(
    ("name", "backend"),
    [(n, b) for n, (impls, _, _) in DOUBLE_BACKWARD.items() for b in ("reference", *impls)],
)
def test_double_backward(name, backend):
    """Every op's double backward is exact on every backend (gradgradcheck in fp64)."""
    impls, fn, shapes = DOUBLE_BACKWARD[name]
    if backend not in sts_kernels.available_backends("cpu"):
        pytest.skip(f"no {backend}")
    shapes = shapes if isinstance(shapes[0], tuple) else (shapes,)
    inputs = [_f64(*s) for s in shapes]
    with sts_kernels.use_backend(backend):
        assert torch.autograd.gradgradcheck(fn, inputs)
