"""Tolerances per dtype, in one place.

fp32/fp64 results are compared with tight absolute/relative bounds. A low-precision result
(fp16/bf16) is judged against the fp32 reference: its error may be at most twice the error
the reference itself makes when run in that low precision (plus a tiny floor for exact
cases), so the kernel must be as accurate as eager PyTorch, not merely "close".
"""

import torch

TIGHT = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
}
LOW_PRECISION = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def assert_close(actual, expected, *, reference_lowp=None, name="output"):
    """`expected` is the fp32 (or exact-dtype) reference; for fp16/bf16 `actual`, pass the
    reference computed in that dtype as `reference_lowp`."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    if actual.dtype in TIGHT:
        torch.testing.assert_close(
            actual, expected.to(actual.dtype), **TIGHT[actual.dtype], msg=lambda m: f"{name}: {m}"
        )
        return
    assert reference_lowp is not None, f"{name}: {actual.dtype} needs the low-precision reference"
    exp = expected.double()
    err = (actual.double() - exp).abs().max().item() if actual.numel() else 0.0
    ref_err = (reference_lowp.double() - exp).abs().max().item() if actual.numel() else 0.0
    eps = torch.finfo(actual.dtype).eps
    floor = eps * max(exp.abs().max().item() if exp.numel() else 0.0, 1e-3)
    bound = 2 * ref_err + floor
    assert err <= bound, (
        f"{name} ({actual.dtype}): max error {err:.3g} > 2 x reference error {ref_err:.3g} (+ {floor:.2g})"
    )
