"""Per-layer K and V cache types (kv_types.py): the spec's forms, the stores they build, their planned sizes,
saved states, and the logits they give on the real model."""
import numpy as np
import pytest

from py_simkv import Llama
from py_simkv.kv_types import format_kv_types, parse_kv_types
from py_simkv.memory import kv_layers

N_LAYER = 30  # SmolLM2-135M
N_PROMPT = 400


def test_spec_forms():
    want = {0: ("q8_0", "q8_0"), 1: ("q8_0", "q8_0"), 2: ("q8_0", "q8_0"), 7: ("q8_0", "q4_0")}
    assert parse_kv_types("0-2=q8_0,7=q8_0/q4_0") == want
    assert parse_kv_types({0: "q8_0", 1: ("q8_0", "q8_0"), 2: "q8_0/q8_0", 7: ("q8_0", "q4_0")}) == want
    assert parse_kv_types(["q8_0", "q8_0", "q8_0", None, None, None, None, "q8_0/q4_0"]) == want
    assert format_kv_types(want) == "0-2=q8_0,7=q8_0/q4_0"
    assert parse_kv_types(format_kv_types(want)) == want
    assert parse_kv_types(None) == {} and parse_kv_types("") == {}


@pytest.mark.parametrize("spec,message", [
    ("0-3", "LAYERS=TYPE"), ("a=q8_0", "not a layer"), ("3-1=q8_0", "empty"), ("1=q8_0,1=q4_0", "twice"),
    ("1=q8_0/q4_0/f16", "K/V"), ({"1": "q8_0"}, "layer index"), ({1: 8}, "type name"), (3, "string, a mapping"),
])
def test_bad_spec_is_refused(spec, message):
    with pytest.raises((ValueError, TypeError), match=message):
        parse_kv_types(spec)


def test_bad_types_are_refused_and_nothing_is_lost(smollm_path):
    llm = Llama(smollm_path, n_ctx=256, n_threads=2, verbose=False)
    for spec, message in [("3=q5_1", "unknown layer 3's K type 'q5_1'"), ("30=q8_0", "layer 30 is out of range"),
                          ("-1=q8_0", "not a layer")]:
        with pytest.raises(ValueError, match=message):
            Llama(smollm_path, n_ctx=256, n_threads=2, kv_types=spec, verbose=False)
    llm.eval(llm.tokenize(b"still usable"))
    assert llm.n_tokens > 0


def _stores(llm):
    return [(d["kind"], d["type_k"], d["type_v"]) for d in llm.kv_cache_stats()["layers"]]


def test_each_layer_gets_its_types(smollm_path):
    """Defaults for the unlisted layers, its own K and V for each listed one, full or lazy; the planned sizes
    (memory.py, `simkv info`) are the allocated ones, layer by layer."""
    cfg = dict(n_ctx=1024, type_k="q8_0", type_v="q4_0", lazy_layers=[20, 21, 22], lazy_type="f16",
               kv_types="0-1=q4_0,5=f16/q8_0,21=q8_0/q4_0")
    llm = Llama(smollm_path, n_threads=2, verbose=False, **cfg)
    stores = _stores(llm)
    assert stores[0] == stores[1] == ("full", "q4_0", "q4_0")
    assert stores[2] == ("full", "q8_0", "q4_0")
    assert stores[5] == ("full", "f16", "q8_0")
    assert stores[20] == stores[22] == ("lazy", "f16", "f16")
    assert stores[21] == ("lazy", "q8_0", "q4_0")
    assert llm.kv_types == parse_kv_types(cfg["kv_types"])
    layers = llm.kv_cache_stats()["layers"]
    # a quantized ring among the lazy layers: the lazy layers keep an f16 residual
    assert all(layers[il]["residual"] == llm.lazy_residual for il in (20, 21, 22))
    planned = kv_layers(llm, 1024, **{k: v for k, v in cfg.items() if k != "n_ctx"})
    assert [(p["kind"], p["type_k"], p["type_v"], p["bytes"]) for p in planned] == \
        [(d["kind"], d["type_k"], d["type_v"], d["bytes"]) for d in layers]
    # an f16 store is twice a q8_0's bytes minus its block scales: the sizes follow each tensor's own type
    assert layers[5]["bytes"] != layers[2]["bytes"]


def test_f16_rings_alone_keep_no_residual(smollm_path):
    llm = Llama(smollm_path, n_ctx=512, n_threads=2, lazy_layers=[20, 21], lazy_type="f16", verbose=False)
    assert all(d["residual"] == 0 for d in llm.kv_cache_stats()["layers"])


@pytest.fixture(scope="module")
def prompt(prose_tokens):
    return prose_tokens[:N_PROMPT]


def _logits(path, tokens, **kw):
    llm = Llama(path, n_ctx=1024, n_threads=2, logits_all=True, verbose=False, **kw)
    llm.eval(tokens)
    out = llm.scores[: llm.n_tokens].copy()
    for t in tokens[-8:]:  # a few decode steps (attention_quantized's path) after the prompt's ubatch
        llm.eval([t])
    out = np.concatenate([out, llm.scores[llm.n_tokens - 8: llm.n_tokens]])
    llm.close()
    return out


def test_listing_every_layer_is_the_global_type(smollm_path, prompt):
    """Every layer listed with one type computes exactly what that global type_k/type_v computes: the same
    stores, read by the same kernels (the global types are checked against llama-cpp-python in
    test_parity_llama_cpp.py)."""
    for t in ("f16", "q8_0"):
        a = _logits(smollm_path, prompt, type_k=t, type_v=t)
        b = _logits(smollm_path, prompt, kv_types=f"0-{N_LAYER - 1}={t}")
        assert np.array_equal(a, b), t


def _kld(reference, logits):
    def log_softmax(x):
        x = x.astype(np.float64) - x.max(1, keepdims=True)
        return x - np.log(np.exp(x).sum(1, keepdims=True))
    p, q = log_softmax(reference), log_softmax(logits)
    return float((np.exp(p) * (p - q)).sum(1).mean())


def test_mixed_layers_land_between_their_types(smollm_path, prompt):
    """Half the layers q8_0 and half q4_0 move the next-token distributions from f16's further than all q8_0
    and less far than all q4_0 (measured mean KLD over the prompt: q8_0 0.004, mixed 0.03, q4_0 0.07): the
    listed types are the ones used."""
    f16 = _logits(smollm_path, prompt)
    q8 = _kld(f16, _logits(smollm_path, prompt, type_k="q8_0", type_v="q8_0"))
    q4 = _kld(f16, _logits(smollm_path, prompt, type_k="q4_0", type_v="q4_0"))
    mixed = _kld(f16, _logits(smollm_path, prompt, type_k="q8_0", type_v="q8_0", kv_types="15-29=q4_0"))
    assert q8 < mixed < q4, (q8, mixed, q4)


def test_state_round_trips_with_mixed_types(smollm_path, prompt):
    kw = dict(n_ctx=1024, n_threads=2, logits_all=False, lazy_layers=[10, 11], kv_types="0-3=q8_0/q4_0,10=q8_0",
              verbose=False)
    a = Llama(smollm_path, **kw)
    a.eval(prompt[:300])
    state = a.save_state()
    a.eval(prompt[300:310])
    want = a.scores[a.n_tokens - 1].copy()
    b = Llama(smollm_path, **kw)
    b.load_state(state)
    b.eval(prompt[300:310])
    assert np.array_equal(b.scores[b.n_tokens - 1], want)
    other = Llama(smollm_path, **{**kw, "kv_types": "0-3=q8_0,10=q8_0"})
    with pytest.raises(ValueError, match="other cache settings .*layer 0.*V q4_0.*V q8_0"):
        other.load_state(state)
    other.eval(prompt[:4])  # still usable


def test_exact_prefill_compacts_into_each_layers_types(smollm_path, prompt):
    """Exact prefill evaluates the prompt with every layer full (each in its full types), then compacts the
    lazy layers into rings of their own types (kv_compaction.cpp)."""
    llm = Llama(smollm_path, n_ctx=1024, n_threads=2, lazy_layers=[20, 21], lazy_prefill="exact",
                kv_types="21=q8_0/q4_0", verbose=False)
    assert _stores(llm)[21] == ("full", "q8_0", "q4_0")  # full until the prompt is in
    llm.eval(prompt[:300])
    stores = _stores(llm)
    assert stores[20] == ("lazy", "q4_0", "q4_0") and stores[21] == ("lazy", "q8_0", "q4_0")
    assert stores[0] == ("full", "f16", "f16")
    llm.eval(prompt[300:310])  # decodes on
