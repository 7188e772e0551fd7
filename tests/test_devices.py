"""Device placement that a CPU-only install can check: weights copied instead of mapped, the GPU request
on a build without a GPU, bad device arguments. Offload devices themselves (a GPU, RPC servers): test_offload.py."""
import warnings

import numpy as np
import pytest

import py_simkv.llama as llama_module
from py_simkv import Llama, gpu_devices

CPU_ONLY = not gpu_devices()


def test_copied_weights_compute_what_mapped_weights_do(tiny_model):
    # use_mmap=False loads through the same copy path as GPU layers (a buffer of its own, tensor_set):
    # same bytes, same CPU kernels, so the logits are bit-identical.
    path = tiny_model("llama", weight_type="q8_0")
    toks = list(range(100, 300))
    a = Llama(path, n_ctx=256, n_threads=2, logits_all=True, lazy_layers=[1, 2], n_window=32)
    b = Llama(path, n_ctx=256, n_threads=2, logits_all=True, lazy_layers=[1, 2], n_window=32, use_mmap=False)
    a.eval(toks)
    b.eval(toks)
    assert np.array_equal(a.scores[: a.n_tokens], b.scores[: b.n_tokens])
    assert b._model.layer_devices == ["CPU"] * 5  # 4 layers + the output layer


@pytest.mark.skipif(not CPU_ONLY, reason="this ggml build has a GPU")
def test_gpu_layers_on_a_cpu_only_build_warn_once_and_run(tiny_model, monkeypatch):
    monkeypatch.setattr(llama_module, "_warned_no_gpu", False)
    path = tiny_model("llama")
    with pytest.warns(RuntimeWarning, match="without GPU support"):
        llm = Llama(path, n_ctx=64, n_gpu_layers=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Llama(path, n_ctx=64, n_gpu_layers=2)  # once per process
    llm.eval([1, 2, 3])
    assert {layer["device"] for layer in llm.kv_cache_stats()["layers"]} == {"CPU"}


def test_bad_device_arguments(tiny_model):
    path = tiny_model("llama")
    with pytest.raises(ValueError, match="n_gpu_layers must be >= -1"):
        Llama(path, n_ctx=64, n_gpu_layers=-2)
    with pytest.raises(ValueError, match="main_gpu"):
        Llama(path, n_ctx=64, main_gpu=-1)
    with pytest.raises(TypeError):
        Llama(path, n_ctx=64, n_gpu_layers="all")
