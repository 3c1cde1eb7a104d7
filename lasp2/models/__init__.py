"""Models: Linear-Llama3 (pure linear or hybrid), its config and presets."""
from .config import LAYER_TYPES, PRESETS, LinearLlamaConfig
from .linear_llama import Block, LinearLlama

__all__ = ["LinearLlama", "LinearLlamaConfig", "Block", "PRESETS", "LAYER_TYPES"]
