"""Launch and registration helpers shared by the op modules."""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from .._backend import triton_interpreter
from .._triton import tl, triton

# Elements per program tile. A GPU program holds its tile in registers, so ~4K elements
# (16 per thread at 8 warps); the interpreter pays ~5 ms per program whatever its size, so
# it gets 16x larger tiles and fewer programs.
_GPU_TILE = 1 << 12
_INTERPRETER_TILE = 1 << 16


def kernel(name: str, backend: str):
    """The custom op of kernel `name` on `backend`, by the naming rule (`sts_kernels.ops`):
    `torch.ops.sts.<name>` from the extension ("cpp"), `torch.ops.sts.<name>_triton` from
    Triton."""
    return getattr(torch.ops.sts, f"{name}_triton" if backend == "triton" else name)


def on_input_device(op):
    """The body of a custom op that launches Triton kernels, run with the CUDA device of its
    first tensor argument current: Triton launches on the current device and its stream, not
    on the tensors' (a model split over GPUs in one process would otherwise launch on the
    wrong one). Decorate the function under `@torch.library.custom_op` (whose schema comes
    from the annotations, read as strings in this module: hence `Tensor` imported here)."""

    @functools.wraps(op)
    def run(*args, **kwargs):
        first = next((a for a in args if isinstance(a, Tensor)), None)
        if first is None or first.device.type != "cuda":
            return op(*args, **kwargs)
        with torch.cuda.device(first.device):
            return op(*args, **kwargs)

    run.on_input_device = True
    return run


def check_values(t: torch.Tensor) -> bool:
    """Whether to validate the values of `t` (index ranges, positive sizes) on the host: always
    for CPU tensors (no device sync), for GPU tensors only with `STS_DEBUG=1` (a host sync per
    check), never while `torch.compile` traces (data-dependent control flow)."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or os.environ.get("STS_DEBUG", "0") == "1"


def acc_dtype(dtype: torch.dtype):
    """Accumulator type: fp64 stays fp64 (gradcheck); fp32, fp16 and bf16 accumulate in fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def tile_shape(rows: int, cols: int, max_cols: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, num_warps) of a power-of-2 tile over a `[rows, cols]` problem,
    wide along the contiguous `cols` (at most `max_cols`, default the whole tile)."""
    tile = _INTERPRETER_TILE if triton_interpreter() else _GPU_TILE
    block_cols = min(triton.next_power_of_2(max(cols, 1)), max_cols or tile, tile)
    block_rows = min(triton.next_power_of_2(max(rows, 1)), max(tile // block_cols, 1))
    num_warps = 8 if block_rows * block_cols >= _GPU_TILE else 4
    return block_rows, block_cols, num_warps


def register_adjoint_autograd(gather: str, scatter: str, row_dim: int) -> None:
    """Autograd for a pair of linear ops that are each other's adjoint (transpose):
    `gather(x, ids)` reads rows `ids` of `x` along `row_dim`, and `scatter(src, ids, num_rows)`
    sums the rows of `src` back into `num_rows` rows. The gradient of each is the other."""
    gather_op = getattr(torch.ops.sts, gather.split("::")[1])
    scatter_op = getattr(torch.ops.sts, scatter.split("::")[1])

    def gather_setup(ctx, inputs, output) -> None:
        x, ids = inputs
        ctx.num_rows = x.shape[row_dim]
        ctx.save_for_backward(ids)

    def gather_backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        return scatter_op(grad, ids, ctx.num_rows), None

    def scatter_setup(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    def scatter_backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        return gather_op(grad, ids), None, None

    torch.library.register_autograd(gather, gather_backward, setup_context=gather_setup)
    torch.library.register_autograd(scatter, scatter_backward, setup_context=scatter_setup)
