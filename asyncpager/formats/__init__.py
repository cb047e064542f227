"""Model file formats: read a GGUF or safetensors header into a ModelIndex."""

from ._index import ArraySummary, MetadataValue, ModelIndex, layer_of
from ._open import read_index

__all__ = ["ArraySummary", "MetadataValue", "ModelIndex", "layer_of", "read_index"]
