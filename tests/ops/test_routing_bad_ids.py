"""A hand-built `RoutePlan` whose `index` holds an id that names no row (-1, or R and past):
what every backend does with it (docs/STS_SPEC.md §2, plan validation).

- reference: ValueError naming `plan.index` (the ids are read on the CPU).
- cpp: RuntimeError naming the op and the id, raised on the host before anything is copied.
- triton (and the CUDA kernels, same rule, GPU only): the gather writes a poison row for it
  (NaN for floating dtypes, never a zero row, never an out-of-bounds read) and the scatter,
  the row add and skip_residual write nothing for it.

The padded layout is the exception that is not one: -1 is how `padded_index` marks the slots
past a sample's count, so a padded gather gives zero rows there on every backend; only ids that
are wrong in that layout too (R and past, below -1) are errors / poison.
"""

from __future__ import annotations

import pytest
import torch

import sts_kernels
from sts_kernels import _backend, reference
from sts_kernels._types import RoutePlan
from sts_kernels.ops.skip_glue import gather_for_layer, gather_rows_passthrough

CPU = torch.device("cpu")
R = 6  # rows of the (2, 3) plans below


def need_cpp() -> None:
    if not _backend.has_extension("cpu"):
        pytest.skip("sts_kernels._C is not built (pip install --no-build-isolation -e .)")


def bad_plan(bad: int) -> RoutePlan:
    """(2, 3) plan: sample 0 runs rows 1, 2; sample 1 row 3 and `bad`, a malformed id."""
    return RoutePlan(
        index=torch.tensor([1, 2, 3, bad]),
        counts=torch.tensor([2, 2]),
        offsets=torch.tensor([0, 2, 4]),
        shape=(2, 3),
    )


def clean_plan() -> RoutePlan:
    """`bad_plan` without its bad id."""
    return reference.route(torch.tensor([[False, True, True], [True, False, False]]))


BAD_IDS = [-1, R, 2**40, -7]


def make_x(dtype: torch.dtype, feat: tuple[int, ...] = (5,)) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(2, 3, *feat) < 0.5
    if not dtype.is_floating_point:
        return torch.randint(0 if dtype == torch.uint8 else -100, 100, (2, 3, *feat), dtype=dtype)
    return torch.randn(2, 3, *feat).to(dtype)


def is_poison(t: torch.Tensor) -> bool:
    """The poison row of t's dtype: NaN (floats), all bits set (integers), True (bool)."""
    if t.dtype.is_floating_point:
        return bool(t.isnan().all())
    if t.dtype == torch.bool:
        return bool(t.all())
    return bool((t == (255 if t.dtype == torch.uint8 else -1)).all())


# ---- reference and cpp raise ----------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("padded", [False, True])
def test_reference_raises(bad, padded):
    x = torch.randn(2, 3, 4)
    with sts_kernels.use_backend("reference"), pytest.raises(ValueError, match="plan.index"):
        sts_kernels.gather_rows(x, bad_plan(bad), padded=padded)


@pytest.mark.parametrize("bad", BAD_IDS)
def test_cpp_gather_raises_naming_the_op_and_the_id(bad):
    """-1 included: in a plan's index (1-D ids) it is no row. The check runs on the host
    before the parallel copy (an exception inside at::parallel_for killed the process)."""
    need_cpp()
    x = torch.randn(2, 3, 4, requires_grad=True)
    message = rf"sts::gather_rows: rows\[3\] = {bad} is not a row id in \[0, {R}\)"
    with sts_kernels.use_backend("cpp"):
        with pytest.raises(RuntimeError, match=message):
            sts_kernels.gather_rows(x, bad_plan(bad))
        with pytest.raises(RuntimeError, match=message):  # the skipper's gather
            gather_for_layer(x, bad_plan(bad))


@pytest.mark.parametrize("bad", [R, 2**40, -7])
def test_cpp_padded_gather_raises_for_ids_bad_in_that_layout(bad):
    need_cpp()
    with sts_kernels.use_backend("cpp"), pytest.raises(RuntimeError, match=f"= {bad} .*nor -1"):
        sts_kernels.gather_rows(torch.randn(2, 3, 4), bad_plan(bad), padded=True)


def test_cpp_raw_ops_by_layout():
    """The raw ops: 1-D ids must all be rows (-1 raises, in the gather and the scatter); the
    2-D padded layout takes -1 as a padding slot (a zero row; nothing scattered)."""
    need_cpp()
    x = torch.randn(R, 3)
    for op, args in {
        "gather_rows": (x, torch.tensor([0, -1])),
        "scatter_rows": (x[:2], torch.tensor([0, -1]), R),
    }.items():
        with pytest.raises(RuntimeError, match=rf"sts::{op}: rows\[1\] = -1 is not a row id"):
            getattr(torch.ops.sts, op)(*args)
    padded = torch.tensor([[4, -1], [0, 2]])
    out = torch.ops.sts.gather_rows(x, padded)
    assert out.shape == (2, 2, 3)
    assert torch.equal(out[padded >= 0], x[padded[padded >= 0]])
    assert torch.equal(out[0, 1], torch.zeros(3))
    back = torch.ops.sts.scatter_rows(out, padded, R)
    assert torch.equal(back[[4, 0, 2]], x[[4, 0, 2]]) and not back[[1, 3, 5]].any()
    with pytest.raises(RuntimeError, match="src must start with rows' shape"):
        torch.ops.sts.scatter_rows(out[:1], padded, R)


def test_cpp_add_rows_skips_bad_ids():
    """The row add (the skipper's gather backward) skips every id outside [0, R), as before:
    it runs only after a gather that checked the same ids."""
    need_cpp()
    dst, src = torch.zeros(R, 2), torch.ones(3, 2)
    torch.ops.sts.add_rows(dst, torch.tensor([-1, 2, R]), src)
    assert torch.equal(dst.sum(1), torch.tensor([0.0, 0, 2, 0, 0, 0]))


# ---- triton: poison rows, never zeros ------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize(
    "dtype",
    (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8,
     torch.bool),
    ids=str,
)  # fmt: skip
def test_triton_gather_writes_poison_rows(bad, dtype):
    x = make_x(dtype)
    with sts_kernels.use_backend("triton"):
        out = sts_kernels.gather_rows(x, bad_plan(bad))
    flat = x.view(R, -1)
    assert out.shape == (4, 5) and out.dtype == dtype
    assert torch.equal(out[:3], flat[[1, 2, 3]])
    assert is_poison(out[3]), out[3]


@pytest.mark.interpreter
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("feat", [(), (3,), (4,), (3000,)], ids=["none", "3", "4", "wide"])
def test_triton_gather_poison_any_word_width(offset, feat):
    """fp16 rows of 2 to 6000 bytes, aligned or not: the kernel copies 8-, 4- or 2-byte words
    and the poison is NaN in each."""
    numel = 2 * 3 * max(1, len(feat) and feat[0])
    x = torch.randn(numel + offset, dtype=torch.float16)[offset:].view(2, 3, *feat)
    with sts_kernels.use_backend("triton"):
        out = sts_kernels.gather_rows(x, bad_plan(-1))
    assert torch.equal(out[:3], x.view(R, *feat)[[1, 2, 3]])
    assert out[3].isnan().all()


@pytest.mark.interpreter
@pytest.mark.parametrize("bad", BAD_IDS)
def test_triton_padded_gather(bad):
    """Padding slots (-1 in padded_index) stay zero rows; a hand-built -1 in index lands in a
    slot the layout calls padding (plan.valid is False there): zeros too. Ids bad in the padded
    layout as well (R and past, below -1): poison."""
    x = torch.randn(2, 3, 4)
    plan = bad_plan(bad)
    with sts_kernels.use_backend("triton"):
        out = sts_kernels.gather_rows(x, plan, padded=True)
    assert out.shape == (2, 2, 4)
    assert torch.equal(out[0], x.view(R, 4)[[1, 2]]) and torch.equal(out[1, 0], x.view(R, 4)[3])
    if bad == -1:
        assert torch.equal(out[1, 1], torch.zeros(4)) and not plan.valid[1, 1]
    else:
        assert out[1, 1].isnan().all()
    # a plan from route: its padding slots are zero rows
    mask = torch.tensor([[True, False, True], [False, True, False]])
    with sts_kernels.use_backend("triton"):
        out = sts_kernels.gather_rows(x, sts_kernels.route(mask), padded=True)
    assert torch.equal(out, reference.gather_rows(x, reference.route(mask), padded=True))
    assert torch.equal(out[1, 1], torch.zeros(4))


@pytest.mark.interpreter
def test_triton_raw_ops_by_layout():
    x = torch.randn(R, 3)
    out = torch.ops.sts.gather_rows_triton(x, torch.tensor([4, -1, R, -3]))
    assert torch.equal(out[0], x[4]) and out[1:].isnan().all()
    out = torch.ops.sts.gather_rows_triton(x, torch.tensor([[4, -1], [R, -3]]))
    assert out.shape == (2, 2, 3)
    assert torch.equal(out[0, 0], x[4]) and torch.equal(out[0, 1], torch.zeros(3))
    assert out[1].isnan().all()
    # no rows to read at all: every id is malformed, or padding
    empty = x[:0]
    assert torch.ops.sts.gather_rows_triton(empty, torch.tensor([0, -1])).isnan().all()
    out = torch.ops.sts.gather_rows_triton(empty, torch.tensor([[0, -1]]))
    assert out[0, 0].isnan().all() and torch.equal(out[0, 1], torch.zeros(3))
    # the scatter writes nothing for a bad id, in both layouts
    src = torch.randn(4, 3)
    for rows in (torch.tensor([4, -1, R, 2**40]), torch.tensor([[4, -1], [R, 2**40]])):
        out = torch.ops.sts.scatter_rows_triton(src.view(*rows.shape, 3), rows, R)
        assert torch.equal(out[4], src[0]) and not out[[0, 1, 2, 3, 5]].any()


@pytest.mark.interpreter
@pytest.mark.parametrize("bad", BAD_IDS)
def test_triton_backward_and_skipper_glue_ignore_the_bad_id(bad):
    """The gather's backward (the scatter) and the skipper's glue (gather and combine, with
    the in-place backward add) write nothing for the bad id: x's gradient is the clean plan's
    and finite."""
    x = torch.randn(2, 3, 4, requires_grad=True)
    results = {}
    for name, plan in {"bad": bad_plan(bad), "clean": clean_plan()}.items():
        with sts_kernels.use_backend("triton"):
            out = sts_kernels.gather_rows(x, plan)
            (g_plain,) = torch.autograd.grad(out[:3].sum(), x)
            rows, combine = gather_for_layer(x, plan)
            assert rows.shape[0] == plan.num_active
            y = combine(rows * 2)  # kept rows: 2x; skipped: x
            (g_glue,) = torch.autograd.grad(y.sum(), x)
        results[name] = (g_plain, g_glue, y)
    for got, want in zip(results["bad"], results["clean"]):
        assert torch.equal(got, want)
    assert results["bad"][1].isfinite().all()


@pytest.mark.interpreter
@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("padded", [False, True])
def test_triton_glue_out_of_place_add_ignores_the_bad_id(bad, padded):
    """The glue's out-of-place backward add (no gradient reaches x_pass here): a bad id adds
    nothing; -1 does not wrap onto row R-1, R does not raise or fault."""
    x = torch.randn(2, 3, 4, requires_grad=True)
    with sts_kernels.use_backend("triton"):
        rows, _ = gather_rows_passthrough(x, bad_plan(bad), padded=padded)
    (grad,) = torch.autograd.grad(rows.nan_to_num().sum(), x)
    expected = torch.zeros(R, 4)
    expected[[1, 2, 3]] = 1
    assert torch.equal(grad.view(R, 4), expected)


@pytest.mark.interpreter
def test_triton_add_rows_skips_bad_ids():
    dst, src = torch.zeros(R, 2), torch.ones(4, 2)
    torch.ops.sts.add_rows_triton(dst, torch.tensor([-1, 2, R, -9]), src)
    assert torch.equal(dst.sum(1), torch.tensor([0.0, 0, 2, 0, 0, 0]))
