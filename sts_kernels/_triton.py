"""`triton` and `triton.language` when installed, else stand-ins that let the op modules
define their kernels at import time (the kernels are then never launched)."""

from __future__ import annotations

import os
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


def autotune(key: list[str], configs: list[dict], interpreted: dict, keep=None):
    """`@triton.autotune` over `configs` (meta-parameters plus `num_warps`/`num_stages`), keyed
    on the arguments named in `key`; `keep(config, **launch_kwargs)` drops the configs that do
    not suit a launch (e.g. its dtype). Under TRITON_INTERPRET=1 only the `interpreted`
    config: autotuning would run every config (~5 ms a program each), and the interpreter
    wants a few big tiles."""
    if not HAS_TRITON:
        return lambda fn: fn
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        configs = [interpreted]
    options = ("num_warps", "num_stages")
    compiled = [
        triton.Config(
            {k: v for k, v in c.items() if k not in options},
            **{k: v for k, v in c.items() if k in options},
        )
        for c in configs
    ]

    def prune(candidates, named_args, **launch_kwargs):
        pairs = zip(compiled, configs)
        return [t for t, c in pairs if t in candidates and keep(c, **launch_kwargs)]

    return triton.autotune(
        compiled, key=key, prune_configs_by=None if keep is None else {"early_config_prune": prune}
    )


__all__ = ["HAS_TRITON", "autotune", "triton", "tl"]
