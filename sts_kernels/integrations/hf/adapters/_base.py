"""What the generic patch (`integrations/hf/`) needs to know about one model family."""

from __future__ import annotations

import inspect
import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..packing import segment_ids, varlen_kwargs
from ..sequence import pad_id, shrink_placeholders


class Shrink(NamedTuple):
    """What feeding one modality's compressed features changed in the batch."""

    tokens_in: int  # visual tokens the projector produced
    tokens_kept: int  # visual tokens the LM receives
    # [B, T'] the shrink's column map (`sequence.shrink_placeholders`); None: the sequence kept
    # its length (visual tokens outside it, e.g. cross-attention states)
    columns: Tensor | None


class Adapter:
    """One family of Hugging Face VLMs. Subclass, set the class attributes, override `compress`
    (and `layers` when the decoder layers live elsewhere), and define the instance as `ADAPTER`
    in a module listed in the registry (`adapters/__init__.py`).

    `compress(model, compressor, kw)` receives the bound forward arguments of a training call
    that carries visual inputs; it runs the vision tower itself, compresses the features, hands
    them to the model as `mm_encoder_outputs` and shrinks the placeholders (and positions) to
    match. It returns the new arguments and `{modality: Shrink}` in the order of the shrinks
    (images before videos).
    """

    name: str = ""  # family label in the support table
    classes: tuple[str, ...] = ()  # transformers classes this adapter patches
    modes: tuple[str, ...] = ("pool", "merge")  # VTC modes the placeholder layout allows
    mode_reason: str = ""  # why a mode is missing (ValueError text)
    lds_modes: tuple[str, ...] = ("sample", "token")
    lds_reason: str = ""  # why an LDS mode is missing (the support table)
    video: bool = False  # compresses video inputs too
    video_reason: str = ""  # why video is "-" where the class takes video input
    frame_window_reason: str = ""  # why its videos cannot average frames (time_window > 1)
    packs: bool = False  # packed rows tested (packed == unpacked, tests/hf/test_packed.py)
    packs_reason: str = ""  # why packed rows are not served (the support table)
    tokens_in_sequence: bool = True  # visual tokens are placeholders (else cross-attention)
    pixel_keys: tuple[str, ...] = ("pixel_values",)  # forward arguments that carry visual input
    # VTC only through `mm_encoder_outputs` (transformers 5.24 has it, 5.17 not): the feature
    # getters of older 5.x versions return other layouts for this family
    needs_encoder_outputs: bool = False

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers LDS wraps."""
        return model.model.language_model.layers

    def hidden_size(self, model: nn.Module) -> int:
        return model.config.text_config.hidden_size

    def check_compressor(self, compressor: nn.Module, model: nn.Module) -> None:
        """ValueError, before any forward, for a compressor this layout cannot take."""
        mode = getattr(compressor, "mode", "pool")
        if not self.modes:
            raise ValueError(f"compress: {self.name} takes no VTC: {self.mode_reason}")
        if self.needs_encoder_outputs and not takes_encoder_outputs(model):
            raise ValueError(
                f"compress: VTC on {self.name} needs a transformers whose models take "
                "mm_encoder_outputs (5.24 does, 5.17 not); this one has none: use skip only"
            )
        if mode not in self.modes:
            allowed = " or ".join(f"mode={m!r}" for m in self.modes)
            raise ValueError(
                f"compress: {self.name} needs {allowed} ({self.mode_reason}), got mode={mode!r}"
            )
        window = getattr(compressor, "time_window", 1)
        if window > 1 and not self.video:
            raise ValueError(f"compress: time_window applies to video; {self.name} takes none")
        if window > 1 and self.frame_window_reason:
            raise ValueError(
                f"compress: {self.name} needs time_window=1 ({self.frame_window_reason}), "
                f"got {window}"
            )

    def check_skipper(self, skipper: nn.Module) -> None:
        """ValueError, before any forward, for an LDS mode this family's layers cannot take."""
        mode = getattr(skipper, "mode", "sample")
        if mode not in self.lds_modes:
            why = f" ({self.lds_reason})" if self.lds_reason else ""
            raise ValueError(
                f"skip: {self.name} supports LDS mode in {self.lds_modes}, got mode={mode!r}{why}"
            )

    def skipper_arguments(self) -> dict[str, Any]:
        """LayerDynamicSkipper arguments this family needs (the user's dict overrides them)."""
        return {}

    def has_visual(self, kw: dict[str, Any]) -> bool:
        return any(kw.get(key) is not None for key in self.pixel_keys)

    def end_forward(self, model: nn.Module) -> None:
        """Undo what `compress` set on the model for one forward (called when it ends, even
        when it raised)."""

    def placeholder_ids(self, model: nn.Module) -> dict[str, int]:
        """{modality: the token id of its placeholders in `input_ids`} from the config."""
        config, ids = model.config, {}
        for modality in ("image", "video"):
            for name in (f"{modality}_token_id", f"{modality}_token_index"):
                value = getattr(config, name, None)
                if isinstance(value, int):
                    ids[modality] = value
                    break
        return ids

    def compress(
        self, model: nn.Module, compressor: nn.Module, kw: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Shrink]]:
        raise NotImplementedError


def feed_features(
    model: nn.Module,
    kw: dict[str, Any],
    modality: str,
    features: Any,
    compressed: list[Tensor],
    token_id: int,
    pixels: str = "pixel_values",
    runs: tuple[list[int], list[int]] | None = None,
    type_ids: str = "mm_token_type_ids",
) -> Shrink:
    """Hand `compressed` (one `[n_out_k, D]` per item) to the model in place of what its vision
    tower would give for `kw[pixels]`, and shrink `token_id` placeholders (item k keeps its
    first n_out_k) with the matching columns of the masks, labels and positions in `kw`.
    `compressed` is a list, or a tensor `[items, n_out, D]` where the model takes one.
    `runs`: (placeholders in, kept) per contiguous placeholder run when an item's placeholders
    are split by text (tiles between row markers); default one run per item. `type_ids`: the
    model's per-token modality ids argument.

    transformers 5.24 takes them as `mm_encoder_outputs[modality]` (pixels dropped); 5.17 has
    no such argument (it would be ignored silently), so there the model's own call of
    `get_{modality}_features` is answered once with them instead.
    """
    n_in, n_out = runs or (
        [f.shape[0] for f in features.pooler_output],
        [len(f) for f in compressed],
    )
    features.pooler_output = compressed
    segments = segment_ids(kw)
    shrunk = shrink_placeholders(
        kw["input_ids"],
        token_id,
        n_in,
        n_out,
        attention_mask=kw.get("attention_mask"),
        labels=kw.get("labels"),
        position_ids=kw.get("position_ids"),
        mm_token_type_ids=kw.get(type_ids),
        pad_token_id=pad_id(model),
        segments=segments,
    )
    kw[type_ids] = shrunk.pop("mm_token_type_ids")
    columns = shrunk.pop("columns")
    if segments is not None:
        segments = shrunk.pop("segments")
        kw.update(varlen_kwargs(kw, segments, valid=segments >= 0))
    kw.update(shrunk)
    if takes_encoder_outputs(model):
        mm = dict(kw.get("mm_encoder_outputs") or {})
        mm[modality] = features
        kw["mm_encoder_outputs"] = mm
        kw[pixels] = None
    else:
        _answer_once(model.model, f"get_{modality}_features", features)
    return Shrink(sum(n_in), sum(n_out), columns)


class TiledAdapter(Adapter):
    """Families whose projector gives every image (or tile) the same square grid of tokens,
    `[tiles, k, D]`, each tile's placeholders one contiguous run. All tiles of a batch are
    compressed in one call (one grid); positions are 1-D. Subclasses say how to get the
    features (`image_features`) and, where the model takes a list per sample, regroup."""

    type_ids = "mm_token_type_ids"

    def image_features(self, model: nn.Module, kw: dict[str, Any]) -> Any:
        return model.model.get_image_features(pixel_values=kw["pixel_values"], return_dict=True)

    def check_compressor(self, compressor: nn.Module, model: nn.Module) -> None:
        k = self.tokens_per_tile(model)
        if math.isqrt(k) ** 2 != k:
            raise ValueError(f"compress: {self.name} tiles hold {k} tokens, not a square grid")
        super().check_compressor(compressor, model)

    def compress(self, model, compressor, kw):
        features = self.image_features(model, kw)
        token_id = model.config.image_token_id
        return kw, {"image": self.compress_tiles(model, compressor, kw, features, token_id)}

    def compress_tiles(
        self,
        model: nn.Module,
        compressor: nn.Module,
        kw: dict[str, Any],
        features: Any,
        token_id: int,
        modality: str = "image",
        pixels: str = "pixel_values",
    ) -> Shrink:
        """Compress every tile of `features` (one modality's) on its own grid and feed them."""
        per_sample = not isinstance(features.pooler_output, Tensor)  # list of [tiles_i * k, D]
        k = self.tokens_per_tile(model)
        tiles = torch.cat(list(features.pooler_output)) if per_sample else features.pooler_output
        tiles = tiles.view(-1, k, tiles.shape[-1])  # [tiles, k, D]
        side = math.isqrt(k)
        if side * side != k:
            raise ValueError(f"compress: {self.name} tiles hold {k} tokens, not a square grid")
        out = compressor.compress_many([tiles], [(side, side)])[0].x  # [tiles, k', D]
        runs = ([k] * len(tiles), [out.shape[1]] * len(tiles))
        if per_sample:
            sizes = [len(f) // k for f in features.pooler_output]
            compressed = [t.reshape(-1, t.shape[-1]) for t in out.split(sizes)]
        else:
            compressed = out
        return feed_features(
            model, kw, modality, features, compressed, token_id, pixels, runs, self.type_ids
        )

    def tokens_per_tile(self, model: nn.Module) -> int:
        raise NotImplementedError


def takes_encoder_outputs(model: nn.Module) -> bool:
    """Whether the model's forward takes precomputed visual features (`mm_encoder_outputs`)."""
    inner = getattr(model, "model", model)  # Llama 4 keeps its parts on the model itself
    return "mm_encoder_outputs" in inspect.signature(type(inner).forward).parameters


def forward_parameters(model: nn.Module) -> frozenset[str]:
    """The argument names of the model's forward."""
    return frozenset(inspect.signature(type(model).forward).parameters)


def _answer_once(inner: nn.Module, getter: str, features: Any) -> None:
    """Make the next `inner.<getter>(...)` return `features`, then restore the method."""

    def answer(*args, **kwargs):
        del inner.__dict__[getter]
        return features

    inner.__dict__[getter] = answer  # replaces a stale one left by a forward that raised
