"""skip_residual: the Triton kernels (interpreter on CPU) and the C++ CPU kernels against the
reference, forward and backward, every dtype; gradcheck, opcheck, torch.compile, backend
choice and input validation."""

import pytest
import torch
from tolerances import DTYPES, assert_close

import sts_kernels
from sts_kernels import RoutePlan, _backend, reference, route, use_backend
from sts_kernels.ops import _common as ops_common

NO_EXTENSION = "the extension sts_kernels._C is not built (or STS_DISABLE_EXT=1)"
BACKENDS = [
    pytest.param("triton", marks=pytest.mark.interpreter),
    pytest.param(
        "cpp", marks=pytest.mark.skipif(not _backend.has_extension("cpu"), reason=NO_EXTENSION)
    ),
]
# (forward, backward) op of each backend
OPS = {
    "triton": ("skip_residual_triton", "skip_residual_backward_triton"),
    "cpp": ("skip_residual", "skip_residual_backward"),
}

# (x shape, mask shape, padded delta): sample mode [B], token mode [B, T] packed and padded,
# and a feature block of two dims.
LAYOUTS = {
    "sample": ((5, 3, 24), (5,), False),
    "token": ((3, 7, 40), (3, 7), False),
    "token_padded": ((3, 7, 40), (3, 7), True),
    "token_2d_features": ((2, 6, 3, 10), (2, 6), True),
}


def make_case(layout, dtype, device, with_gate, mask=None, seed=0):
    shape, mask_shape, padded = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    if mask is None:
        mask = torch.rand(mask_shape, generator=gen) < 0.6
    plan = route(mask.to(device))
    feat = shape[len(mask_shape) :]
    x = torch.randn(shape, generator=gen).to(device, dtype)
    rows = (mask_shape[0], plan.max_count) if padded else (plan.num_active,)
    delta = torch.randn(*rows, *feat, generator=gen).to(device, dtype)
    gate = (torch.rand(plan.num_active, generator=gen) + 0.5).to(device) if with_gate else None
    return x, delta, plan, gate


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def device(backend, triton_device):
    """Triton runs where the `triton_device` fixture says, the C++ kernels on the CPU."""
    return triton_device if backend == "triton" else torch.device("cpu")


@pytest.fixture
def run(backend):
    """The public op with the backend under test forced."""

    def run_backend(*args, **kwargs):
        with use_backend(backend):
            return sts_kernels.skip_residual(*args, **kwargs)

    return run_backend


def upcast(t):
    return None if t is None else t.float()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("with_gate", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("from_output", [False, True], ids=["delta", "output"])
def test_forward_matches_reference(layout, with_gate, dtype, from_output, device, run):
    x, delta, plan, gate = make_case(layout, dtype, device, with_gate)
    x_before, delta_before = x.clone(), delta.clone()
    out, cos = run(x, delta, plan, gate, stats=True, from_output=from_output)
    expected, expected_cos = reference.skip_residual(
        x.float(), delta.float(), plan, gate, True, from_output
    )
    lowp, lowp_cos = reference.skip_residual(x, delta, plan, gate, True, from_output)
    assert out.dtype == dtype and cos.dtype == torch.float32
    assert_close(out, expected, reference_lowp=lowp)
    # cos is an fp32 statistic of the same (low-precision) inputs: tight in every dtype
    assert_close(cos, lowp_cos, name="cos")
    # rows that skip the layer are copied bit-exactly
    skipped = ~torch.zeros(plan.num_rows, dtype=torch.bool).index_fill(0, plan.index.cpu(), True)
    flat = len(plan.shape)
    assert torch.equal(out.flatten(0, flat - 1)[skipped], x.flatten(0, flat - 1)[skipped])
    # stats change nothing else
    assert torch.equal(run(x, delta, plan, gate, from_output=from_output), out)
    assert torch.equal(x, x_before) and torch.equal(delta, delta_before)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("with_gate", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("from_output", [False, True], ids=["delta", "output"])
def test_backward_matches_reference(layout, with_gate, dtype, from_output, device, run):
    x, delta, plan, gate = make_case(layout, dtype, device, with_gate)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x)

    def grads(fn, *inputs):
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
        out = fn(*leaves[:2], plan, leaves[2], from_output=from_output)
        out.backward(grad_out.to(leaves[0].dtype))
        return [None if t is None else t.grad for t in leaves]

    actual = grads(run, x, delta, gate)
    expected = grads(reference.skip_residual, x.float(), delta.float(), upcast(gate))
    lowp = grads(reference.skip_residual, x, delta, gate)
    for name, a, e, lp in zip(("grad_x", "grad_delta", "grad_gate"), actual, expected, lowp):
        if e is None:
            assert a is None
            continue
        assert a.dtype == lp.dtype, name
        if name == "grad_gate" and not from_output:  # fp32 row dots of the dtype's inputs
            assert_close(a, lp, name=name)
        elif name == "grad_gate":  # <grad_out, y - x>: the kernel subtracts in fp32
            assert_close(a, e.to(a.dtype), name=name)
        else:
            assert_close(a, e, reference_lowp=lp, name=name)
    if LAYOUTS[layout][2]:  # padding slots get exactly zero gradient
        assert actual[1][~plan.valid].abs().sum() == 0


@pytest.mark.parametrize("from_output", [False, True], ids=["delta", "output"])
@pytest.mark.parametrize("layout", ["sample", "token_padded"])
def test_double_backward_is_exact(layout, from_output, device, run):
    """gradgradcheck in float64 on every backend: the backward under create_graph runs
    differentiable torch ops, never silent zeros."""
    mask = torch.tensor([True, False, True]) if layout == "sample" else torch.tensor(TOKEN_MASK)
    plan = route(mask.to(device))
    padded = LAYOUTS[layout][2]
    x = torch.randn(*plan.shape, 3, dtype=torch.float64, device=device)
    rows = (plan.shape[0], plan.max_count) if padded else (plan.num_active,)
    delta = torch.randn(*rows, 3, dtype=torch.float64, device=device)
    gate = torch.rand(plan.num_active, dtype=torch.float64, device=device)
    inputs = [t.requires_grad_() for t in (x, delta, gate)]

    def fn(x, delta, gate):
        return run(x, delta, plan, gate, from_output=from_output)

    assert torch.autograd.gradgradcheck(fn, inputs)
    # a second derivative that is not zero: d/dgate <grad(out), w> through grad_delta
    w = torch.randn_like(x)
    (grad_delta,) = torch.autograd.grad((fn(*inputs) * w).sum(), delta, create_graph=True)
    (second,) = torch.autograd.grad(grad_delta.sum(), gate)
    assert second.abs().sum() > 0


def test_grad_x_is_grad_out(device, run):
    """d out / d x is the identity: the backward hands grad_out through without a copy."""
    x, delta, plan, gate = make_case("token", torch.float32, device, True)
    x.requires_grad_()
    grad_out = torch.randn_like(x)
    (grad_x,) = torch.autograd.grad(run(x, delta, plan, gate), x, grad_out)
    assert grad_x.data_ptr() == grad_out.data_ptr()


@pytest.mark.parametrize("layout", ["sample", "token_padded"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_many_row_blocks(layout, backend, device, run, monkeypatch):
    """Triton: a tiny tile forces many row blocks and several feature iterations per row.
    C++: 8 x 512 rows of 32 features span several parallel_for chunks."""
    monkeypatch.setattr(ops_common, "_INTERPRETER_TILE", 16)
    monkeypatch.setattr(ops_common, "_GPU_TILE", 16)
    if backend == "cpp":
        monkeypatch.setitem(LAYOUTS, "sample", ((4096, 32), (4096,), False))
        monkeypatch.setitem(LAYOUTS, "token_padded", ((8, 512, 32), (8, 512), True))
    x, delta, plan, gate = make_case(layout, torch.float32, device, True)
    leaves = [t.clone().requires_grad_() for t in (x, delta, gate)]
    out, cos = run(*leaves[:2], plan, leaves[2], stats=True)
    expected, expected_cos = reference.skip_residual(x, delta, plan, gate, True)
    assert_close(out, expected)
    assert_close(cos, expected_cos, name="cos")
    grad_out = torch.randn_like(x)
    out.backward(grad_out)
    ref_leaves = [t.clone().requires_grad_() for t in (x, delta, gate)]
    reference.skip_residual(*ref_leaves[:2], plan, ref_leaves[2]).backward(grad_out)
    for a, e in zip(leaves, ref_leaves):
        assert_close(a.grad, e.grad, name="grad")


@pytest.mark.parametrize("keep", ["none", "all"])
@pytest.mark.parametrize("layout", ["sample", "token_padded"])
def test_no_rows_and_all_rows(keep, layout, device, run):
    mask_shape = LAYOUTS[layout][1]
    mask = torch.full(mask_shape, keep == "all")
    x, delta, plan, gate = make_case(layout, torch.float32, device, True, mask=mask)
    leaves = [t.clone().requires_grad_() for t in (x, delta, gate)]
    out, cos = run(*leaves[:2], plan, leaves[2], stats=True)
    assert_close(out, reference.skip_residual(x, delta, plan, gate))
    if keep == "all":  # the reference's stats path cannot reshape K == 0 rows (reported)
        assert_close(cos, reference.skip_residual(x, delta, plan, gate, True)[1], name="cos")
    else:
        assert torch.equal(out, x) and cos.shape == (0,)
    out.sum().backward()  # expanded (stride-0) grad_out
    assert torch.equal(leaves[0].grad, torch.ones_like(x))
    assert leaves[1].grad.shape == delta.shape and leaves[2].grad.shape == gate.shape


def test_non_contiguous_input(device, run):
    base = torch.randn(40, 3, 7).to(device)
    x = base.transpose(0, 2)  # [7, 3, 40], not contiguous
    plan = route(torch.tensor([True, False, True]).to(device)[None].expand(7, 3))
    delta = torch.randn(40, plan.num_active).to(device).t()  # [K, 40], not contiguous
    gate = torch.rand(2 * plan.num_active).to(device)[::2]  # stride 2
    leaves = [t.detach().requires_grad_() for t in (x, delta, gate)]
    out = run(*leaves[:2], plan, leaves[2])
    ref_leaves = [t.detach().clone().requires_grad_() for t in (x, delta, gate)]
    expected = reference.skip_residual(*ref_leaves[:2], plan, ref_leaves[2])
    assert_close(out, expected)
    grad_out = torch.randn(3, 7, 40).to(device).transpose(0, 1)  # [7, 3, 40], not contiguous
    out.backward(grad_out)
    expected.backward(grad_out)
    for a, e in zip(leaves, ref_leaves):
        assert_close(a.grad, e.grad, name="grad")


TOKEN_MASK = [[True, False, True], [False, False, True]]


@pytest.mark.parametrize(
    "mask, padded",
    [([True, False, True], False), (TOKEN_MASK, False), (TOKEN_MASK, True)],
    ids=["sample", "token", "token_padded"],
)
def test_gradcheck_float64(mask, padded, device, run):
    # tiny rows: the numerical Jacobian launches the kernel twice per input element
    plan = route(torch.tensor(mask, device=device))
    x = torch.randn(*plan.shape, 2, 3, dtype=torch.float64, device=device)
    rows = (plan.shape[0], plan.max_count) if padded else (plan.num_active,)
    delta = torch.randn(*rows, 2, 3, dtype=torch.float64, device=device)
    gate = torch.rand(plan.num_active, dtype=torch.float64, device=device)
    inputs = [t.requires_grad_() for t in (x, delta, gate)]
    fn = lambda x, delta, gate: run(x, delta, plan, gate)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("layout", ["token", "token_padded"])
@pytest.mark.parametrize("with_gate", [False, True])
def test_opcheck(layout, with_gate, backend, device):
    forward, backward = (getattr(torch.ops.sts, name).default for name in OPS[backend])
    x, delta, plan, gate = make_case(layout, torch.float32, device, with_gate)
    x2 = x.reshape(plan.num_rows, -1).requires_grad_()
    delta.requires_grad_()  # token layouts: one feature dim, already canonical
    if gate is not None:
        gate.requires_grad_()
    ids = (plan.index, plan.row_to_k, plan.offsets)
    for stats in (False, True):
        for from_output in (False, True):
            torch.library.opcheck(forward, (x2, delta, *ids, gate, stats, from_output))
    # the backward op has no autograd of its own (double backward runs torch ops instead)
    gate = None if gate is None else gate.detach()
    grad_out = torch.randn_like(x2).detach()
    for from_output in (False, True):
        args = (grad_out, x2.detach(), delta.detach(), *ids, gate, True, from_output)
        torch.library.opcheck(backward, args)


def test_torch_compile_fullgraph(backend, device):
    x, delta, plan, gate = make_case("token_padded", torch.float32, device, True)
    plan.max_count  # noqa: B018 - read Kmax outside the graph: the plan is precomputed

    def step(x, delta, gate):
        out, cos = sts_kernels.skip_residual(x * 2, delta, plan, gate, stats=True)
        return out.sin(), cos

    torch._dynamo.reset()
    # aot_eager: dynamo + AOTAutograd tracing of the opaque ops (inductor adds only CPU codegen)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (x, delta, gate)]
    with use_backend(backend):
        out, cos = compiled(*leaves)
        expected, expected_cos = step(x, delta, gate)
    assert_close(out, expected)
    assert_close(cos, expected_cos, name="cos")
    out.sum().backward()
    assert leaves[1].grad[~plan.valid].abs().sum() == 0 and leaves[2].grad.abs().sum() > 0


def test_auto_backend_on_cpu_is_cpp_when_built():
    cpu = torch.device("cpu")
    with use_backend("auto"):
        impl = _backend.select("skip_residual", cpu)
        x, delta, plan, gate = make_case("token", torch.float32, cpu, True)
        out = sts_kernels.skip_residual(x, delta, plan, gate)
    assert impl == ("cpp" if _backend.has_extension("cpu") else "reference")
    assert_close(out, reference.skip_residual(x, delta, plan, gate))


@pytest.mark.parametrize("want", ["auto", "cpp"])
def test_cuda_never_reaches_the_cpu_only_cpp_op(want, monkeypatch):
    """A GPU without Triton but with a CUDA build of the extension: the reference runs."""
    monkeypatch.setattr(_backend, "has_triton", lambda: False)
    monkeypatch.setattr(_backend, "has_extension", lambda device_type="cpu": True)
    cuda = torch.device("cuda")
    with use_backend(want):
        assert _backend.select("skip_residual", cuda) == "reference"


def test_bad_input_raises_before_any_kernel(run):
    x, delta, plan, gate = make_case("token", torch.float32, torch.device("cpu"), True)
    meta_plan = RoutePlan(
        *(t.to("meta") for t in (plan.index, plan.counts, plan.offsets)), plan.shape
    )
    with pytest.raises(ValueError, match="plan is on meta"):
        run(x, delta, meta_plan, gate)
    with pytest.raises(ValueError, match="gate must have shape"):
        run(x, delta, plan, gate[:-1])
    with pytest.raises(ValueError, match="delta must have shape"):
        run(x, delta[:-1], plan, gate)
    with pytest.raises(TypeError, match="delta must have x's dtype"):
        run(x, delta.half(), plan, gate)
    with pytest.raises(TypeError, match="plan must be a RoutePlan"):
        run(x, delta, plan.index, gate)
    with pytest.raises(ValueError, match="x must start with the mask's shape"):
        run(x[:, :-1], delta, plan, gate)
    with pytest.raises(TypeError, match="gate must have a floating dtype"):
        run(x, delta, plan, torch.ones(plan.num_active, dtype=torch.int64))
