"""nn.Module wrappers: the Visual Token Compressor and the Layer Dynamic Skipper."""

from .compressor import CompressedTokens, VisualTokenCompressor
from .skipper import LayerDynamicSkipper, SkipReport

__all__ = ["CompressedTokens", "LayerDynamicSkipper", "SkipReport", "VisualTokenCompressor"]
