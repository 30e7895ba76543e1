"""route / gather_rows / scatter_rows: the C++ extension ops and the Triton kernels against the
reference. Gather and scatter copy rows, so every comparison is exact."""

from __future__ import annotations

import pytest
import torch

import sts_kernels
from sts_kernels import _backend, reference
from sts_kernels._types import RoutePlan

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Triton runs on DEVICE: CUDA on a GPU machine, else CPU under the interpreter
NEEDS_TRITON = pytest.mark.skipif(
    not _backend.triton_runs_on(DEVICE), reason=f"Triton cannot run on {DEVICE}"
)
IMPLS = ["cpp", pytest.param("triton", marks=NEEDS_TRITON)]
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool)

# name -> mask factory (B, T) -> bool mask
MASKS = {
    "random": lambda: torch.rand(4, 9) < 0.5,
    "all_true": lambda: torch.ones(3, 5, dtype=torch.bool),
    "all_false": lambda: torch.zeros(3, 5, dtype=torch.bool),
    "one_row": lambda: torch.zeros(3, 5, dtype=torch.bool).index_put_(
        (torch.tensor([1]), torch.tensor([3])), torch.tensor(True)
    ),
    "batch_1": lambda: torch.tensor([[True, False, True, True, False]]),
    "time_1": lambda: torch.tensor([[True], [False], [True]]),
    "samples": lambda: torch.tensor([False, True, True, False, True]),
    "empty_sample": lambda: torch.tensor(
        [[True, True, False], [False, False, False], [False, True, True]]
    ),
}


def need(impl: str, device: torch.device = DEVICE) -> None:
    if impl == "cpp" and not _backend.has_extension(device.type):
        pytest.skip(f"sts_kernels._C is not built with {device.type} kernels (pip install -e .)")


def features(x_shape: tuple[int, ...], plan_shape: tuple[int, ...]) -> tuple[int, ...]:
    return x_shape[len(plan_shape) :]


def make_x(mask: torch.Tensor, feat: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    shape = (*mask.shape, *feat)
    if dtype == torch.bool:
        return torch.rand(shape, device=DEVICE) < 0.5
    if not dtype.is_floating_point:
        return torch.randint(-1000, 1000, shape, device=DEVICE, dtype=dtype)
    return torch.randn(shape, device=DEVICE, dtype=dtype)


def assert_same_plan(plan: RoutePlan, expected: RoutePlan) -> None:
    assert plan.shape == expected.shape
    for name in ("index", "counts", "offsets", "padded_index", "positions"):
        got, want = getattr(plan, name), getattr(expected, name)
        assert got.dtype == want.dtype == torch.int64, name
        assert torch.equal(got, want), f"{name}: {got} != {want}"


# ---------------------------------------------------------------------------------------------
# route


def _route(impl: str, mask: torch.Tensor) -> RoutePlan:
    need(impl)
    with sts_kernels.use_backend(impl):
        return sts_kernels.route(mask)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(MASKS))
def test_route_matches_reference(impl, case):
    mask = MASKS[case]().to(DEVICE)
    plan = _route(impl, mask)
    assert_same_plan(plan, reference.route(mask))
    assert torch.equal(plan.row_to_k, reference.route(mask).row_to_k)
    assert plan.padded_index.is_contiguous()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_route_random_shapes(impl, density):
    """Every output (row_to_k and the padded layout included) on masks of many shapes."""
    for shape in [(1,), (1, 1), (6,), (1, 7), (7, 1), (3, 17), (16, 128), (5, 1000)]:
        mask = torch.rand(shape, device=DEVICE) < density
        plan, expected = _route(impl, mask), reference.route(mask)
        assert_same_plan(plan, expected)
        assert torch.equal(plan.row_to_k, expected.row_to_k), shape


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(3, 40_000), (70_000,), (1, 50_001)])
def test_route_many_blocks(impl, shape):
    """Masks over several blocks: the CPU compaction's 16k rows, the Triton sweep's 64k under
    the interpreter (4k on a GPU): the running count crosses block boundaries."""
    mask = torch.rand(shape, device=DEVICE) < 0.3
    plan, expected = _route(impl, mask), reference.route(mask)
    assert_same_plan(plan, expected)
    assert torch.equal(plan.row_to_k, expected.row_to_k)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(0,), (2, 0)])
def test_route_empty_mask(impl, shape):
    plan = _route(impl, torch.zeros(shape, dtype=torch.bool, device=DEVICE))
    assert plan.index.shape == (0,) and plan.padded_index.shape == (shape[0], 0)
    assert torch.equal(plan.counts, torch.zeros(shape[0], dtype=torch.int64, device=DEVICE))
    assert torch.equal(plan.offsets, torch.zeros(shape[0] + 1, dtype=torch.int64, device=DEVICE))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("view", ["transposed", "strided"])
def test_route_non_contiguous_mask(impl, view):
    base = torch.rand(7, 8, device=DEVICE) < 0.5
    mask = base.t() if view == "transposed" else base[1::2, ::3]
    assert not mask.is_contiguous()
    plan, expected = _route(impl, mask), reference.route(mask.contiguous())
    assert_same_plan(plan, expected)
    assert torch.equal(plan.row_to_k, expected.row_to_k)


# ---------------------------------------------------------------------------------------------
# gather_rows forward


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(MASKS))
@pytest.mark.parametrize("padded", [False, True])
def test_gather_masks(impl, case, padded):
    need(impl)
    mask = MASKS[case]().to(DEVICE)
    if padded and mask.dim() != 2:
        pytest.skip("the padded layout is for [B, T] token masks")
    plan = reference.route(mask)
    x = make_x(mask, (6,), torch.float32)
    with sts_kernels.use_backend(impl):
        out = sts_kernels.gather_rows(x, plan, padded=padded)
    assert torch.equal(out, reference.gather_rows(x, plan, padded=padded))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("padded", [False, True])
def test_gather_dtypes(impl, dtype, padded):
    need(impl)
    mask = torch.rand(3, 7, device=DEVICE) < 0.6
    plan = reference.route(mask)
    x = make_x(mask, (5,), dtype)  # 5 elements: rows of 5, 10, 20 or 40 bytes
    with sts_kernels.use_backend(impl):
        out = sts_kernels.gather_rows(x, plan, padded=padded)
    assert out.dtype == dtype
    assert torch.equal(out, reference.gather_rows(x, plan, padded=padded))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "feat", [(), (1,), (3,), (2, 3), (3000,)], ids=["none", "1", "3", "2x3", "wide3000"]
)
def test_gather_row_widths(impl, feat):
    """Rows without features, of odd byte widths (fp16 x 3 = 6 bytes) and wide rows."""
    need(impl)
    mask = torch.rand(2, 6, device=DEVICE) < 0.5
    plan = reference.route(mask)
    x = make_x(mask, feat, torch.float16)
    for padded in (False, True):
        with sts_kernels.use_backend(impl):
            out = sts_kernels.gather_rows(x, plan, padded=padded)
        assert torch.equal(out, reference.gather_rows(x, plan, padded=padded))


@pytest.mark.parametrize("impl", IMPLS)
def test_gather_non_contiguous_input_left_unchanged(impl):
    need(impl)
    mask = torch.rand(3, 5, device=DEVICE) < 0.5
    plan = reference.route(mask)
    base = torch.randn(8, 5, 3, device=DEVICE)  # x = base viewed as [3, 5, 8]: not contiguous
    x = base.permute(2, 1, 0)[:3]
    assert not x.is_contiguous()
    before = x.clone()
    for padded in (False, True):
        with sts_kernels.use_backend(impl):
            out = sts_kernels.gather_rows(x, plan, padded=padded)
        assert torch.equal(out, reference.gather_rows(x, plan, padded=padded))
    assert torch.equal(x, before)


@pytest.mark.parametrize("impl", IMPLS)
def test_gather_view_at_odd_offset(impl):
    """A contiguous view starting 2 bytes into its storage: row copies must not assume
    8- or 16-byte aligned rows."""
    need(impl)
    mask = torch.rand(2, 5, device=DEVICE) < 0.5
    plan = reference.route(mask)
    x = torch.randn(2 * 5 * 4 + 1, device=DEVICE, dtype=torch.float16)[1:].view(2, 5, 4)
    with sts_kernels.use_backend(impl):
        out = sts_kernels.gather_rows(x, plan)
    assert torch.equal(out, reference.gather_rows(x, plan))


def test_gather_uses_extension_route_plan():
    """The plan from the extension's route drives the gather like the reference's does."""
    need("cpp")
    mask = torch.rand(4, 6, device=DEVICE) < 0.5
    x = torch.randn(4, 6, 3, device=DEVICE)
    with sts_kernels.use_backend("cpp"):
        plan = sts_kernels.route(mask)
        out = sts_kernels.gather_rows(x, plan, padded=True)
    expected = reference.gather_rows(x, reference.route(mask), padded=True)
    assert torch.equal(out, expected)
    assert torch.equal(plan.valid, out.abs().sum(-1) > 0)


# ---------------------------------------------------------------------------------------------
# backward (scatter_rows)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("padded", [False, True])
def test_gather_backward_is_exact_scatter(impl, dtype, padded):
    need(impl)
    mask = torch.rand(3, 8, device=DEVICE) < 0.5
    plan = reference.route(mask)
    x = torch.randn(3, 8, 4, device=DEVICE, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with sts_kernels.use_backend(impl):
        out = sts_kernels.gather_rows(x, plan, padded=padded)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    reference.gather_rows(x_ref, plan, padded=padded).backward(grad_out)
    assert torch.equal(x.grad, x_ref.grad)
    assert torch.count_nonzero(x.grad[~mask]) == 0  # rows outside the plan: exactly zero


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padded", [False, True])
def test_gather_gradcheck_float64(impl, padded):
    need(impl)
    mask = torch.tensor([[True, False, True], [False, False, True]], device=DEVICE)
    plan = reference.route(mask)
    x = torch.randn(2, 3, 2, device=DEVICE, dtype=torch.float64, requires_grad=True)

    def fn(t):
        with sts_kernels.use_backend(impl):
            return sts_kernels.gather_rows(t, plan, padded=padded)

    assert torch.autograd.gradcheck(fn, (x,))


SCATTER_OPS = {"cpp": "scatter_rows", "triton": "scatter_rows_triton"}


# a plan's index (1-D: every id a row) and its padded layout (2-D: -1 marks padding)
SCATTER_ROWS = {"flat": [4, 0, 6, 2], "padded": [[4, -1, 0], [6, -1, 2]]}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(SCATTER_ROWS))
def test_scatter_rows_op(impl, dtype, layout):
    need(impl)
    rows = torch.tensor(SCATTER_ROWS[layout], device=DEVICE)
    src = make_x(torch.ones(rows.shape, dtype=torch.bool), (3,), dtype)  # [*rows.shape, 3]
    out = getattr(torch.ops.sts, SCATTER_OPS[impl])(src, rows, 7)
    keep = rows >= 0
    expected = torch.zeros((7, 3), dtype=dtype, device=DEVICE).index_copy_(0, rows[keep], src[keep])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", list(SCATTER_ROWS))
def test_scatter_rows_gradcheck_float64(impl, layout):
    need(impl)
    rows = torch.tensor(SCATTER_ROWS[layout], device=DEVICE)
    src = torch.randn(*rows.shape, 2, device=DEVICE, dtype=torch.float64, requires_grad=True)
    op = getattr(torch.ops.sts, SCATTER_OPS[impl])
    assert torch.autograd.gradcheck(lambda s: op(s, rows, 7), (src,))


# ---------------------------------------------------------------------------------------------
# torch.library registration


def test_opcheck_cpp_ops():
    need("cpp", torch.device("cpu"))
    mask = torch.rand(3, 5) < 0.5
    rows = torch.tensor([7, -1, 0, 14, 3])  # add_rows skips -1
    x = torch.randn(15, 4, requires_grad=True)
    src = torch.randn(5, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.sts.route.default, (mask,))
    # both layouts of the row ids: a plan's index and its padded layout (-1: padding)
    for ids in (torch.tensor([7, 0, 14, 3]), torch.tensor([[7, -1], [0, 14], [-1, 3]])):
        grad = torch.randn(*ids.shape, 4, requires_grad=True)
        torch.library.opcheck(torch.ops.sts.gather_rows.default, (x, ids))
        torch.library.opcheck(torch.ops.sts.scatter_rows.default, (grad, ids, 15))
    torch.library.opcheck(torch.ops.sts.add_rows.default, (x.detach(), rows, src.detach()))


@NEEDS_TRITON
def test_opcheck_triton_ops():
    rows = torch.tensor([7, -1, 0, 3], device=DEVICE)  # add_rows skips -1
    x = torch.randn(8, 4, device=DEVICE, requires_grad=True)
    src = torch.randn(4, 4, device=DEVICE, requires_grad=True)
    for ids in (torch.tensor([7, 0, 3]), torch.tensor([[7, -1], [0, 3]])):
        ids = ids.to(DEVICE)
        grad = torch.randn(*ids.shape, 4, device=DEVICE, requires_grad=True)
        torch.library.opcheck(torch.ops.sts.gather_rows_triton.default, (x, ids))
        torch.library.opcheck(torch.ops.sts.scatter_rows_triton.default, (grad, ids, 8))
    torch.library.opcheck(torch.ops.sts.add_rows_triton.default, (x.detach(), rows, src.detach()))


def test_compile_fullgraph_gather_and_backward():
    """Fake kernels + autograd registration let Dynamo/AOT trace the ops without graph breaks."""
    need("cpp", torch.device("cpu"))
    rows = torch.tensor([[5, -1, 1]])  # the padded layout: -1 is a padding slot
    x = torch.randn(6, 3, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fn(t):
        return (torch.ops.sts.gather_rows(t, rows) * 2).sum()

    fn(x).backward()
    expected = torch.zeros(6, 3)
    expected[[5, 1]] = 2
    assert torch.equal(x.grad, expected)


# ---------------------------------------------------------------------------------------------
# bad input


def test_route_rejects_non_bool_mask():
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        sts_kernels.route(torch.ones(2, 3))


def test_route_rejects_3d_mask():
    with pytest.raises(ValueError, match="mask must be"):
        sts_kernels.route(torch.ones(2, 3, 4, dtype=torch.bool))


def test_gather_rejects_mask_shape_not_prefix():
    plan = reference.route(torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="x must start with the mask's shape"):
        sts_kernels.gather_rows(torch.randn(3, 2, 4), plan)


def test_gather_rejects_plan_from_another_device():
    meta = dict(dtype=torch.int64, device="meta")
    plan = RoutePlan(
        index=torch.empty(6, **meta),
        counts=torch.empty(2, **meta),
        offsets=torch.empty(3, **meta),
        shape=(2, 3),
    )
    with pytest.raises(ValueError, match="plan is on meta"):
        sts_kernels.gather_rows(torch.randn(2, 3, 4), plan)


def test_gather_rejects_padded_sample_plan():
    plan = reference.route(torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="padded=True needs a"):
        sts_kernels.gather_rows(torch.randn(2, 4), plan, padded=True)


def test_cpp_ops_reject_bad_rows():
    need("cpp", torch.device("cpu"))
    x = torch.randn(4, 2)
    with pytest.raises(RuntimeError, match="rows must be a 1-D int64"):
        torch.ops.sts.gather_rows(x, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="rows must be a 1-D int64"):
        torch.ops.sts.gather_rows(x, torch.zeros(1, 1, 1, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"rows\[1\] = 4 is not a row id in \[0, 4\)"):
        torch.ops.sts.gather_rows(x, torch.tensor([0, 4]))
    with pytest.raises(RuntimeError, match="mask must be bool"):
        torch.ops.sts.route(torch.ones(3))


@NEEDS_TRITON
def test_triton_route_rejects_bad_mask():
    for mask in (
        torch.ones(3, device=DEVICE),
        torch.ones(2, 3, 4, dtype=torch.bool, device=DEVICE),
    ):
        with pytest.raises(ValueError, match="mask must be a bool"):
            torch.ops.sts.route_triton(mask)
    # past the kernel's int32 row count (an expanded view: no memory behind it)
    huge = torch.ones(1, 1, dtype=torch.bool, device=DEVICE).expand(2**16, 2**15)
    with pytest.raises(ValueError, match="at most"):
        torch.ops.sts.route_triton(huge)


# ---- sts::add_rows / sts::add_rows_triton (the skipper's gather backward, ops/skip_glue.py)


@pytest.mark.parametrize(
    "impl,error",
    [pytest.param("cpp", RuntimeError), pytest.param("triton", ValueError, marks=NEEDS_TRITON)],
)
def test_add_rows_rejects_bad_arguments(impl, error):
    """The raw ops check what keeps them inside dst and src, before writing anything."""
    need(impl, torch.device("cpu"))
    op = getattr(torch.ops.sts, {"cpp": "add_rows", "triton": "add_rows_triton"}[impl])
    dst, ids, src = torch.randn(6, 4), torch.tensor([0, 2]), torch.randn(2, 4)
    bad = {
        "rows must be a 1-D int64": (dst, ids.int(), src),
        "contiguous": (torch.randn(4, 6).t(), ids, src),
        "src has 3 rows|src must be": (dst, ids, torch.randn(3, 4)),
        "differ from dst|src must be": (dst, ids, torch.randn(2, 5)),
        "must match dst": (dst, ids, src.double()),
    }
    for message, args in bad.items():
        kept = args[0].clone()
        with pytest.raises(error, match=message):
            op(*args)
        assert torch.equal(args[0], kept)
    with pytest.raises((TypeError, RuntimeError), match="floating point"):
        op(torch.zeros(6, 4, dtype=torch.int64), ids, torch.zeros(2, 4, dtype=torch.int64))
