"""llama-cpp-python's arguments, as simkv takes them: the one home of which are ignored and why, of their
warnings, and of the conversions from llama-cpp-python's forms (integer cache types, LlamaGrammar objects).

A llama-cpp-python user changes only the import. So every argument of `llama_cpp.Llama` (0.3.36) and of its
completion calls is accepted: honoured where it means something here, otherwise ignored with one warning
that names it (never silently). An argument given with the value simkv behaves as anyway is not warned
about (flash_attn=True: simkv always uses flash attention).
"""
from __future__ import annotations

import warnings
from typing import Dict, Tuple

from . import _native
from .checks import check_int

# name: (the value simkv behaves as, why another value is ignored)
IGNORED_ARGS: Dict[str, Tuple[object, str]] = {
    "split_mode": (1, "simkv places whole layers on devices (n_gpu_layers); it has no row split"),
    "use_mlock": (False, "simkv does not lock the model in RAM"),
    "kv_overrides": (None, "GGUF metadata overrides are not supported: the model's own metadata is used"),
    "rope_scaling_type": (-1, "simkv uses the model's own RoPE settings"),
    "rope_freq_base": (0.0, "simkv uses the model's own RoPE settings"),
    "rope_freq_scale": (0.0, "simkv uses the model's own RoPE settings"),
    "yarn_ext_factor": (-1.0, "simkv uses the model's own RoPE settings"),
    "yarn_attn_factor": (1.0, "simkv uses the model's own RoPE settings"),
    "yarn_beta_fast": (32.0, "simkv uses the model's own RoPE settings"),
    "yarn_beta_slow": (1.0, "simkv uses the model's own RoPE settings"),
    "yarn_orig_ctx": (0, "simkv uses the model's own RoPE settings"),
    "attention_type": (-1, "simkv's attention is causal"),
    "offload_kqv": (True, "a layer's KV cache always lives where the layer runs"),
    "flash_attn": (True, "simkv always computes attention with ggml's flash attention"),
    "op_offload": (None, "simkv has no host-op offload setting"),
    "swa_full": (False, "sliding-window layers keep only their window (as llama.cpp's default)"),
    "no_perf": (False, "simkv keeps no libllama performance counters"),
    "numa": (False, "simkv has no NUMA placement"),
    "draft_model": (None, "speculative decoding is not implemented: tokens are generated one by one"),
    "lora_base": (None, "LoRA adapters are not supported"),
    "lora_scale": (1.0, "LoRA adapters are not supported"),
    "penalize_nl": (True, "llama-cpp-python 0.3 ignores it too: newlines are penalized like any token"),
    "tfs_z": (1.0, "libllama has no tail-free sampling any more (llama-cpp-python 0.3 ignores it too)"),
}

# Arguments that would change what the model computes, so ignoring them would give silently different
# results: refused instead.
REFUSED_ARGS: Dict[str, Tuple[object, str]] = {
    "lora_path": (None, "LoRA adapters are not supported by simkv"),
}

_warned = set()


def warn_ignored(name: str, why: str, stacklevel: int = 3) -> None:
    """One warning per argument name and process."""
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"{name} is ignored: {why}", RuntimeWarning, stacklevel=stacklevel + 1)


def check_ignored(args: dict, stacklevel: int = 3) -> None:
    """Warn for each argument of `args` that simkv ignores and that asks for something else than what simkv
    does; refuse those that would change the model; warn for names llama-cpp-python does not know either."""
    for name, value in args.items():
        if name in REFUSED_ARGS:
            simkv_value, why = REFUSED_ARGS[name]
            if value != simkv_value:
                raise ValueError(f"{name}: {why}")
        elif name in IGNORED_ARGS:
            simkv_value, why = IGNORED_ARGS[name]
            if value != simkv_value:
                warn_ignored(name, why, stacklevel + 1)
        else:
            warn_ignored(name, "neither simkv nor llama-cpp-python has such an argument", stacklevel + 1)


def cache_type_name(name: str, value, default: str) -> str:
    """A KV cache type as simkv names it ('f16', 'q8_0', ...): a name, ggml's integer type id as
    llama-cpp-python passes it (GGML_TYPE_F16 = 1), or None for the default."""
    if value is None:
        return default
    if isinstance(value, str):
        return value
    return _native.ggml_type_name(check_int(name, value))


def grammar_text(grammar) -> Tuple[str, str]:
    """(GBNF text, root rule) of a llama_cpp.LlamaGrammar or a GBNF string; ("", "root") for None."""
    if grammar is None:
        return "", "root"
    if isinstance(grammar, str):
        return grammar, "root"
    text, root = getattr(grammar, "_grammar", None), getattr(grammar, "_root", "root")
    if not isinstance(text, str):
        raise TypeError(f"grammar must be a llama_cpp.LlamaGrammar or a GBNF string, got {type(grammar).__name__}")
    return text, root
