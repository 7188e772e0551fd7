"""Lazy layers (sink + ring window) against an independent PyTorch forward with the same masks."""
import numpy as np
import pytest
import torch

from py_simkv import Llama
from torch_reference import Weights, causal_mask, forward, sink_window_mask

N_LAYER = 4  # the tiny synthetic preset
N_SINK, N_WINDOW = 4, 64


def _ours(path, tokens, lazy, **kw):
    llm = Llama(path, n_threads=2, logits_all=True, lazy_layers=lazy, n_sink=N_SINK, n_window=N_WINDOW, **kw)
    llm.eval(tokens)
    return torch.from_numpy(llm.scores[: llm.n_tokens].copy())


def _reference(path, tokens, lazy, lazy_type, full_type="f16", n_sink=N_SINK, n_window=N_WINDOW, residual=None,
               one_query=False):
    n = len(tokens)
    masks = [sink_window_mask(n, n_sink, n_window) if il in lazy else causal_mask(n) for il in range(N_LAYER)]
    types = [lazy_type if il in lazy else full_type for il in range(N_LAYER)]
    return forward(Weights(path), tokens, masks, types, gathered=lazy, residual=residual, one_query=one_query)


def _tokens(n, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(0, 49152, n)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_lazy_f16_matches_reference(tiny_model, arch):
    # With f16 stores the only difference left is ggml accumulating V·softmax in f16 inside flash
    # attention (2^-11 relative per step); measured on the full path, which is bit-identical to llama.cpp,
    # it stays below 0.05 on logits of std ~3.4. A mask wrong by one key or one sink moves logits by >= 3.5
    # (max) and >= 0.1 (mean) on this input: the bounds below separate the two by 35x.
    path = tiny_model(arch)
    tokens = _tokens(600)
    lazy = [1, 3]
    got = _ours(path, tokens, lazy, n_ctx=1024, n_ubatch=128, lazy_type="f16")
    want = _reference(path, tokens, lazy, "f16")
    err = (got - want).abs()
    assert err.max().item() < 0.1
    assert err.mean().item() < 5e-3
    # ... and the masks matter: against full attention everywhere the error is large.
    full = _reference(path, tokens, [], "f16")
    assert (got - full).abs().mean().item() > 0.05


def test_lazy_window_off_by_one_is_detected(tiny_model):
    """The tolerance above cannot hide a window of n_window - 1 or n_window + 1 keys."""
    path = tiny_model("llama")
    tokens = _tokens(600)
    got = _ours(path, tokens, [1, 3], n_ctx=1024, n_ubatch=128, lazy_type="f16")
    for n_window in (N_WINDOW - 1, N_WINDOW + 1):
        wrong = _reference(path, tokens, [1, 3], "f16", n_window=n_window)
        assert (got - wrong).abs().mean().item() > 0.05


@pytest.mark.parametrize("n_residual", [0, 32])  # the ring alone, and with its f16 residual (the default)
@pytest.mark.parametrize("n_ubatch", [128, 1])  # ggml's batched and single-row kernels (different rounding)
def test_lazy_q4_0_matches_quantized_reference(tiny_model, n_ubatch, n_residual):
    # The reference quantizes K and V to Q4_0 (gguf's quantizer = ggml's reference algorithm) and reads them
    # as f16 rows, as attention reads a lazy ring (Q in f32 for a batch of queries, rounded to f16 for one).
    # What remains are rounding-boundary flips: K from torch's matmul differs from ggml's in the last float
    # bit (which bit depends on the CPU's instruction set and the kernel), and a value on a 4-bit rounding
    # boundary then moves by a whole quantization step. So every bound is relative to the effect of Q4_0
    # itself, never an absolute number.
    # With one-token ubatches ggml's single-query kernel also accumulates V in f16 (as it does for any f16
    # cache), which the reference leaves out: an error of 2-3e-3 of one layer's output (test_ring_reference.py
    # bounds it there, per layer), which the next layers' 4-bit flips carry through all four q4_0 layers:
    # measured mean 1/9.5 and max 1/5.6 of the effect, and 1/16-1/19 of it on the early rows. So those runs
    # get bounds of 1/5 and 1/4 (a wrong cell or scale gives the order of the effect itself) and no
    # float-level checks; the batched kernel keeps the 1/20 and 1/10 bounds and the float-level ones.
    path = tiny_model("llama")
    tokens = _tokens(600)
    lazy = [0, 1, 2, 3]
    got = _ours(path, tokens, lazy, n_ctx=1024, n_ubatch=n_ubatch, lazy_type="q4_0", lazy_residual=n_residual)
    # With a residual a query reads the keys less than n_residual positions back in f16 (whatever the
    # ubatch split), older ones in 4 bits.
    want = _reference(path, tokens, lazy, "q4_0", residual=n_residual or None, one_query=n_ubatch == 1)
    unquantized = _reference(path, tokens, lazy, "f16")
    quant_effect = (want - unquantized).abs()
    err = (got - want).abs()
    # Q4_0 really is in play (less with the residual: the most recent keys are read in f16)
    assert quant_effect.mean().item() > (0.05 if n_residual else 0.1)
    one_query = n_ubatch == 1
    assert err.mean().item() < quant_effect.mean().item() / (5 if one_query else 20)
    assert err.max().item() < quant_effect.max().item() / (4 if one_query else 10)
    if n_residual:
        # Rows that read no key quantized (the first n_residual) equal the f16 reference up to f16
        # rounding of rotated keys (a residual that is not read, or read at the wrong cells, shows the
        # whole Q4_0 effect). Measured 1/170 of the effect with one-token ubatches.
        exact_rows = slice(0, n_residual)
        assert (got - unquantized)[exact_rows].abs().max().item() < quant_effect.max().item() / (50 if one_query else 100)
        return
    if one_query:
        return
    # Before any key leaves a window (the first n_sink + n_window positions) nothing is trimmed, so only
    # flips separate us from the reference, and they have not compounded through later positions yet. Away
    # from a flip the two agree to float rounding (measured: mean 1/77,000 of the Q4_0 effect); one flip moves
    # one of the ~8,700 K/V values a position attends to by one step, i.e. its logits by a small share of
    # the effect (measured on AVX-512: max 1/2,900, one flip at position 47; with 1 or 2 threads). A wrong
    # quantizer, scale or cell gives an error of the order of the effect itself (storing q8_0 instead: mean
    # 0.47, max 4.3 here), far above these bounds.
    early = slice(0, N_SINK + N_WINDOW)
    assert err[early].mean().item() < quant_effect[early].mean().item() / 1000
    assert err[early].max().item() < quant_effect[early].max().item() / 100


def test_window_covering_the_context_equals_full(tiny_model):
    """A lazy layer whose window covers everything is a full layer of the same type. (f16: both reach ggml's
    tiled kernel as f32 tiles of the same values, so bit-identical. A quantized ring would differ by Q's
    q8_0 rounding: it is read through an f16 copy, a quantized full store in place.)"""
    path = tiny_model("llama")
    tokens = _tokens(300)
    full = Llama(path, n_ctx=512, n_threads=2, logits_all=True)
    full.eval(tokens)
    lazy = Llama(path, n_ctx=512, n_threads=2, logits_all=True, lazy_layers=[0, 1, 2, 3], lazy_type="f16",
                 n_window=1000)
    lazy.eval(tokens)
    np.testing.assert_array_equal(lazy.scores[: lazy.n_tokens], full.scores[: full.n_tokens])


def test_ring_wraps_many_times_and_memory_stays_constant(tiny_model):
    """Decode one token at a time far past n_sink + n_window: the ring (252 cells) wraps ~6 times."""
    path = tiny_model("llama")
    n_window, n_ubatch = 32, 32
    llm = Llama(path, n_ctx=2048, n_threads=2, n_ubatch=n_ubatch, logits_all=True, lazy_layers=[0, 2],
                lazy_type="f16", n_sink=N_SINK, n_window=n_window)
    stats_before = llm.kv_cache_stats()
    lazy_capacity = stats_before["layers"][0]["capacity"]
    assert lazy_capacity == 256  # pad256(4 + 32 + 32 - 1)
    prompt = _tokens(40, seed=1)
    generated = [t for _, t in zip(range(1500), llm.generate(prompt, temp=0.0))]
    llm.eval(generated[-1:])
    assert llm.n_tokens == 1540 > 6 * lazy_capacity
    assert llm.kv_cache_stats() == stats_before

    sequence = list(llm.input_ids[: llm.n_tokens])
    want = _reference(path, sequence, [0, 2], "f16", n_window=n_window)
    got = torch.from_numpy(llm.scores[: llm.n_tokens].copy())
    err = (got - want).abs()
    assert err.max().item() < 0.1 and err.mean().item() < 5e-3
    # Greedy decoding followed the reference wherever its choice was clear.
    top2 = want.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.2
    ref_next = want.argmax(1)
    for i in range(len(prompt) - 1, len(sequence) - 1):
        if clear[i]:
            assert sequence[i + 1] == ref_next[i].item()


def test_residual_rewinds_exactly_within_its_reach_and_closely_beyond(tiny_model):
    # A q4_0 ring's residual keeps twice lazy_residual positions: a rewind of up to lazy_residual + 1 tokens
    # continues bit-identically to a fresh evaluation of the same tokens. A longer rewind that the ring
    # still serves keeps the context (no re-evaluation); the f16 keys it lost are read in 4 bits for the
    # next lazy_residual tokens, so it continues close to a fresh evaluation, not equal to it.
    path = tiny_model("llama")
    tokens = _tokens(400)
    kw = dict(n_ctx=1024, n_threads=2, logits_all=True, lazy_layers=[0, 1, 2, 3], n_sink=N_SINK,
              n_window=N_WINDOW, n_ubatch=16, lazy_type="q4_0", lazy_residual=8)
    for back, exact in ((9, True), (60, False)):
        keep, end = 300 - back, 320
        llm = Llama(path, **kw)
        llm.eval(tokens[:300])
        assert llm._rewind(keep)  # the ring (252 positions) still holds what the next queries need
        before = llm.n_evaluated
        llm.eval(tokens[keep:end])
        assert llm.n_evaluated - before == end - keep
        got = llm.scores[keep:end]
        fresh = Llama(path, **kw)
        fresh.eval(tokens[:keep])
        fresh.eval(tokens[keep:end])
        want = fresh.scores[keep:end]
        if exact:
            np.testing.assert_array_equal(got, want)
            continue
        f16 = Llama(path, **dict(kw, lazy_type="f16"))
        f16.eval(tokens[:end])
        quant_effect = np.abs(want - f16.scores[keep:end]).mean()
        diff = np.abs(got - want).mean()
        assert 0 < diff < quant_effect / 2


@pytest.mark.parametrize("lazy_type", ["q4_0", "f16"])
def test_decode_steps_reuse_one_graph(tiny_model, lazy_type):
    # A decode step whose shapes equal the previous step's reuses its graph (engine.h, BuiltGraph). With a
    # q4_0 ring the residual's columns are a fixed number (padded with a hidden cell), so the steps from
    # the start of a context, while the residual fills, have one shape too: building a graph per step
    # cost 7% of the decode speed at depth 0.
    path = tiny_model("llama")
    llm = Llama(path, n_ctx=1024, n_threads=2, lazy_layers=[0, 1, 2, 3], n_sink=N_SINK, n_window=N_WINDOW,
                lazy_type=lazy_type, lazy_residual=8)
    tokens = _tokens(60)
    llm.eval(tokens[:1])
    llm.eval(tokens[1:2])
    before = llm._engine.graph_builds
    for t in tokens[2:40]:  # more steps than the residual holds; n_kv stays one padded size
        llm.eval([t])
    assert llm._engine.graph_builds == before
