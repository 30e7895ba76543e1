"""sts_kernels: fused kernels for the Sparse Training Scheme of multimodal LLMs.

Visual Token Compressor: `token_pool`, `bipartite_merge`, `unmerge`.
Layer Dynamic Skipper: `route`, `gather_rows`, `skip_residual`.
Modules: `sts_kernels.nn.VisualTokenCompressor`, `sts_kernels.nn.LayerDynamicSkipper`.
Hugging Face VLMs (`sts_kernels.integrations.hf.SUPPORTED_MODELS`, 25 families, and any class
of the common VLM shape): `apply_sts(model, ...)` (imports transformers only when called).
"""

from . import nn
from ._backend import available_backends, requested_backend, use_backend
from ._types import MergeResult, RoutePlan
from .integrations.hf import apply_sts
from .ops import bipartite_merge, gather_rows, route, skip_residual, token_pool, unmerge

__version__ = "0.2.0"

__all__ = [
    "MergeResult",
    "RoutePlan",
    "apply_sts",
    "available_backends",
    "bipartite_merge",
    "gather_rows",
    "nn",
    "requested_backend",
    "route",
    "skip_residual",
    "token_pool",
    "unmerge",
    "use_backend",
]
