"""Offloaded layers against the CPU, on every offload device this machine has: a CUDA GPU (llama-cpp-python
built with CMAKE_ARGS="-DGGML_CUDA=on"; skipped elsewhere) and ggml RPC servers on 127.0.0.1 (built with
-DGGML_RPC=on; .ci/run installs that build, so there they always run). On the GPU machine:
pytest -q tests/test_offload.py

An RPC server here is this machine's CPU behind a socket: a real non-CPU ggml backend to simkv (its buffers
are not host memory, every byte crosses the protocol), so weights, KV stores, the scheduler's splits and
the device path of the lazy rings are exercised without a GPU.

Bounds: the same graph on two backends differs only in summation order and in where f16 rounding happens
inside flash attention (the CPU kernel accumulates V in f16). That is the f16 bound of
test_lazy_reference.py (max < 0.1, mean < 5e-3 on logits of std ~3.4), which a mask off by one key exceeds
35-fold. On an RPC server the kernels are the CPU's with the same thread count, and a lazy ring's gathered
rows are f16 on every backend (kv_gather.h), so there the logits are equal bit for bit, quantized stores
included (test_ring_parity.py checks the same on the real model). In CUDA quantized stores are read by
other kernels (Q quantized to q8_1 for the dot products with K, where the CPU uses q8_0), so there the
bound for them is relative: the two backends must agree 4x better than q4_0 moves the logits away from f16."""
import numpy as np
import pytest

from py_simkv import Llama, gpu_devices
from py_simkv import lab

N_PROMPT, N_DECODE, N_WINDOW = 300, 200, 64  # the decode wraps the lazy ring (capacity 512 > 300 + 200)


@pytest.fixture(params=["cuda", "rpc"])
def device(request):
    """(Llama arguments that make offload devices available, the name every offloaded layer's device starts with)"""
    if request.param == "cuda":
        if not gpu_devices():
            pytest.skip("no GPU in this ggml build")
        return {}, gpu_devices()[0].split(" ")[0]
    return {"rpc_servers": request.getfixturevalue("rpc_servers")}, "RPC"


def _model(tiny_model, arch="llama", **kw):
    # head size 64: ggml-cuda's flash attention has no kernel for the tiny preset's 32 and would quietly
    # leave attention on the CPU.
    return tiny_model(arch, weight_type="f16", head_dim=64, **kw)


def _tokens(n, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(0, 49152, n)]


def _run(path, n_ubatch=128, **kw):
    """Prompt in ubatches, then single-token decode: logits of every position, and the engine."""
    llm = Llama(path, n_ctx=1024, n_threads=2, n_ubatch=n_ubatch, logits_all=True, n_window=N_WINDOW, **kw)
    seq = _tokens(N_PROMPT + N_DECODE)
    llm.eval(seq[:N_PROMPT])
    for t in seq[N_PROMPT:]:
        llm.eval([t])
    return llm.scores[: llm.n_tokens].copy(), llm


def _assert_f16_close(dev, cpu, prefix):
    err = np.abs(dev - cpu)
    assert err.max() < 0.1 and err.mean() < 5e-3, (err.max(), err.mean())
    if prefix == "RPC":  # the CPU's kernels behind the socket
        assert np.array_equal(dev, cpu), (err.max(), err.mean())


def _offloaded(llm, prefix):
    devices = [layer["device"] for layer in llm.kv_cache_stats()["layers"]]
    assert all(d.startswith(prefix) for d in devices), devices
    return devices


@pytest.mark.parametrize("lazy_prefill", ["streaming", "exact"])
def test_full_and_lazy_offload_match_the_cpu(tiny_model, device, lazy_prefill):
    extra, prefix = device
    path = _model(tiny_model)
    for lazy in ([], [1, 3]):
        kw = dict(lazy_layers=lazy, lazy_type="f16", lazy_prefill=lazy_prefill)
        cpu, _ = _run(path, **kw)
        dev, llm = _run(path, n_gpu_layers=-1, **kw, **extra)
        _assert_f16_close(dev, cpu, prefix)
        _offloaded(llm, prefix)
        assert llm.kv_cache_stats()["lazy_layers"] == lazy


@pytest.mark.parametrize("full_type,lazy_prefill", [("q8_0", "streaming"), ("f16", "exact")])
def test_q4_0_stores_on_the_device(tiny_model, device, full_type, lazy_prefill):
    # Quantized stores are Hadamard-rotated (kv_rotation.h); exact prefill from f16 full stores rotates the
    # rows it moves into the q4_0 rings, on the device here.
    extra, _ = device
    path = _model(tiny_model)
    kw = dict(lazy_layers=[0, 2], type_k=full_type, type_v=full_type, lazy_prefill=lazy_prefill)
    cpu, _ = _run(path, **kw)
    dev, _ = _run(path, n_gpu_layers=-1, **kw, **extra)
    if extra and full_type == "f16":  # RPC: the CPU's kernels
        assert np.array_equal(dev, cpu), (np.abs(dev - cpu).max(), np.abs(dev - cpu).mean())
        return
    # Quantized full stores: the CPU reads them with simkv's own attention (attention_quantized.h), a GPU or
    # an RPC server with ggml's flash attention, which also rounds each query to 8 bits.
    cpu_f16, _ = _run(path, lazy_layers=[0, 2], lazy_type="f16", lazy_prefill=lazy_prefill)
    quant_effect = np.abs(cpu - cpu_f16).mean()
    assert np.abs(dev - cpu).mean() < 0.25 * quant_effect, (np.abs(dev - cpu).mean(), quant_effect)


def test_mixed_type_pairs_on_the_device(tiny_model, device):
    """K q8_0 with V q4_0 in two layers: an RPC server's CPU reads the pair (compared as the quantized stores
    above); ggml-cuda's default build reads only equal quantized pairs, so there the Llama is refused."""
    extra, prefix = device
    path = _model(tiny_model)
    kw = dict(kv_types="0-1=q8_0/q4_0")
    if prefix != "RPC":
        with pytest.raises(ValueError, match="does not read K q8_0 with V q4_0"):
            Llama(path, n_ctx=1024, n_gpu_layers=-1, **kw, **extra)
        return
    cpu, _ = _run(path, **kw)
    dev, _ = _run(path, n_gpu_layers=-1, **kw, **extra)
    cpu_f16, _ = _run(path)
    quant_effect = np.abs(cpu - cpu_f16).mean()
    assert np.abs(dev - cpu).mean() < 0.25 * quant_effect, (np.abs(dev - cpu).mean(), quant_effect)


def test_partial_offload_places_layers_as_llama_cpp_does(tiny_model, device):
    extra, prefix = device
    path = _model(tiny_model)
    cpu, _ = _run(path, lazy_layers=[1, 3], lazy_type="f16")
    for n_gpu, offloaded in ((2, [False, False, True, True, False]),   # the last 2 layers, not the output
                             (4, [True] * 4 + [False]),
                             (5, [True] * 5)):                         # n_layer + 1: the output layer too
        dev, llm = _run(path, n_gpu_layers=n_gpu, lazy_layers=[1, 3], lazy_type="f16", **extra)
        placed = llm._model.layer_devices
        assert [d.startswith(prefix) for d in placed] == offloaded, placed
        assert [d for d, o in zip(placed, offloaded) if not o] == ["CPU"] * offloaded.count(False)
        assert [layer["device"] for layer in llm.kv_cache_stats()["layers"]] == placed[:4]
        _assert_f16_close(dev, cpu, prefix)


def test_untied_output_and_qwen_on_the_device(tiny_model, device):
    extra, prefix = device
    for path in (_model(tiny_model, tied_embeddings=False), _model(tiny_model, "qwen3")):
        cpu, _ = _run(path, lazy_layers=[2], lazy_type="f16")
        dev, _ = _run(path, n_gpu_layers=-1, lazy_layers=[2], lazy_type="f16", **extra)
        _assert_f16_close(dev, cpu, prefix)


def test_several_sequences_on_the_device(tiny_model, device):
    # A sequence in the pool's last share wraps around its end: its chunks read its scattered cells through
    # a gather, on the device through f16 rows. Then dynamic mode with two sequences, every layer lazy for
    # both (threshold 0): each keeps its sinks + window in the device's pools.
    extra, prefix = device
    path = _model(tiny_model)
    prompt, more = _tokens(384, seed=1), _tokens(128, seed=2)

    def wrapped(**kw):
        llm = Llama(path, n_ctx=1024, n_seq_max=4, n_threads=2, n_ubatch=128, n_batch=128, **kw)
        seqs = llm.sequences
        rows = [seqs.decode({3: prompt}, all_logits=True)[3], seqs.decode({3: more}, all_logits=True)[3]]
        return np.concatenate(rows), llm

    def dynamic(**kw):
        llm = Llama(path, n_ctx=1024, n_seq_max=2, n_threads=2, n_ubatch=128, lazy_mode="dynamic",
                    lazy_threshold=0.0, n_window=N_WINDOW, **kw)
        seqs = llm.sequences
        out = seqs.decode({0: _tokens(300, seed=3), 1: _tokens(200, seed=4)})
        rows = [out[0], out[1]]
        for t in _tokens(20, seed=5):
            out = seqs.decode({0: [t], 1: [t]})
            rows += [out[0], out[1]]
        return np.array(rows), llm

    for run in (wrapped, dynamic):
        cpu, cpu_llm = run()
        dev, llm = run(n_gpu_layers=-1, **extra)
        _offloaded(llm, prefix)
        _assert_f16_close(dev, cpu, prefix)
        if run is dynamic:
            assert [s["lazy_layers"] for s in llm.sequences.kv_cache_stats()["sequences"]] == [[0, 1, 2, 3]] * 2
        cpu_llm.close()
        llm.close()  # hands the servers back now (a Llama and its sequences hold each other until collected)


def test_dynamic_mode_and_masked_layers_on_the_device(tiny_model, device):
    extra, prefix = device
    path = _model(tiny_model)
    cpu, a = _run(path, lazy_mode="dynamic", lazy_threshold=0.0, lazy_type="f16")
    dev, b = _run(path, lazy_mode="dynamic", lazy_threshold=0.0, lazy_type="f16", n_gpu_layers=-1, **extra)
    assert a.kv_cache_stats()["lazy_layers"] == b.kv_cache_stats()["lazy_layers"] == [0, 1, 2, 3]
    _assert_f16_close(dev, cpu, prefix)
    seq = _tokens(400, seed=3)
    out = []
    for kw in ({}, dict(n_gpu_layers=-1, **extra)):
        llm = Llama(path, n_ctx=512, n_threads=2, n_window=N_WINDOW, **kw)
        llm.eval(seq[:200])
        # the profiler's what-if: the loss scored in the graph on the CPU, from the logits read back on the device
        with llm._use():
            _, streams = lab.what_if_nll(llm, seq[200:], capture=True)
        llm.set_masked_layers([1])
        out.append(llm.nll(seq[200:], keep=False))
        with llm._use():
            from_layer = lab.what_if_nll(llm, seq[200:], first_layer=1, hidden=streams[1])
        # the engine's float32 loss against numpy's float64 one (test_profile.py's bound)
        np.testing.assert_allclose(from_layer, out[-1], rtol=0, atol=1e-5)
    assert np.abs(out[0] - out[1]).max() < 0.1


def test_bad_main_gpu(tiny_model):
    if not gpu_devices():
        pytest.skip("no GPU in this ggml build")
    with pytest.raises(ValueError, match="main_gpu"):
        Llama(_model(tiny_model), n_ctx=64, n_gpu_layers=-1, main_gpu=len(gpu_devices()))
