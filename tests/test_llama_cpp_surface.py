"""llama-cpp-python's `Llama` surface on py_simkv.Llama, side by side with llama_cpp.Llama on the same GGUF.

The same logits (simkv is bit-identical to llama.cpp here) through the same libllama samplers with the same
seeds must give the same tokens, so most checks compare outputs exactly: samplers (typical, mirostat,
temperature < 0), grammars, seeds call by call, logits processors and stopping criteria. Then what has no
llama-cpp-python twin to compare with: JSON schemas validated, a tool call's round trip, fill-in-the-middle,
pickling, and LangChain's `LlamaCpp` running on simkv.
"""
import inspect
import json
import pickle
import warnings

import jsonschema
import llama_cpp
import numpy as np
import pytest
from llama_cpp import LlamaGrammar, LogitsProcessorList, StoppingCriteriaList

import py_simkv
from py_simkv import Llama, compat
from llama_cpp_reference import reference_llama

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def ours(smollm_path):
    return Llama(smollm_path, n_ctx=1024, n_threads=2, logits_all=True)


@pytest.fixture(scope="module")
def ref(smollm_path):
    return reference_llama(smollm_path, n_ctx=1024, n_threads=2, flash_attn=True, logits_all=True)


@pytest.fixture
def fresh_warnings(monkeypatch):
    """compat warns once per argument and process: start each test with none given yet."""
    monkeypatch.setattr(compat, "_warned", set())


def text(result) -> str:
    return result["choices"][0]["text"]


# --- the constructor ------------------------------------------------------------------------------------
def test_every_llama_cpp_constructor_argument_is_accepted(smollm_path, ref, fresh_warnings):
    """Every argument of llama_cpp.Llama, with llama-cpp-python's defaults: accepted; those simkv ignores warn
    once, naming the argument; the result is llama-cpp-python's."""
    params = inspect.signature(llama_cpp.Llama.__init__).parameters
    kwargs = {name: p.default for name, p in params.items()
              if name not in ("self", "model_path") and p.kind is not p.VAR_KEYWORD}
    kwargs.update(n_threads=2, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = Llama(smollm_path, **kwargs)
    named = {str(w.message).split(" ")[0] for w in caught if issubclass(w.category, RuntimeWarning)}
    assert named and named <= set(kwargs)
    assert "flash_attn" in named  # llama-cpp-python's default is without flash attention; simkv always uses it
    assert llm.n_ctx() == 512 and llm.n_batch == 512
    assert text(llm(PROMPT, max_tokens=12, temperature=0)) == text(ref(PROMPT, max_tokens=12, temperature=0))


def test_every_constructor_argument_has_a_decision():
    """Each argument of llama_cpp.Llama is either one of simkv's own or listed in compat.py with the reason it
    is ignored or refused: a new llama-cpp-python argument fails here until it is decided."""
    theirs = {n for n, p in inspect.signature(llama_cpp.Llama.__init__).parameters.items() if p.kind is not p.VAR_KEYWORD}
    ours = set(inspect.signature(Llama.__init__).parameters)
    assert theirs - ours - set(compat.IGNORED_ARGS) - set(compat.REFUSED_ARGS) == set()


def test_constructor_forms(smollm_path, fresh_warnings):
    llm = Llama(smollm_path, n_ctx=0, seed=-1, type_k=8, type_v=8, n_threads=2, flash_attn=True)
    assert llm.n_ctx() == llm.hparams["n_ctx_train"] and llm.type_k == llm.type_v == "q8_0"  # GGML_TYPE_Q8_0
    llm.close()
    with pytest.raises(ValueError, match="unknown ggml type id 999"):
        Llama(smollm_path, type_k=999, type_v=999)
    with pytest.warns(RuntimeWarning, match="use_mlock is ignored"):
        Llama(smollm_path, use_mlock=True, n_ctx=64)
    with pytest.warns(RuntimeWarning, match="n_parts is ignored: neither simkv nor llama-cpp-python"):
        Llama(smollm_path, n_parts=-1, n_ctx=64)
    with pytest.raises(ValueError, match="LoRA"):
        Llama(smollm_path, lora_path="adapter.gguf")
    with pytest.raises(ValueError, match="Invalid chat handler: nope.*chatml"):
        Llama(smollm_path, chat_format="nope")


def test_vocab_only_tokenizes_and_refuses_to_evaluate(smollm_path, ref):
    llm = Llama(smollm_path, vocab_only=True)
    assert llm.tokenize(b"Hello world") == ref.tokenize(b"Hello world")
    for call in (lambda: llm.eval([1, 2]), lambda: llm(PROMPT, max_tokens=2)):
        with pytest.raises(ValueError, match="vocab_only"):
            call()


# --- sampling -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(typical_p=0.5), dict(mirostat_mode=1), dict(mirostat_mode=2, mirostat_tau=3.0),
                                dict(temperature=-1.0), dict(top_k=0, top_p=1.0, min_p=0.0, temperature=1.2)])
def test_sampling_matches_llama_cpp(ours, ref, kw):
    assert text(ours(PROMPT, max_tokens=20, seed=3, **kw)) == text(ref(PROMPT, max_tokens=20, seed=3, **kw))


def test_default_seed_repeats_call_by_call_like_llama_cpp(smollm_path):
    """Without a seed, llama-cpp-python draws each call's seed from the previous one: a fresh object repeats
    the same outputs in the same order, and two calls in a row differ."""
    ours_texts = [text(o(PROMPT, max_tokens=10)) for o in [Llama(smollm_path, n_threads=2)] for _ in range(3)]
    ref_texts = [text(r(PROMPT, max_tokens=10)) for r in [reference_llama(smollm_path, n_threads=2, flash_attn=True)]
                 for _ in range(3)]
    assert ours_texts == ref_texts and len(set(ours_texts)) == 3


def test_sample_matches_llama_cpp(ours, ref):
    tokens = ours.tokenize(PROMPT.encode())
    for llm in (ours, ref):
        llm.reset()
        llm.eval(tokens)
        llm.set_seed(11)
    assert [ours.sample(temp=1.0, top_k=0, top_p=1.0, min_p=0.0) for _ in range(3)] == \
           [ref.sample(temp=1.0, top_k=0, top_p=1.0, min_p=0.0) for _ in range(3)]
    assert ours.sample(temp=0) == int(np.argmax(ours.scores[ours.n_tokens - 1]))
    for idx in (1, ours.n_tokens - 1):  # a row of scores: the logits after token idx (logits_all for any)
        # (llama-cpp-python's own sample() here would reuse a sampler an earlier test's generation left behind)
        assert ours.sample(temp=0, idx=idx) == int(np.argmax(ref.scores[idx]))


def test_grammar_matches_llama_cpp(ours, ref):
    gbnf = 'root ::= "The answer is " [0-9]+ "."'
    for grammar in (LlamaGrammar.from_string(gbnf), gbnf):
        a = text(ours("What is 6 times 7?", max_tokens=20, grammar=grammar, seed=5))
        b = text(ref("What is 6 times 7?", max_tokens=20, grammar=LlamaGrammar.from_string(gbnf), seed=5))
        assert a == b and a.startswith("The answer is ") and a.endswith(".")


def test_bad_grammar_is_a_clear_error_and_the_object_stays_usable(ours):
    for bad, why in [("not gbnf at all", "failed to parse"), ('root ::= ("a"', "failed to parse"),
                     ("root ::= undefined-rule", "failed to parse"), ('root ::= root "a"', "left recursion"),
                     ('other ::= "a"', "'root' symbol")]:
        with pytest.raises(ValueError, match=f"grammar is not valid GBNF .llama.cpp: .*{why}"):
            ours(PROMPT, max_tokens=4, grammar=bad)
    with pytest.raises(ValueError, match="the grammar admits no token at this point"):
        ours(PROMPT, max_tokens=4, grammar="root ::= [z-a]")
    with pytest.raises(TypeError, match="grammar must be"):
        ours(PROMPT, max_tokens=4, grammar=42)
    assert text(ours(PROMPT, max_tokens=4, temperature=0))


def test_logits_processor_and_stopping_criteria_match_llama_cpp(ours, ref):
    banned = ours.tokenize(b" the", add_bos=False)[0]
    n_prompt = len(ours.tokenize(PROMPT.encode(), special=True))

    def ban(input_ids, scores):
        scores[banned] = -np.inf
        return scores

    def after_six(input_ids, logits):
        return len(input_ids) >= n_prompt + 6

    kw = dict(max_tokens=30, temperature=0, logits_processor=LogitsProcessorList([ban]),
              stopping_criteria=StoppingCriteriaList([after_six]))
    a, b = ours(PROMPT, **kw), ref(PROMPT, **kw)
    assert text(a) == text(b) and a["usage"]["completion_tokens"] == 6
    assert a["choices"][0]["finish_reason"] == b["choices"][0]["finish_reason"] == "stop"
    assert banned not in ours.tokenize(text(a).encode(), add_bos=False)


def test_echo_logprobs_on_a_fresh_object_match_llama_cpp(smollm_path):
    """echo + logprobs reads the prompt's logits only once the prompt is evaluated (a fresh object once
    raised IndexError here, and a used one returned the previous prompt's logprobs). The prompt's part is
    checked against llama.cpp's own logits of that prompt, the reply's against llama-cpp-python's logprobs
    without echo: its echo + logprobs is wrong itself (rows shifted, the last token dropped)."""
    ours = Llama(smollm_path, n_ctx=256, n_threads=2, logits_all=True)
    ref = reference_llama(smollm_path, n_ctx=256, n_threads=2, flash_attn=True, logits_all=True)
    for prompt in (PROMPT, "The capital of France is"):
        got = ours(prompt, max_tokens=4, temperature=0, logprobs=3, echo=True)["choices"][0]
        reply = ref(prompt, max_tokens=4, temperature=0, logprobs=3)["choices"][0]
        tokens = ref.tokenize(prompt.encode(), special=True)
        ref.reset()
        ref.eval(tokens)
        rows = ref.logits_to_logprobs(np.array(ref.scores[: len(tokens)]))
        want = [None] + [float(rows[i - 1, t]) for i, t in enumerate(tokens) if i] + reply["logprobs"]["token_logprobs"]
        assert got["text"] == prompt + reply["text"]
        assert got["logprobs"]["tokens"] == [ref.detokenize([t]).decode() for t in tokens] + reply["logprobs"]["tokens"]
        assert got["logprobs"]["token_logprobs"][0] is None
        # float32 log softmax in llama-cpp-python, float64 here
        np.testing.assert_allclose(got["logprobs"]["token_logprobs"][1:], want[1:], atol=1e-4)
    with pytest.raises(ValueError, match="logits_all=True"):
        Llama(smollm_path, n_ctx=256, n_threads=2)(PROMPT, max_tokens=2, logprobs=1, echo=True)


# --- constrained chat: JSON schemas, tool calls --------------------------------------------------------------
# Bounded strings, lists and integers: a 135M model may repeat itself inside a string; with these bounds the
# grammar built from the schema admits at most ~180 characters, so max_tokens=256 always sees it closed.
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 999},
                         "likes": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3}},
          "required": ["name", "age", "likes"]}
SUBJECTS = ["a cat", "a pirate", "a teacher", "a robot", "a dragon", "a farmer", "a poet", "a chef", "a knight",
            "an astronaut", "a dog", "a doctor", "a wizard", "a sailor", "a child", "a painter", "a miner",
            "a baker", "a pilot", "a queen"]


def test_json_schema_output_validates_on_20_prompts(ours):
    for i, subject in enumerate(SUBJECTS):
        out = ours.create_chat_completion(
            [{"role": "user", "content": f"Describe {subject} as JSON with a name, an age and what it likes."}],
            response_format={"type": "json_object", "schema": SCHEMA}, max_tokens=256, seed=i)
        # strict=False: llama-cpp-python's schema-to-GBNF converter (reused, not rewritten) lets a string hold a
        # raw newline, which strict JSON forbids; the values must still validate against the schema.
        jsonschema.validate(json.loads(out["choices"][0]["message"]["content"], strict=False), SCHEMA)
    plain = ours.create_chat_completion([{"role": "user", "content": "Return a JSON object with a name and an age."}],
                                        response_format={"type": "json_object"}, max_tokens=200, temperature=0)
    assert plain["choices"][0]["finish_reason"] == "stop"  # JSON mode's grammar (no schema) is unbounded
    assert isinstance(json.loads(plain["choices"][0]["message"]["content"], strict=False), (dict, list))


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CHOOSE_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


def test_tool_call_matches_llama_cpp(ours, ref):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    a = ours.create_chat_completion(messages, tools=WEATHER, tool_choice=CHOOSE_WEATHER, seed=1, max_tokens=40)
    b = ref.create_chat_completion(messages, tools=WEATHER, tool_choice=CHOOSE_WEATHER, seed=1, max_tokens=40)
    call_a, call_b = a["choices"][0]["message"]["tool_calls"][0], b["choices"][0]["message"]["tool_calls"][0]
    assert call_a["function"] == call_b["function"]  # the ids carry a random uuid
    assert json.loads(call_a["function"]["arguments"])["city"]


def test_tool_call_round_trip_with_chatml_function_calling(smollm_path):
    llm = Llama(smollm_path, n_ctx=1024, n_threads=2, chat_format="chatml-function-calling")
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = llm.create_chat_completion(messages, tools=WEATHER, tool_choice=CHOOSE_WEATHER, seed=1, max_tokens=40)
    message = first["choices"][0]["message"]
    call = message["tool_calls"][0]
    assert call["function"]["name"] == "get_weather" and "city" in json.loads(call["function"]["arguments"])
    messages += [message, {"role": "tool", "tool_call_id": call["id"], "content": '{"celsius": 18, "sky": "cloudy"}'}]
    second = llm.create_chat_completion(messages, tools=WEATHER, seed=1, max_tokens=24)
    reply = second["choices"][0]["message"]
    assert reply["role"] == "assistant" and reply["content"] and not reply.get("tool_calls")


# --- fill in the middle, pickling, the tokenizer object -----------------------------------------------------------
def test_suffix_fills_in_the_middle_with_the_models_fim_tokens(tiny_model, smollm_path):
    path = tiny_model("llama", tokenizer_ids={"fim_pre": 3, "fim_suf": 4, "fim_mid": 5})
    llm = Llama(path, n_ctx=256, n_threads=2)
    assert llm.fim_tokens() == (3, 4, 5)
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    out = llm(prefix, suffix=suffix, max_tokens=3, temperature=0)
    want = ([llm.token_bos()] if llm.add_bos_token() else []) + [3] + llm.tokenize(prefix.encode(), add_bos=False) + \
        [4] + llm.tokenize(suffix.encode(), add_bos=False) + [5]
    assert list(llm.input_ids[: len(want)]) == want and out["usage"]["prompt_tokens"] == len(want)
    with pytest.raises(ValueError, match="fill-in-the-middle"):
        Llama(smollm_path, n_ctx=64)(prefix, suffix=suffix, max_tokens=2)


def test_pickle_builds_the_same_llama_and_continues_its_seed(smollm_path):
    llm = Llama(smollm_path, n_ctx=256, n_threads=2, seed=7, lazy_layers=[10, 11], n_window=64)
    first = text(llm(PROMPT, max_tokens=8))
    clone = pickle.loads(pickle.dumps(llm))
    assert (clone.n_ctx(), clone.lazy_layers, clone.n_window) == (256, [10, 11], 64)
    assert text(clone(PROMPT, max_tokens=8)) == text(llm(PROMPT, max_tokens=8)) != first


def test_tokenizer_and_model_facts_match_llama_cpp(ours, ref):
    s = "héllo wörld <|im_start|>"
    assert ours.tokenizer().encode(s) == ref.tokenizer().encode(s)
    assert ours.tokenizer().decode(ours.tokenizer().encode(s)) == ref.tokenizer().decode(ref.tokenizer().encode(s))
    assert ours.tokenize(s.encode(), special=True) == ref.tokenize(s.encode(), special=True)
    for fact in ("n_vocab", "n_embd", "token_nl", "token_bos", "token_eos"):
        assert getattr(ours, fact)() == getattr(ref, fact)(), fact
    logits = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    np.testing.assert_allclose(Llama.logits_to_logprobs(logits), llama_cpp.Llama.logits_to_logprobs(logits), atol=1e-6)
    assert Llama.longest_token_prefix([1, 2, 3], [1, 2, 4]) == 2
    ours.reset()
    ours.eval(ours.tokenize(PROMPT.encode()))
    assert ours.input_ids.shape == (1024,) and list(ours.eval_tokens) == list(ours.input_ids[: ours.n_tokens])
    assert ours.scores.shape == (1024, ours.n_vocab())


# --- LangChain ------------------------------------------------------------------------------------------------
def test_langchain_llamacpp_runs_on_simkv(smollm_path, monkeypatch):
    """LangChain's LlamaCpp with llama_cpp.Llama swapped for simkv's (the one change a user makes): it passes
    arguments llama-cpp-python never had (n_parts, f16_kv) and suffix=None on every call."""
    from langchain_community.llms import LlamaCpp

    monkeypatch.setattr(llama_cpp, "Llama", py_simkv.Llama)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chain = LlamaCpp(model_path=smollm_path, n_ctx=512, temperature=0, max_tokens=12, n_threads=2,
                         verbose=False)
    assert isinstance(chain.client, py_simkv.Llama)
    answer = chain.invoke("The capital of France is")
    assert answer == text(Llama(smollm_path, n_ctx=512, n_threads=2)("The capital of France is", max_tokens=12,
                                                                     temperature=0, repeat_penalty=1.1))
    assert "".join(chain.stream("The capital of France is")) == answer
    yes_no = LlamaCpp(model_path=smollm_path, n_ctx=512, temperature=0, max_tokens=4, n_threads=2,
                      grammar='root ::= "yes" | "no"')
    assert yes_no.invoke("Is Paris in France?") in ("yes", "no")


# --- state: save_state / load_state, llama-cpp-python's RAM and disk caches -----------------------------------
LONG = "The history of the printing press begins in the fifteenth century. " * 8  # wraps a 64-token ring


def _continue(llm, n=8):
    """Greedy continuation: the logits of each step."""
    out = [llm.last_logits.copy()]
    for _ in range(n):
        llm.eval([int(np.argmax(out[-1]))])
        out.append(llm.last_logits.copy())
    return np.array(out)


@pytest.mark.parametrize("kw", [dict(), dict(type_k="q8_0", type_v="q8_0"),
                                dict(lazy_layers=list(range(10, 20)), n_window=64),  # q4_0 rings, wrapped
                                dict(lazy_layers=list(range(10, 20)), n_window=64, lazy_type="f16", logits_all=True),
                                dict(lazy_layers=list(range(10, 20)), n_window=64, lazy_prefill="exact"),
                                dict(lazy_mode="dynamic", n_window=64)])
def test_state_round_trip_continues_bit_identically(smollm_path, kw):
    a = Llama(smollm_path, n_ctx=512, n_threads=2, **kw)
    a.eval(a.tokenize(LONG.encode()))
    state = pickle.loads(pickle.dumps(a.save_state()))  # what LlamaDiskCache stores
    lazy = a.kv_cache_stats()["lazy_layers"]
    want = _continue(a)
    b = Llama(smollm_path, n_ctx=512, n_threads=2, **kw)
    b.load_state(state)
    assert b.kv_cache_stats()["lazy_layers"] == lazy and b.n_tokens == state.n_tokens
    np.testing.assert_array_equal(_continue(b), want)
    a.load_state(state)  # back into the object that went on
    np.testing.assert_array_equal(_continue(a), want)
    if kw.get("logits_all"):
        np.testing.assert_array_equal(b.scores[: state.n_tokens], state.scores)


def test_a_state_of_other_settings_is_refused_and_the_object_stays_usable(smollm_path, tiny_model):
    state = Llama(smollm_path, n_ctx=512, n_threads=2, lazy_layers=[1])
    state.eval(state.tokenize(b"Hello there"))
    saved = state.save_state()
    for other in (Llama(smollm_path, n_ctx=512, n_threads=2), Llama(smollm_path, n_ctx=256, n_threads=2),
                  Llama(tiny_model("llama"), n_ctx=512, n_threads=2)):
        with pytest.raises(ValueError, match="state"):
            other.load_state(saved)
        assert other.n_tokens == 0 and text(other(PROMPT, max_tokens=2, temperature=0)) is not None
    broken = llama_cpp.llama.LlamaState(saved.input_ids, saved.scores, saved.n_tokens, saved.llama_state[:-7],
                                        saved.llama_state_size - 7, saved.seed)
    with pytest.raises(ValueError, match="truncated|corrupt|trailing"):
        state.load_state(broken)
    assert state.n_tokens == 0


@pytest.mark.parametrize("kind", ["ram", "disk"])
def test_prompt_cache_hit_loads_the_cached_context(smollm_path, tmp_path, kind):
    """As llama-cpp-python's own cache tests: a prompt that extends a cached one loads that state (once)
    instead of evaluating the prefix again, and answers as a fresh Llama does."""
    cache = llama_cpp.LlamaRAMCache() if kind == "ram" else llama_cpp.LlamaDiskCache(str(tmp_path / "cache"))
    llm = Llama(smollm_path, n_ctx=1024, n_threads=2, lazy_layers=list(range(10, 20)), n_window=128)
    llm.set_cache(cache)
    first = LONG + "Gutenberg"
    llm(first, max_tokens=4, temperature=0)
    llm("Something else entirely.", max_tokens=4, temperature=0)  # the context moves away
    loads = []
    original = llm.load_state
    llm.load_state = lambda s: (loads.append(s.n_tokens), original(s))
    before = llm.n_evaluated
    second = llm(first + " printed", max_tokens=8, temperature=0)
    assert len(loads) == 1 and llm.n_evaluated - before < 20  # only the new tokens, not the whole prefix
    fresh = Llama(smollm_path, n_ctx=1024, n_threads=2, lazy_layers=list(range(10, 20)), n_window=128)
    assert text(second) == text(fresh(first + " printed", max_tokens=8, temperature=0))


# --- embeddings ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", [0, 1, 2, 3])  # NONE (a causal LM's own), MEAN, CLS, LAST
def test_embeddings_match_llama_cpp(smollm_path, pooling):
    ours = Llama(smollm_path, n_ctx=512, n_threads=2, embedding=True, pooling_type=pooling)
    ref = reference_llama(smollm_path, n_ctx=512, n_threads=2, flash_attn=True, embedding=True, pooling_type=pooling)
    for normalize in (False, True):
        a = np.array(ours.embed("The quick brown fox jumps over the lazy dog.", normalize=normalize))
        b = np.array(ref.embed("The quick brown fox jumps over the lazy dog.", normalize=normalize))
        assert a.shape == b.shape == ((10, 576) if pooling == 0 else (576,))  # 10 tokens
        # The same rows, bit for bit (measured: 0.0 apart); llama.cpp pools and normalizes in float32 inside
        # its graph, simkv in float64 numpy (measured 6e-7 apart, values up to 34).
        np.testing.assert_allclose(a, b, rtol=0, atol=0 if pooling == 0 and not normalize else 1e-5)
    assert ours.pooling_type() == pooling


def test_embedding_of_several_inputs_and_the_openai_shape(smollm_path):
    llm = Llama(smollm_path, n_ctx=512, n_threads=2, embedding=True, pooling_type=1)
    texts = ["Hello world", "A much longer sentence about the printing press and its history."]
    out = llm.create_embedding(texts, model="smol")
    assert out["object"] == "list" and out["model"] == "smol" and [d["index"] for d in out["data"]] == [0, 1]
    assert out["usage"]["prompt_tokens"] == sum(len(llm.tokenize(t.encode())) for t in texts)
    for text_, d in zip(texts, out["data"]):
        np.testing.assert_array_equal(d["embedding"], llm.embed(text_))  # alone = in a list
    per_token = Llama(smollm_path, n_ctx=512, n_threads=2, embedding=True).embed(texts)
    assert [len(rows) for rows in per_token] == [len(llm.tokenize(t.encode())) for t in texts]
    assert text(llm(PROMPT, max_tokens=3, temperature=0))  # generation still works after embedding
    with pytest.raises(RuntimeError, match="embedding=True"):
        Llama(smollm_path, n_ctx=64).embed("x")
    with pytest.raises(ValueError, match="pooling_type"):
        Llama(smollm_path, n_ctx=64, embedding=True, pooling_type=4)
    with pytest.raises(ValueError, match="exceed batch size"):
        Llama(smollm_path, n_ctx=64, n_batch=8, embedding=True).embed("word " * 20, truncate=False)
