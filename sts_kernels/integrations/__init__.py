"""Integrations with model libraries.

`sts_kernels.integrations.hf.apply_sts` patches a Hugging Face VLM instance through its
family's adapter (`integrations/hf/adapters/`; `SUPPORTED_MODELS` lists them).
Importing this package does not import transformers; the submodule does on use.
"""

__all__ = ["apply_sts"]


def __getattr__(name: str):
    if name == "apply_sts":
        from .hf import apply_sts

        return apply_sts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
