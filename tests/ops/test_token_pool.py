"""token_pool: Triton kernels (interpreter on CPU) against the reference, ops, compile, checks."""

import importlib

import pytest
import torch
import torch.nn.functional as F

import sts_kernels
from sts_kernels import reference
from sts_kernels.ops import _common as ops_common
from tests.tolerances import DTYPES, LOW_PRECISION, assert_close

token_pool = sts_kernels.token_pool
token_pool_module = importlib.import_module("sts_kernels.ops.token_pool")

# (grid, window): divisible, odd grids with clipped edge windows, window larger than the grid
CASES = [((4, 4), (2, 2)), ((5, 7), (2, 2)), ((5, 7), (3, 3)), ((5, 7), (2, 3)), ((3, 2), (4, 4))]


def _triton_pool(x, grid, window):
    with sts_kernels.use_backend("triton"):
        return token_pool(x, grid, window)


def _fwd_bwd(fn, x, grad):
    x = x.detach().requires_grad_(True)
    y = fn(x)
    (dx,) = torch.autograd.grad(y, x, grad)
    return y, dx


def _check_against_reference(x, grid, window):
    """Triton forward and backward against the fp32 reference on the same (rounded) input,
    within the low-precision reference's own error."""
    g = torch.randn_like(reference.token_pool(x.float(), grid, window)).to(x.dtype)
    y, dx = _fwd_bwd(lambda t: _triton_pool(t, grid, window), x, g)
    y_ref, dx_ref = _fwd_bwd(lambda t: reference.token_pool(t, grid, window), x.float(), g.float())
    lowp = {}
    if x.dtype in LOW_PRECISION:
        y_lp, dx_lp = _fwd_bwd(lambda t: reference.token_pool(t, grid, window), x, g)
        lowp = dict(y=y_lp, dx=dx_lp)
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    assert_close(y, y_ref, reference_lowp=lowp.get("y"), name="y")
    assert_close(dx, dx_ref, reference_lowp=lowp.get("dx"), name="dx")


def test_reference_is_avg_pool2d():
    """The spec's definition: avg_pool2d with ceil_mode and count_include_pad=False."""
    b, (h, w), d = 2, (5, 7), 3
    x = torch.randn(b, h * w, d)
    expected = F.avg_pool2d(
        x.view(b, h, w, d).permute(0, 3, 1, 2), 2, 2, ceil_mode=True, count_include_pad=False
    )
    expected = expected.permute(0, 2, 3, 1).reshape(b, -1, d)
    torch.testing.assert_close(reference.token_pool(x, (h, w), (2, 2)), expected)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("grid", "window"), CASES, ids=str)
def test_triton_matches_reference(dtype, grid, window, triton_device):
    x = torch.randn(2, grid[0] * grid[1], 24, device=triton_device).to(dtype)
    _check_against_reference(x, grid, window)


@pytest.mark.interpreter
def test_non_contiguous_input(triton_device):
    x = torch.randn(3, 2, 35, device=triton_device).transpose(1, 2)  # [3, 35, 2] strided
    torch.testing.assert_close(
        _triton_pool(x, (5, 7), (2, 2)), reference.token_pool(x, (5, 7), (2, 2))
    )


@pytest.mark.interpreter
def test_edge_window_counts(triton_device):
    """All-ones tokens of a 5x7 grid with 3x3 windows: every window mean is exactly 1, and the
    gradient of the sum is 1/count of the token's (clipped) window."""
    x = torch.ones(1, 35, 4, device=triton_device, requires_grad=True)
    y = _triton_pool(x, (5, 7), (3, 3))
    assert y.shape == (1, 2 * 3, 4)
    torch.testing.assert_close(y, torch.ones_like(y))
    y.sum().backward()
    # window counts of a 5x7 grid in 3x3 windows: rows 3,2 x cols 3,3,1
    counts = (
        torch.tensor([3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 1.0])[None, :]
        * torch.tensor([3.0, 3.0, 3.0, 2.0, 2.0])[:, None]
    )
    expected = (1 / counts).reshape(1, 35, 1).expand(1, 35, 4)
    torch.testing.assert_close(x.grad, expected.to(triton_device))


@pytest.mark.interpreter
def test_gradcheck_float64(triton_device):
    # a 2x3 grid in 2x2 windows: one full and one clipped window
    x = torch.randn(1, 6, 2, dtype=torch.float64, device=triton_device, requires_grad=True)
    fn = lambda t: _triton_pool(t, (2, 3), (2, 2))
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.interpreter
def test_opcheck(triton_device):
    x = torch.randn(2, 35, 8, device=triton_device, requires_grad=True)
    torch.library.opcheck(torch.ops.sts.token_pool_triton.default, (x, 5, 7, 2, 3))
    g = torch.randn(2, 9, 8, device=triton_device, requires_grad=True)
    torch.library.opcheck(torch.ops.sts.token_pool_backward_triton.default, (g, 5, 7, 2, 3))


@pytest.mark.interpreter
def test_compile_fullgraph(triton_device):
    x = torch.randn(2, 35, 8, device=triton_device, requires_grad=True)
    fn = lambda t: token_pool(t, (5, 7), (2, 2)) * 2
    with sts_kernels.use_backend("triton"):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        y = compiled(x)
    y_ref = reference.token_pool(x, (5, 7), (2, 2)) * 2
    torch.testing.assert_close(y, y_ref)
    (dx,) = torch.autograd.grad(y.sum(), x)
    (dx_ref,) = torch.autograd.grad(y_ref.sum(), x)
    torch.testing.assert_close(dx, dx_ref)


@pytest.mark.interpreter
def test_triton_path_is_used(monkeypatch, triton_device):
    """use_backend('triton') dispatches to the custom op, 'reference' does not."""
    calls = []
    real = token_pool_module._token_pool_triton
    monkeypatch.setattr(
        token_pool_module, "_token_pool_triton", lambda *a: calls.append(a) or real(*a)
    )
    x = torch.randn(1, 4, 2, device=triton_device)
    _triton_pool(x, (2, 2), (2, 2))
    assert len(calls) == 1
    with sts_kernels.use_backend("reference"):
        token_pool(x, (2, 2), (2, 2))
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        (dict(grid=(5, 6)), ValueError, "grid"),
        (dict(window=(0, 2)), ValueError, "window"),
        (dict(window=(2, -1)), ValueError, "window"),
        (dict(window=(2, 2, 2)), TypeError, "window"),
        (dict(grid=(5.0, 7)), TypeError, "grid"),
        (dict(x=torch.zeros(2, 35, 4, dtype=torch.int64)), TypeError, "x"),
        (dict(x=torch.zeros(35, 4)), ValueError, "x"),
        (dict(x=[[0.0]]), TypeError, "x"),
    ],
)
def test_bad_input(kwargs, exc, words):
    args = dict(x=torch.zeros(2, 35, 4), grid=(5, 7), window=(2, 2)) | kwargs
    with pytest.raises(exc, match=words):
        token_pool(args["x"], args["grid"], args["window"])


@pytest.mark.interpreter
def test_many_programs(triton_device, monkeypatch):
    """16-element tiles: many programs along tokens and features, partial tiles at both ends."""
    monkeypatch.setattr(ops_common, "_INTERPRETER_TILE", 16)
    monkeypatch.setattr(ops_common, "_GPU_TILE", 16)
    _check_against_reference(torch.randn(2, 35, 24, device=triton_device), (5, 7), (2, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("grid", "window"), [((24, 24), (2, 2)), ((27, 37), (3, 2))], ids=str)
def test_gpu_large(dtype, grid, window):
    x = torch.randn(4, grid[0] * grid[1], 1024, device="cuda").to(dtype)
    _check_against_reference(x, grid, window)


@pytest.mark.gpu
def test_gpu_offsets_past_int32():
    """B*N*D > 2^31 elements: the last sample lies past int32 offsets (4.3 GB of bf16)."""
    x = torch.randn(4, 1024, (1 << 19) + 8, device="cuda", dtype=torch.bfloat16)
    assert x.numel() > 2**31
    x.requires_grad_(True)
    y = _triton_pool(x, (32, 32), (2, 2))
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    y_ref = reference.token_pool(x[-1:].float(), (32, 32), (2, 2))
    assert_close(y[-1:], y_ref, reference_lowp=reference.token_pool(x[-1:], (32, 32), (2, 2)))
    assert torch.equal(dx[-1], torch.full_like(dx[-1], 0.25))
