"""What-if K/V types (lab.set_what_if_types, the profiler's type criterion): a full layer's store converted
to other types keeps its cells, computes from then on exactly as a cache built with those types, and gives
the layer its own store back afterwards."""
import numpy as np
import pytest

from py_simkv import Llama, lab

TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 60


def _tokens(path, n):
    return Llama(path, n_ctx=512, vocab_only=True).tokenize(TEXT.encode(), add_bos=True)[:n]


def test_types_given_before_any_token_compute_as_a_cache_built_with_them(tiny_model):
    # An empty store converted, then written by every token: the same computation, bit for bit, as a cache
    # whose layer was built with those types.
    path = tiny_model("llama")
    toks = _tokens(path, 200)
    built = Llama(path, n_ctx=256, n_threads=2, logits_all=True, kv_types={1: "q4_0", 2: "q8_0/q4_0"})
    built.eval(toks)
    tried = Llama(path, n_ctx=256, n_threads=2, logits_all=True)
    lab.set_what_if_types(tried, {1: "q4_0", 2: ("q8_0", "q4_0")})
    tried.eval(toks)
    assert np.array_equal(built.scores[:200], tried.scores[:200])


def test_types_given_after_a_prefix_convert_its_cells_and_come_back(tiny_model):
    path = tiny_model("llama")
    toks = _tokens(path, 200)
    llm = Llama(path, n_ctx=256, n_threads=2)
    llm.eval(toks[:150])
    tail = toks[150:]
    base = lab.what_if_nll(llm, tail, logits=True)
    # f16 what-if types change nothing
    lab.set_what_if_types(llm, {2: "f16"})
    assert np.array_equal(lab.what_if_nll(llm, tail, logits=True), base)
    # q4_0 keys and values of layer 2: near what a cache built with them computes over the same prompt (its
    # prefix rows were quantized from f32 rather than from the f16 rows converted here, and the layers above
    # computed the prefix from the f16 layer's output: both differences far below the quantization's own)
    lab.set_what_if_types(llm, {2: "q4_0"})
    tried = lab.what_if_nll(llm, tail, logits=True)
    built = Llama(path, n_ctx=256, n_threads=2, kv_types={2: "q4_0"})
    built.eval(toks[:150])
    real = lab.what_if_nll(built, tail, logits=True)
    quant_effect = np.abs(real - base).max()
    assert quant_effect > 0
    assert np.abs(tried - real).max() < 0.5 * quant_effect
    assert llm.kv_cache_stats()["layers"][2]["type_k"] == "q4_0"
    # every layer gets its own store back, with its rows as they were
    lab.set_what_if_types(llm, {})
    assert llm.kv_cache_stats()["layers"][2]["type_k"] == "f16"
    assert np.array_equal(lab.what_if_nll(llm, tail, logits=True), base)


def test_a_layer_keeping_its_what_if_types_keeps_its_converted_store(tiny_model):
    path = tiny_model("llama")
    toks = _tokens(path, 120)
    llm = Llama(path, n_ctx=256, n_threads=2)
    llm.eval(toks[:100])
    lab.set_what_if_types(llm, {0: "q8_0", 1: "q8_0"})
    first = lab.what_if_nll(llm, toks[100:], logits=True)
    lab.set_what_if_types(llm, {0: "q8_0", 1: "q8_0", 3: "q4_0"})
    lab.set_what_if_types(llm, {0: "q8_0", 1: "q8_0"})
    assert np.array_equal(lab.what_if_nll(llm, toks[100:], logits=True), first)
    assert [x["type_k"] for x in llm.kv_cache_stats()["layers"]] == ["q8_0", "q8_0", "f16", "f16"]


def test_bad_what_if_types_are_refused_and_change_nothing(tiny_model):
    path = tiny_model("llama")
    toks = _tokens(path, 60)
    llm = Llama(path, n_ctx=256, n_threads=2, lazy_layers=[3], n_window=16)
    llm.eval(toks[:50])
    base = lab.what_if_nll(llm, toks[50:], logits=True)
    lab.set_what_if_types(llm, {0: "q8_0"})
    for bad, err, match in (({3: "q8_0"}, ValueError, "only full layers"), ({7: "q8_0"}, ValueError, "out of range"),
                            ({1: "q5_1"}, ValueError, "q5_1"), ({-1: "q8_0"}, ValueError, "out of range"),
                            ({1: 3}, TypeError, "type name")):
        with pytest.raises(err, match=match):
            lab.set_what_if_types(llm, bad)
    lab.set_what_if_types(llm, {})
    assert np.array_equal(lab.what_if_nll(llm, toks[50:], logits=True), base)
    exact = Llama(path, n_ctx=256, n_threads=2, lazy_layers=[3], lazy_prefill="exact")
    with pytest.raises(ValueError, match="exact prefill"):
        lab.set_what_if_types(exact, {0: "q8_0"})


def test_tokens_kept_while_types_are_set_are_refused_on_the_way_back(tiny_model):
    # A store kept aside holds only what was written before: a context that kept tokens meanwhile cannot get
    # it back (its layers would miss those positions); reset() ends the what-if with the context.
    path = tiny_model("llama")
    toks = _tokens(path, 80)
    llm = Llama(path, n_ctx=256, n_threads=2)
    llm.eval(toks[:40])
    lab.set_what_if_types(llm, {1: "q4_0"})
    llm.eval(toks[40:60])
    with pytest.raises(ValueError, match="kept in the context"):
        lab.set_what_if_types(llm, {})
    llm.reset()
    assert llm.kv_cache_stats()["layers"][1]["type_k"] == "f16"
    lab.set_what_if_types(llm, {})
    llm.eval(toks[:40])
    fresh = Llama(path, n_ctx=256, n_threads=2)
    fresh.eval(toks[:40])
    assert np.array_equal(lab.what_if_nll(llm, toks[40:60]), lab.what_if_nll(fresh, toks[40:60]))
