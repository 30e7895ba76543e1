"""Per-family adapters for `apply_sts`: a table from transformers class name to the adapter that
knows where the family's vision features, placeholders, positions and decoder layers are.

Adding a family = one module here defining `ADAPTER` (an `Adapter` subclass instance), listed in
`_FAMILIES`, plus its tests. Importing this package does not import transformers.
"""

from __future__ import annotations

from importlib import import_module

from torch import nn

from . import generic
from ._base import Adapter, Shrink, feed_features
from .generic import convention_adapter

__all__ = ["Adapter", "Shrink", "adapter_for", "feed_features", "supported_models", "support_table"]

_FAMILIES = (
    "llava",
    "llava_next",
    "llava_next_video",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "internvl",
    "gemma3",
    "smolvlm",
    "mllama",
    "mistral3",
    "vipllava",
    "aya_vision",
    "cohere2_vision",
    "paligemma",
    "fast_vlm",
    "perception_lm",
    "glm4v",
    "llava_onevision1_5",
    "lfm2_vl",
    "ovis2",
    "llama4",
    "janus",
    "idefics2",
)

ADAPTERS: dict[str, Adapter] = {}  # class name -> adapter
for _family in _FAMILIES:
    _adapter = import_module(f".{_family}", __name__).ADAPTER
    ADAPTERS.update(dict.fromkeys(_adapter.classes, _adapter))


# classes the convention would take but must not: why, in the TypeError and the README
REFUSED = {
    "Gemma3nForConditionalGeneration": (
        "its last decoder layers reuse keys/values that earlier layers store for every row, so "
        "skipping a storing layer breaks them, and its vision tower (timm's MobileNetV5) "
        "needs torchvision, which installs here only beside torch 2.14's CUDA build, not in "
        "the test environment: untested, so no adapter yet"
    ),
}


def supported_models() -> tuple[str, ...]:
    return tuple(ADAPTERS)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of `model`'s class (or its nearest registered base class); TypeError naming
    the class and the supported ones otherwise."""
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__]
    if type(model).__name__ in REFUSED:
        raise TypeError(
            f"apply_sts: {type(model).__name__} is not served: {REFUSED[type(model).__name__]}"
        )
    generic = convention_adapter(model)  # the common VLM shape, with a one-time warning
    if generic is not None:
        return generic
    raise TypeError(
        f"apply_sts: model must be one of {', '.join(ADAPTERS)} (transformers 5.x), "
        f"got {type(model).__name__}"
    )


def _io_reasons(adapter: Adapter) -> tuple[str, str]:
    """Why the video and packed cells of `adapter`'s row are "-" (empty where they are not)."""
    video = (
        "" if adapter.video else f"video: {adapter.video_reason or 'the class takes images only'}"
    )
    packed = "" if adapter.packs or not adapter.packs_reason else f"packed: {adapter.packs_reason}"
    return video, packed


def support_table() -> str:
    """The README's support table (markdown), rendered from the registry."""
    yes = {True: "yes", False: "-"}
    rows = [
        "| family | classes | VTC pool | VTC merge | LDS sample | LDS token | video | packed | why a '-' |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for adapter in [*dict.fromkeys(ADAPTERS.values()), generic.ADAPTER]:
        classes = ", ".join(f"`{c}`" for c in adapter.classes)
        cells = [
            adapter.name,
            classes or "any other class of the common shape (VTC: square grids; warns once)",
            yes["pool" in adapter.modes],
            yes["merge" in adapter.modes],
            yes["sample" in adapter.lds_modes],
            yes["token" in adapter.lds_modes],
            yes[adapter.video],
            yes[adapter.packs],
            "; ".join(
                filter(None, (adapter.mode_reason, adapter.lds_reason, *_io_reasons(adapter)))
            ),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    for name, why in REFUSED.items():
        rows.append(
            f"| {name[: -len('ForConditionalGeneration')]} | `{name}` |" + " - |" * 6 + f" {why} |"
        )
    return "\n".join(rows) + "\n"
