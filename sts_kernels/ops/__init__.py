"""One module per op: Triton kernels, launcher, torch.library registration and the public
function that validates input and dispatches to a backend."""

from .bipartite_merge import bipartite_merge, unmerge
from .routing import gather_rows, route
from .skip_residual import skip_residual
from .token_pool import token_pool

__all__ = ["token_pool", "bipartite_merge", "unmerge", "route", "gather_rows", "skip_residual"]
