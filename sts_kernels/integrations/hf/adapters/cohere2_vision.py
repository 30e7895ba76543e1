"""Cohere2-Vision (`Cohere2VisionForConditionalGeneration`): Aya Vision's tiles (pixel-shuffled
square grids), laid out `<|START_OF_IMG|>` + (placeholders + `<|IMG_LINE_BREAK|>`) per tile +
`<|END_OF_IMG|>`: each tile's placeholders a run of their own."""

from __future__ import annotations

from .aya_vision import AyaVisionAdapter


class Cohere2VisionAdapter(AyaVisionAdapter):
    """Features of the tower's last layer (no layer / strategy arguments)."""

    name = "Cohere2-Vision"
    classes = ("Cohere2VisionForConditionalGeneration",)
    packs = True

    def image_features(self, model, kw):
        return model.model.get_image_features(pixel_values=kw["pixel_values"], return_dict=True)


ADAPTER = Cohere2VisionAdapter()
