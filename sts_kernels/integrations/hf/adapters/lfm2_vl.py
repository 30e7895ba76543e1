"""LFM2-VL (`Lfm2VlForConditionalGeneration`): SigLIP2 NaFlex patches of any shape, pixel
unshuffled into tokens; an LM that mixes short convolutions with attention."""

from __future__ import annotations

from ._base import Adapter
from .generic import compress_on_grids


class Lfm2VlAdapter(Adapter):
    """Every entry of `pixel_values` (a tile, a thumbnail or a whole image, its patch rows flat
    and padded, `pixel_attention_mask` marking them) holds a `spatial_shapes` (h, w) patch grid
    that the projector unshuffles into (h/f, w/f) tokens, row-major, one placeholder run each
    (the processor's `<|img_row_i_col_j|>` / `<|img_thumbnail|>` markers between runs stay).
    Each entry is compressed on its own grid; positions are 1-D. LDS token mode is refused: the
    short-convolution layers mix every token with its neighbours in the sequence, which a row
    of kept tokens would replace by tokens that are not its neighbours."""

    name = "LFM2-VL"
    classes = ("Lfm2VlForConditionalGeneration",)
    lds_modes = ("sample",)
    lds_reason = (
        "its short-convolution layers mix each token with its sequence neighbours, which a "
        "layer run on the kept tokens of a row would replace by tokens that are not its "
        "neighbours"
    )
    packs_reason = (
        "its short convolutions run along the whole row, carrying each packed sample's last "
        "tokens into the next sample (transformers' own model, unpatched)"
    )

    def compress(self, model, compressor, kw):
        factor = model.config.downsample_factor
        shapes = kw["spatial_shapes"]
        features = model.model.get_image_features(
            kw["pixel_values"], shapes, kw.get("pixel_attention_mask"), return_dict=True
        )
        grids = [(h // factor, w // factor) for h, w in shapes.tolist()]
        token_id = model.config.image_token_id
        return kw, {"image": compress_on_grids(model, compressor, kw, features, grids, token_id)}


ADAPTER = Lfm2VlAdapter()
