"""The lazy-layer probe against the same quantities computed in PyTorch (torch_reference.forward)."""
import numpy as np
import pytest

from py_simkv import Llama
from torch_reference import Weights, causal_mask, forward

N = 400


def _tokens(n, seed=3):
    return [int(t) for t in np.random.default_rng(seed).integers(0, 49152, n)]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("n_probe,n_window,n_ubatch", [(32, 64, 512), (32, 100, 48), (1, 64, 512)])
def test_prefill_probe_matches_reference(tiny_model, arch, n_probe, n_window, n_ubatch):
    # (32, 100, 48): the probed rows straddle two ubatches. (1, ...): one query, the decode variant's shape.
    path = tiny_model(arch)
    tokens = _tokens(N)
    llm = Llama(path, n_ctx=512, n_ubatch=n_ubatch, n_threads=2)
    got = llm.eval(tokens, probe={"n_probe": n_probe, "n_sink": 4, "n_window": n_window})
    _, ref = forward(Weights(path), tokens, [causal_mask(N)] * 4, ["f16"] * 4,
                     probe=(list(range(N - n_probe, N)), 4, n_window))
    mass = np.array([m for m, _ in ref])
    change = np.array([c for _, c in ref])
    # K, Q (f16 dot products) and V (f16 accumulation in flash attention) are rounded as in the model path;
    # masses are sums of ~400 probabilities, changes ratios of norms: 1e-3 absolute is ~100x the f16 error
    # on these quantities and ~100x smaller than their spread across layers.
    np.testing.assert_allclose(got["mass"], mass, atol=1e-3)
    np.testing.assert_allclose(got["change"], change, atol=2e-3)
    assert np.ptp(mass) > 0.01 or np.ptp(change) > 0.01


def test_decode_probe_and_lazy_layers_unprobed(tiny_model):
    path = tiny_model("llama")
    tokens = _tokens(N)
    llm = Llama(path, n_ctx=512, n_threads=2, lazy_layers=[2], lazy_type="f16", n_window=128)
    llm.eval(tokens[:-1])
    got = llm.eval(tokens[-1:], probe={"n_probe": 1, "n_sink": 4, "n_window": 256})
    assert np.isnan(got["mass"][2]) and np.isnan(got["change"][2])
    masks = [causal_mask(N)] * 4
    from torch_reference import sink_window_mask
    masks[2] = sink_window_mask(N, 4, 128)
    _, ref = forward(Weights(path), tokens, masks, ["f16"] * 4, probe=([N - 1], 4, 256))
    for il in (0, 1, 3):
        assert got["mass"][il] == pytest.approx(ref[il][0], abs=1e-3)
        assert got["change"][il] == pytest.approx(ref[il][1], abs=2e-3)


def test_probe_leaves_logits_unchanged(tiny_model):
    path = tiny_model("llama")
    tokens = _tokens(300)
    a = Llama(path, n_ctx=512, n_threads=2, logits_all=True)
    a.eval(tokens)
    b = Llama(path, n_ctx=512, n_threads=2, logits_all=True)
    b.eval(tokens, probe={"n_probe": 32, "n_sink": 4, "n_window": 64})
    np.testing.assert_array_equal(a.scores[: a.n_tokens], b.scores[: b.n_tokens])


def test_probe_bad_input(tiny_model):
    llm = Llama(tiny_model("llama"), n_ctx=64, n_threads=1)
    with pytest.raises(ValueError, match="cannot probe 10 tokens"):
        llm.eval(list(range(5)), probe={"n_probe": 10})
    with pytest.raises(ValueError, match="n_window"):
        llm.eval(list(range(5)), probe={"n_probe": 2, "n_window": 0})
