"""simkv: a local LLM runtime whose KV cache is sized and typed per layer (SimLayerKV)."""
from ._model_path import default_model_path
from .lazy_profile import LazyProfile
from ._native import RemoteFailure
from .llama import Llama, gpu_devices
from .profiler import profile_model

__all__ = ["Llama", "LazyProfile", "RemoteFailure", "default_model_path", "gpu_devices", "profile_model"]
__version__ = "0.1.0"
