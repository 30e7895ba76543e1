"""Integrations with model libraries.

`sts_kernels.integrations.hf.apply_sts` patches a Hugging Face LLaVA / Qwen2-VL instance.
Importing this package does not import transformers; the submodule does on use.
"""

__all__ = ["apply_sts"]


def __getattr__(name: str):
    if name == "apply_sts":
        from .hf import apply_sts

        return apply_sts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
