"""llama-cpp-python on the same GGUF: the independent baseline for parity tests and benchmarks.

llama-cpp-python 0.3.36 is built with GGML_NATIVE; on CPUs that report AMX (Sapphire Rapids and later)
its AMX weight buffer crashes in ggml_backend_amx_mul_mat when the kernel does not grant AMX tile state
(seen on this project's build machines). We therefore load the baseline with `use_extra_bufts = False`:
no AMX/repacked weight buffers, the same plain mmap'd weights simkv computes with.
"""
from __future__ import annotations


def without_extra_buffers():
    """From now on, llama_cpp.Llama loads weights without extra (repacking/AMX) buffers. Returns the undo."""
    import llama_cpp
    import llama_cpp.llama as llama_module

    original = llama_cpp.llama_model_default_params

    def params_without_extra_buffers():
        params = original()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = params_without_extra_buffers
    return lambda: setattr(llama_module.llama_cpp, "llama_model_default_params", original)


def reference_llama(model_path: str, **kwargs):
    """A llama_cpp.Llama with extra (repacking/AMX) weight buffers disabled; kwargs go to llama_cpp.Llama."""
    import llama_cpp

    undo = without_extra_buffers()
    try:
        kwargs.setdefault("verbose", False)
        return llama_cpp.Llama(model_path, **kwargs)
    finally:
        undo()
