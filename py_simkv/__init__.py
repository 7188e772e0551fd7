"""simkv: a local LLM runtime whose KV cache is sized and typed per layer (SimLayerKV)."""
from ._model_path import default_model_path
from .llama import Llama

__all__ = ["Llama", "default_model_path"]
__version__ = "0.1.0"
