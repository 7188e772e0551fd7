"""Gemma 3 (gemma3 architecture) on the real Gemma-3-270M: five of every six layers attend through a
512-token sliding window, stored as sliding rings (kv_policy_lazy.cpp, kind "swa")."""
import argparse
import collections
import json
import logging
import textwrap
import unittest

import numpy as np
import pytest

from py_simkv import Llama
from py_simkv.memory import kv_bytes
from llama_cpp_reference import reference_llama
from torch_reference import Weights, causal_mask, forward, sink_window_mask

N_THREADS = 2
LOGIT_ATOL = 1e-3  # test_parity_llama_cpp's: same ops in the same order


def _text() -> str:
    return "\n\n".join(m.__doc__ for m in (argparse, json, collections, logging, textwrap, unittest) if m.__doc__)


@pytest.fixture(scope="module")
def tokens_and_reference(gemma_path):
    ref = reference_llama(gemma_path, n_ctx=2048, n_batch=512, n_threads=N_THREADS, logits_all=True, flash_attn=True)
    tokens = ref.tokenize(_text().encode())[:1100]
    assert len(tokens) == 1100
    ref.eval(tokens)
    return tokens, np.array(ref.scores[: len(tokens)], dtype=np.float32)


def test_swa_layers_and_their_stores(gemma_path):
    llm = Llama(gemma_path, n_ctx=4096, n_threads=N_THREADS)
    hp = llm.hparams
    assert hp["arch"] == "gemma3" and hp["n_swa"] == 512
    assert hp["swa_layers"] == [il for il in range(18) if il % 6 < 5]
    stats = llm.kv_cache_stats()
    kinds = [layer["kind"] for layer in stats["layers"]]
    assert kinds == ["swa" if il % 6 < 5 else "full" for il in range(18)]
    assert {layer["capacity"] for layer in stats["layers"] if layer["kind"] == "swa"} == {1024}  # 512 + ubatch
    assert stats["total_bytes"] == kv_bytes(llm, 4096)


def test_logits_match_llama_cpp_while_the_rings_have_not_wrapped(gemma_path, tokens_and_reference):
    """Up to position 1023 a sliding ring (1024 cells) holds every position in order, as llama.cpp's SWA
    cache does: the same ops in the same order, so the same logits, the window in force from 512 on."""
    tokens, want = tokens_and_reference
    llm = Llama(gemma_path, n_ctx=2048, n_batch=512, n_threads=N_THREADS, logits_all=True)
    llm.eval(tokens[:1024])
    np.testing.assert_allclose(llm.scores[: llm.n_tokens], want[:1024], rtol=0, atol=LOGIT_ATOL)


def test_window_matters_and_wrapped_rings_stay_as_close_as_llama_cpp(gemma_path, tokens_and_reference):
    """Against an independent float64 forward (sliding-window masks on the SWA layers): past position 1024
    the rings hold positions out of order, so flash attention sums in another order than llama.cpp and
    the logits drift apart (Gemma amplifies f16 rounding); we must stay as close to the reference as
    llama.cpp does (measured: mean 0.255 vs 0.261). Reading wrong keys costs far more: the reference
    without windows is 2.65 away from the one with them on rows 512..700."""
    tokens, lcpp = tokens_and_reference
    llm = Llama(gemma_path, n_ctx=2048, n_batch=512, n_threads=N_THREADS, logits_all=True)
    llm.eval(tokens)
    ours = llm.scores[: llm.n_tokens]
    w = Weights(gemma_path)
    n = len(tokens)
    masks = [sink_window_mask(n, 0, 512) if w.is_swa(il) else causal_mask(n) for il in range(w.n_layer)]
    want = forward(w, tokens, masks, ["f16"] * w.n_layer).numpy()
    tail = slice(1024, n)
    ours_err = np.abs(ours[tail] - want[tail]).mean()
    lcpp_err = np.abs(lcpp[tail] - want[tail]).mean()
    assert ours_err < 1.25 * lcpp_err, (ours_err, lcpp_err)
    assert (ours[tail].argmax(1) == want[tail].argmax(1)).mean() > 0.9
    no_window = forward(w, tokens[:700], [causal_mask(700)] * w.n_layer, ["f16"] * w.n_layer).numpy()
    assert np.abs(no_window[512:] - want[512:700]).mean() > 4 * lcpp_err


def test_lazy_global_layers_and_refusals(gemma_path):
    llm = Llama(gemma_path, n_ctx=4096, n_threads=N_THREADS, lazy_layers=[5, 11], n_window=256)
    kinds = [layer["kind"] for layer in llm.kv_cache_stats()["layers"]]
    assert kinds[5] == kinds[11] == "lazy" and kinds[17] == "full" and kinds[0] == "swa"
    out = llm.create_completion("The capital of France is", max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] > 0
    with pytest.raises(ValueError, match="sliding-window layer"):
        Llama(gemma_path, n_ctx=256, lazy_layers=[0])
    with pytest.raises(ValueError, match="only full layers"):
        Llama(gemma_path, n_ctx=256).set_masked_layers([1])


def test_profile_scores_only_global_layers(gemma_path, tmp_path):
    """The profiler probes and trims only layers that can be lazy; the sliding-window layers get NaN
    scores and are never selected, and the ratio is of the global layers."""
    from py_simkv import LazyProfile, profile_model

    prof = profile_model(gemma_path, n_ctx=1024, max_samples=1, loss_samples=1, n_threads=N_THREADS, progress=False)
    path = str(tmp_path / "gemma.simkv.json")
    prof.save(path)
    prof = LazyProfile.load(path)
    for criterion in ("mass", "loss"):
        mean = prof.mean(criterion)
        assert [il for il in range(18) if not np.isnan(mean[il])] == [5, 11, 17], (criterion, mean)
        assert prof.select(ratio=1.0, criterion=criterion) == [5, 11, 17]
        assert set(prof.select(ratio=0.5, criterion=criterion)) < {5, 11, 17}
        assert len(prof.select(ratio=0.5, criterion=criterion)) == 2
    llm = Llama(gemma_path, n_ctx=2048, n_threads=N_THREADS, lazy_profile=path, lazy_ratio=0.5)
    assert llm.kv_cache_stats()["lazy_layers"] == prof.select(ratio=0.5)


def test_info_makes_only_global_layers_lazy(gemma_path):
    import subprocess

    out = subprocess.run(["simkv", "info", gemma_path, "--n-ctx", "32768"], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    llm = Llama(gemma_path, n_ctx=64, n_threads=1)
    want = kv_bytes(llm, 32768, type_k="f16", lazy_layers=[11, 17], n_window=1024) / 2**20
    row = [line for line in out.splitlines() if line.startswith("SimLayerKV 50% of global layers lazy, f16")]
    assert len(row) == 1 and abs(float(row[0].split()[-2]) - want) < 0.05, out
