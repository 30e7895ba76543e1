"""One module per op: Triton kernels, launchers, torch.library registration and the public
function that validates input and dispatches to the backend `_backend.select` picks from
`_backend.TABLE` (the one place that says which backend serves which op on which device).

Modules: token_pool, bipartite_merge (+ unmerge), routing (route, gather_rows and the row
kernels), skip_residual, and skip_glue: the skipper's gather + combine as one op
(`gather_for_layer`), where the rule for its in-place gradient add lives.

Naming rule:
- custom ops: `sts::<kernel>` is the compiled extension's (`sts_kernels._C`, csrc/: C++ on the
  CPU, CUDA where it has CUDA kernels), `sts::<kernel>_triton` its Triton twin or a Triton-only
  kernel; `_common.kernel(name, backend)` resolves a name by this rule. The Python body of
  `sts::<kernel>_triton` is the function `_<kernel>_triton`.
- a function that launches a Triton kernel `_<name>_kernel` (other than the op body itself) is
  `_launch_<name>`.
"""

from .bipartite_merge import bipartite_merge, unmerge
from .routing import gather_rows, route
from .skip_glue import gather_for_layer
from .skip_residual import skip_residual
from .token_pool import token_pool

__all__ = [
    "token_pool",
    "bipartite_merge",
    "unmerge",
    "route",
    "gather_rows",
    "skip_residual",
    "gather_for_layer",
]
