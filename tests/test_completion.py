"""Completions and chat: llama-cpp-python's dict shapes, streaming, stop strings, seeds, prefix reuse."""
import pytest

from py_simkv import Llama
from llama_cpp_reference import reference_llama

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


def shape(x):
    """The structure of a result: dict keys (recursively) and value types, not the values."""
    if isinstance(x, dict):
        return {k: shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return [shape(v) for v in x[:1]]
    return type(x).__name__ if x is not None else None


@pytest.fixture(scope="module")
def ours(smollm_path):
    return Llama(smollm_path, n_ctx=2048, n_threads=2)


@pytest.fixture(scope="module")
def ref(smollm_path):
    return reference_llama(smollm_path, n_ctx=2048, n_threads=2, flash_attn=True)


def test_completion_dict_matches_llama_cpp_python(ours, ref):
    a = ours.create_completion(PROMPT, max_tokens=12, temperature=0.0)
    b = ref.create_completion(PROMPT, max_tokens=12, temperature=0.0)
    assert shape(a) == shape(b)
    assert a["object"] == b["object"] == "text_completion"
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["choices"][0]["finish_reason"] == b["choices"][0]["finish_reason"] == "length"
    assert a["usage"] == b["usage"]
    assert ours(PROMPT, max_tokens=12, temperature=0.0)["choices"][0]["text"] == a["choices"][0]["text"]


def test_chat_dict_matches_llama_cpp_python(ours, ref):
    a = ours.create_chat_completion(MESSAGES, max_tokens=24, temperature=0.0)
    b = ref.create_chat_completion(MESSAGES, max_tokens=24, temperature=0.0)
    assert shape(a) == shape(b)
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["choices"][0]["finish_reason"] == b["choices"][0]["finish_reason"]
    assert a["usage"] == b["usage"]


def test_chat_stops_at_end_of_turn(ours):
    out = ours.create_chat_completion(MESSAGES, max_tokens=200, temperature=0.0)
    assert out["choices"][0]["finish_reason"] == "stop"
    assert "<|im_end|>" not in out["choices"][0]["message"]["content"]
    assert out["usage"]["completion_tokens"] < 200


def test_stream_chunks_match_llama_cpp_python_and_concatenate(ours, ref):
    a = list(ours.create_completion(PROMPT, max_tokens=12, temperature=0.0, stream=True))
    b = list(ref.create_completion(PROMPT, max_tokens=12, temperature=0.0, stream=True))
    assert shape(a[0]) == shape(b[0]) and shape(a[-1]) == shape(b[-1])
    assert a[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in a) == "".join(c["choices"][0]["text"] for c in b)
    ca = list(ours.create_chat_completion(MESSAGES, max_tokens=24, temperature=0.0, stream=True))
    cb = list(ref.create_chat_completion(MESSAGES, max_tokens=24, temperature=0.0, stream=True))
    assert shape(ca[0]) == shape(cb[0]) and shape(ca[1]) == shape(cb[1]) and shape(ca[-1]) == shape(cb[-1])


def test_streaming_equals_non_streaming_when_sampled(ours):
    kw = dict(max_tokens=40, temperature=0.9, seed=7)
    full = ours.create_completion("Once upon a time", **kw)["choices"][0]["text"]
    streamed = "".join(c["choices"][0]["text"] for c in ours.create_completion("Once upon a time", stream=True, **kw))
    assert streamed == full and len(full) > 20


def test_seeded_completions_are_reproducible(ours):
    kw = dict(max_tokens=24, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = ours.create_completion("My favourite animal is", seed=42, **kw)["choices"][0]["text"]
    b = ours.create_completion("My favourite animal is", seed=42, **kw)["choices"][0]["text"]
    c = ours.create_completion("My favourite animal is", seed=43, **kw)["choices"][0]["text"]
    assert a == b != c


def test_stop_string_spanning_tokens(ours):
    free = ours.create_completion(PROMPT, max_tokens=24, temperature=0.0)["choices"][0]["text"]
    # Build a stop string from the end of one generated token and the start of the next.
    toks = ours.tokenize((PROMPT + free).encode(), special=True)[len(ours.tokenize(PROMPT.encode(), special=True)):]
    pieces = [ours.detokenize([t]).decode() for t in toks]
    i = next(i for i in range(2, len(pieces) - 1) if len(pieces[i].strip()) >= 2 and len(pieces[i + 1].strip()) >= 2)
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    want = free[: free.index(stop)]
    out = ours.create_completion(PROMPT, max_tokens=24, temperature=0.0, stop=[stop, "never appears"])
    assert out["choices"][0]["text"] == want
    assert out["choices"][0]["finish_reason"] == "stop"
    chunks = [c["choices"][0]["text"] for c in ours.create_completion(PROMPT, max_tokens=24, temperature=0.0,
                                                                          stop=stop, stream=True)]
    assert "".join(chunks) == want
    assert all(stop[:2] not in c or c.index(stop[:2]) < len(want) for c in chunks)


def test_streaming_never_splits_a_utf8_character(ours):
    prompt = "Emoji party: 🎉🚀🙂🎉🚀🙂🎉🚀🙂🎉🚀"
    text = ours.create_completion(prompt, max_tokens=24, temperature=0.0)["choices"][0]["text"]
    toks = ours.tokenize((prompt + text).encode(), special=True)
    partial = []
    for t in toks:
        try:
            ours.detokenize([t]).decode("utf-8")
        except UnicodeDecodeError:
            partial.append(t)
    assert partial, "the test needs tokens that are parts of a UTF-8 character"
    chunks = [c["choices"][0]["text"] for c in ours.create_completion(prompt, max_tokens=24, temperature=0.0, stream=True)]
    assert "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)


def test_logprobs(ours, ref):
    a = ours.create_completion(PROMPT, max_tokens=6, temperature=0.0, logprobs=3)
    lp = a["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "text_offset", "token_logprobs", "top_logprobs"}
    assert len(lp["tokens"]) == 6 and "".join(lp["tokens"]) == a["choices"][0]["text"]
    assert all(x <= 0 for x in lp["token_logprobs"])
    assert lp["text_offset"][0] == len(PROMPT)
    # greedy: the chosen token is the most likely one
    assert all(max(d.values()) == pytest.approx(x) for d, x in zip(lp["top_logprobs"], lp["token_logprobs"]))


def test_echo(ours):
    out = ours.create_completion(PROMPT, max_tokens=4, temperature=0.0, echo=True)
    assert out["choices"][0]["text"].startswith(PROMPT)


@pytest.mark.parametrize("lazy", [None, list(range(10, 20))])
def test_prefix_reuse_evaluates_only_the_new_suffix(smollm_path, lazy):
    kw = dict(n_ctx=2048, n_threads=2, lazy_layers=lazy, n_window=256, n_ubatch=64)
    llm = Llama(smollm_path, **kw)
    base = "Alice was beginning to get very tired of sitting by her sister on the bank. " * 4
    llm.create_completion(base + "She", max_tokens=4, temperature=0.0)
    before = llm.n_evaluated
    second = llm.create_completion(base + "Then", max_tokens=8, temperature=0.0)
    n_second = len(llm.tokenize((base + "Then").encode(), special=True))
    n_common = len(llm.tokenize(base.encode(), special=True))
    assert llm.n_evaluated - before < n_second - n_common + 8 + 2  # the common prefix was not re-evaluated
    fresh = Llama(smollm_path, **kw).create_completion(base + "Then", max_tokens=8, temperature=0.0)
    assert second["choices"][0]["text"] == fresh["choices"][0]["text"]


def test_rewind_past_a_lazy_ring_re_evaluates(smollm_path):
    """A rewind whose keys the ring already overwrote must re-evaluate instead of attending to garbage."""
    kw = dict(n_ctx=2048, n_threads=2, lazy_layers=list(range(10, 20)), n_sink=4, n_window=32, n_ubatch=32)
    llm = Llama(smollm_path, **kw)
    head = "The history of the printing press begins in the fifteenth century. " * 5
    tail_a = "Gutenberg combined known technologies into a practical system. " * 30
    tail_b = "Movable type had been invented in East Asia centuries earlier. "
    p_a = llm.tokenize((head + tail_a).encode(), special=True)
    assert len(p_a) - len(llm.tokenize(head.encode(), special=True)) > 256  # the ring (252) has moved past head
    llm.create_completion(head + tail_a, max_tokens=2, temperature=0.0)
    before = llm.n_evaluated
    got = llm.create_completion(head + tail_b, max_tokens=12, temperature=0.0)
    n_b = len(llm.tokenize((head + tail_b).encode(), special=True))
    assert llm.n_evaluated - before >= n_b  # everything was evaluated again
    fresh = Llama(smollm_path, **kw).create_completion(head + tail_b, max_tokens=12, temperature=0.0)
    assert got["choices"][0]["text"] == fresh["choices"][0]["text"]


def test_completion_bad_input(ours):
    with pytest.raises(ValueError, match="exceed context window"):
        ours.create_completion("word " * 3000, max_tokens=4)
    with pytest.raises(TypeError, match="messages"):
        ours.create_chat_completion("hello")


def test_seeded_sampling_equals_llama_cpp_python(ours, ref):
    """Same logits, same libllama sampler chain, same seed: the same sampled reply."""
    for seed in (1, 2):
        a = ours.create_chat_completion(MESSAGES, temperature=0.8, seed=seed, max_tokens=24)
        b = ref.create_chat_completion(MESSAGES, temperature=0.8, seed=seed, max_tokens=24)
        assert a["choices"][0]["message"] == b["choices"][0]["message"]
