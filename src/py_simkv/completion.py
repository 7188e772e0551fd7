"""Text completion in llama-cpp-python's (OpenAI-style) shapes: the generation loop that turns sampled
tokens into text, honouring stop strings that span tokens, never splitting a UTF-8 character, and
counting usage. `Llama.create_completion` and `Llama.create_chat_completion` are thin wrappers.
"""
from __future__ import annotations

import codecs
import itertools
import time
import uuid
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .generation_end import GenerationEnd
from .logprobs import log_softmax


def _held_back(pending: bytes, stops: Sequence[bytes]) -> int:
    """Bytes at the end of `pending` that could be the start of a stop string: not safe to emit yet."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(pending)), hold, -1):
            if pending.endswith(s[:k]):
                hold = k
                break
    return hold


class _Logprobs:
    """The `logprobs` block of a completion choice, built one token at a time."""

    def __init__(self, llm, n_top: int, first_offset: int):
        self.llm, self.n_top, self.offset = llm, n_top, first_offset
        self.tokens: List[str] = []
        self.text_offset: List[int] = []
        self.token_logprobs: List[Optional[float]] = []
        self.top_logprobs: List[Optional[Dict[str, float]]] = []

    def add(self, token: int, logits: Optional[np.ndarray]) -> None:
        text = self.llm.detokenize([token]).decode("utf-8", errors="ignore")
        self.tokens.append(text)
        self.text_offset.append(self.offset)
        self.offset += len(text)
        if logits is None:  # the first echoed prompt token has no distribution (OpenAI convention)
            self.token_logprobs.append(None)
            self.top_logprobs.append(None)
            return
        lp = log_softmax(logits).astype(np.float32)
        top = np.argsort(-lp)[: self.n_top]
        entry = {self.llm.detokenize([int(i)]).decode("utf-8", errors="ignore"): float(lp[i]) for i in top}
        entry[text] = float(lp[token])
        self.token_logprobs.append(float(lp[token]))
        self.top_logprobs.append(entry)

    def since(self, start: int) -> dict:
        """The entries from token `start` on (a stream chunk carries those of its own tokens)."""
        return {"tokens": self.tokens[start:], "text_offset": self.text_offset[start:],
                "token_logprobs": self.token_logprobs[start:], "top_logprobs": self.top_logprobs[start:]}


# Where generated tokens come from: source(prompt_tokens, want_logits, end, **sampling) yields (token, the
# logits it was sampled from, or None unless want_logits) up to the token where `end` (GenerationEnd) ends
# the generation. In process: Llama.generate (llama_tokens below); in `simkv serve`: a slot of the
# continuous-batching scheduler (scheduler.py). Closing the iterator stops it.
TokenSource = Callable[..., Iterator[Tuple[int, Optional[np.ndarray]]]]


def llama_tokens(llm, prompt_tokens: List[int], want_logits: bool, end: GenerationEnd,
                 **sampling) -> Iterator[Tuple[int, Optional[np.ndarray]]]:
    """The in-process token source: Llama.generate (prefix reuse, libllama's sampler chain), through the
    Llama's prompt cache if it has one (set_cache)."""
    llm._load_cached_prefix(prompt_tokens)
    gen = llm.generate(prompt_tokens, **sampling)
    done = False
    try:
        for n, token in enumerate(gen, 1):
            yield token, (llm.last_logits if want_logits else None)
            if end.reason(token, n):
                break
        done = True
    except GeneratorExit:  # the completion stopped early (a stop string, the end of a turn): still cached
        done = True
        raise
    finally:
        gen.close()
        if done:
            llm._save_to_cache()


def completion_stream(
    llm,
    prompt: Union[str, List[int]],
    suffix: Optional[str] = None,
    max_tokens: Optional[int] = 16,
    temperature: float = 0.8,
    top_p: float = 0.95,
    min_p: float = 0.05,
    typical_p: float = 1.0,
    logprobs: Optional[int] = None,
    echo: bool = False,
    stop: Optional[Union[str, List[str]]] = None,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    repeat_penalty: float = 1.0,
    top_k: int = 40,
    seed: Optional[int] = None,
    tfs_z: float = 1.0,
    mirostat_mode: int = 0,
    mirostat_tau: float = 5.0,
    mirostat_eta: float = 0.1,
    model: Optional[str] = None,
    stopping_criteria=None,
    logits_processor=None,
    grammar=None,
    logit_bias: Optional[Dict[int, float]] = None,
    stop_token_ids: Sequence[int] = (),
    token_source: Optional[TokenSource] = None,
) -> Iterator[dict]:
    """Yields stream chunks (llama-cpp-python's `text_completion` chunk shape); the last one carries the
    finish_reason and, as an extra key consumed by create_completion, the usage. `model` names the model
    in the chunks (default: the model path). suffix: fill in the middle between prompt and suffix, with the
    model's FIM tokens. stopping_criteria(input_ids, logits) -> True ends the completion before the token
    just drawn (finish_reason "stop")."""
    if isinstance(prompt, str):
        prompt_text = prompt
    else:
        prompt = [int(t) for t in prompt]
        prompt_text = llm.detokenize(prompt).decode("utf-8", errors="ignore")
    if suffix is not None:
        prompt_tokens = infill_tokens(llm, prompt, suffix)
    elif isinstance(prompt, str):
        prompt_tokens = llm.tokenize(prompt.encode("utf-8"), special=True) if prompt else [llm.token_bos()]
    else:
        prompt_tokens = prompt
    if not prompt_tokens:
        raise ValueError("the prompt is empty")
    if len(prompt_tokens) > llm.n_ctx():
        raise ValueError(f"Requested tokens ({len(prompt_tokens)}) exceed context window of {llm.n_ctx()}")
    if logprobs is not None and (isinstance(logprobs, bool) or int(logprobs) < 0):
        raise ValueError("logprobs must be a non-negative int or None")
    if echo and logprobs is not None and not llm.logits_all:
        raise ValueError("echo with logprobs needs the prompt's logits: create the Llama with logits_all=True")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) for s in stops):
        raise TypeError("stop must be a string or a list of strings")
    stop_bytes = [s.encode("utf-8") for s in stops if s]
    room = llm.n_ctx() - len(prompt_tokens)
    limit = room if max_tokens is None or max_tokens <= 0 else min(max_tokens, room)

    completion_id = f"cmpl-{uuid.uuid4()}"
    created = int(time.time())

    def chunk(text: str, finish_reason=None, lp=None) -> dict:
        return {"id": completion_id, "object": "text_completion", "created": created, "model": model or llm.model_path,
                "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish_reason}]}

    record = _Logprobs(llm, int(logprobs), 0 if echo else len(prompt_text)) if logprobs is not None else None
    reported = 0  # logprobs entries already sent in a chunk

    def new_logprobs():
        nonlocal reported
        if record is None:
            return None
        start, reported = reported, len(record.tokens)
        return record.since(start)
    source = token_source or (lambda *a, **kw: llama_tokens(llm, *a, **kw))
    sampling = dict(top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p, temp=temperature,
                    repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                    presence_penalty=presence_penalty, tfs_z=tfs_z, mirostat_mode=mirostat_mode,
                    mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, seed=seed, logit_bias=logit_bias,
                    grammar=grammar)
    if logits_processor is not None:  # Python callables: only the in-process source runs them
        sampling["logits_processor"] = logits_processor
    want_logits = record is not None or stopping_criteria is not None
    end = GenerationEnd(limit, llm.token_is_eog, stop_token_ids)
    generator = None if limit <= 0 else source(prompt_tokens, want_logits, end, **sampling)
    try:
        pulled: List[Tuple[int, Optional[np.ndarray]]] = []
        if echo:
            if record is not None:
                if generator is None:
                    raise ValueError("echo with logprobs needs room in the context for at least one new token")
                # The prompt's logits exist once it is evaluated, i.e. when the first token has been drawn.
                pulled = [next(generator)]
                scores = llm.scores  # rows of the prompt (logits_all): row i predicts token i + 1
                for i, t in enumerate(prompt_tokens):
                    record.add(t, scores[i - 1] if i > 0 else None)
            yield chunk(prompt_text, lp=new_logprobs())

        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = b""
        completion_tokens: List[int] = []
        finish_reason = "length"
        for n, (token, logits) in enumerate(itertools.chain(pulled, generator or ()), 1):
            ends = end.reason(token, n)
            if ends == "stop":  # the turn's end: not part of the completion
                finish_reason = "stop"
                break
            if stopping_criteria is not None and stopping_criteria(
                    np.asarray(prompt_tokens + completion_tokens, dtype=np.intc), logits):
                finish_reason = "stop"
                break
            if record is not None:
                record.add(token, logits)
            completion_tokens.append(token)
            pending += llm.detokenize([token])
            hit = [i for i in (pending.find(s) for s in stop_bytes) if i >= 0]
            if hit:
                pending = pending[: min(hit)]
                finish_reason = "stop"
                break
            safe = len(pending) - _held_back(pending, stop_bytes)
            text = decoder.decode(pending[:safe])
            pending = pending[safe:]
            if text:
                yield chunk(text, lp=new_logprobs())
            if ends == "length":
                break
    finally:  # a stop string, the end, or the caller closing this stream: stop the source
        if generator is not None:
            generator.close()
    tail = decoder.decode(pending, final=True)
    if tail or (record is not None and reported < len(record.tokens)):
        yield chunk(tail, lp=new_logprobs())
    final = chunk("", finish_reason)
    final["usage"] = {"prompt_tokens": len(prompt_tokens), "completion_tokens": len(completion_tokens),
                      "total_tokens": len(prompt_tokens) + len(completion_tokens)}
    yield final


def infill_tokens(llm, prefix: Union[str, List[int]], suffix: str) -> List[int]:
    """A fill-in-the-middle prompt: [BOS] FIM_PRE prefix FIM_SUF suffix FIM_MID, as llama.cpp's infill builds
    it (suffix first with spm_infill=True). Refused for a model without FIM tokens."""
    if not isinstance(suffix, str):
        raise TypeError(f"suffix must be a string or None, got {type(suffix).__name__}")
    pre, suf, mid = llm.fim_tokens()
    if min(pre, suf, mid) < 0:
        raise ValueError(f"suffix needs a fill-in-the-middle model: {llm.model_path} has no FIM tokens")
    if isinstance(prefix, str):
        prefix = llm.tokenize(prefix.encode("utf-8"), add_bos=False, special=False) if prefix else []
    tail = llm.tokenize(suffix.encode("utf-8"), add_bos=False, special=False) if suffix else []
    body = [suf] + tail + [pre] + list(prefix) if llm.spm_infill else [pre] + list(prefix) + [suf] + tail
    return ([llm.token_bos()] if llm.add_bos_token() else []) + body + [mid]


def create_completion(llm, prompt, stream: bool = False, **kw):
    """A llama-cpp-python `text_completion` dict, or an iterator of its stream chunks."""
    chunks = completion_stream(llm, prompt, **kw)
    if stream:
        return _strip_usage(chunks)
    text, lp, last = [], None, None
    for c in chunks:
        text.append(c["choices"][0]["text"])
        part = c["choices"][0]["logprobs"]
        if part is not None:
            lp = part if lp is None else {k: lp[k] + part[k] for k in lp}
        last = c
    out = {k: last[k] for k in ("id", "object", "created", "model")}
    out["choices"] = [{"text": "".join(text), "index": 0, "logprobs": lp,
                       "finish_reason": last["choices"][0]["finish_reason"]}]
    out["usage"] = last["usage"]
    return out


def _strip_usage(chunks: Iterator[dict]) -> Iterator[dict]:
    for c in chunks:
        c.pop("usage", None)
        yield c
