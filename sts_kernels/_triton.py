"""`triton` and `triton.language` when installed, else stand-ins that let the op modules
define their kernels at import time (the kernels are then never launched)."""

from __future__ import annotations

import types

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the package works without Triton: reference / C++ backends only
    HAS_TRITON = False

    class _Constexpr:  # annotation placeholder for `tl.constexpr`
        pass

    triton = types.SimpleNamespace(
        jit=lambda fn: fn,
        cdiv=lambda a, b: -(-a // b),
        next_power_of_2=lambda n: 1 << max(n - 1, 0).bit_length(),
    )
    tl = types.SimpleNamespace(constexpr=_Constexpr)

__all__ = ["HAS_TRITON", "triton", "tl"]
