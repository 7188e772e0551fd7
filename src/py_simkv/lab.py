"""Research operations on a Llama's context, for the profiler and the research benchmarks: what-ifs on the
residual stream and the attention probe's scores. They reach the engine through `_native.lab` (which also
taps one layer's attention and reads a store's raw contents, for the reference tests). `Llama` itself offers
llama-cpp-python's surface plus simkv's documented additions (eval(probe=...), nll, set_masked_layers)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from . import _native
from .checks import check_int
from .engine_config import DEFAULTS
from .kv_types import parse_kv_types
from .logprobs import log_softmax


def probe_args(probe: dict, n_tokens: int) -> dict:
    """A probe dict ({"n_probe", "n_sink", "n_window"}), checked, as the engine's keywords."""
    n_probe = check_int("n_probe", probe.get("n_probe", DEFAULTS.w_last), 1)
    if n_probe > n_tokens:
        raise ValueError(f"cannot probe {n_probe} tokens of an eval of {n_tokens}")
    return {"n_sink": check_int("n_sink", probe.get("n_sink", DEFAULTS.n_sink), 0),
            "n_window": check_int("n_window", probe.get("n_window", DEFAULTS.n_window), 1), "n_probe": n_probe}


def probe_scores(llm) -> dict:
    """The last probed evaluation's scores per layer (NaN where not probed): the attention mass on the sinks
    + window, and the relative change of the attention output if the layer kept only those keys."""
    with llm._use(new_epoch=False):
        mass, change = _native.lab.probe_scores(llm._engine)
    return {"mass": np.array(mass), "change": np.array(change)}


def set_what_if_types(llm, types) -> None:
    """What-if K/V types (the profiler's type criterion): {layer: 'q8_0' | 'q8_0/q4_0' | (K, V)} (kv_types.py's
    forms): from now on each listed full layer's store holds K and V of its types: the cells it holds now
    converted (rotated as a quantized store is), and every later write and read at those types, as in a
    cache built with them. The layers given types before get their own stores back; {} undoes it."""
    typed = [(il, *pair) for il, pair in sorted(parse_kv_types(types).items())]
    with llm._use():
        llm._engine.set_what_if_types(typed)


def what_if_nll(llm, tokens: Sequence[int], first_layer: int = 0, hidden: Optional[np.ndarray] = None,
                capture: bool = False, probe: Optional[dict] = None, logits: bool = False):
    """Llama.nll(tokens, keep=False) on the residual stream: only layers first_layer.. are computed, from
    `hidden` [n, n_embd], the stream entering first_layer; or capture=True also returns the stream entering
    each layer, [n_layer, n, n_embd]. The engine scores each row on the next token itself: one float per row
    comes back, not n_vocab. (Every token is evaluated, the last one too, though nothing scores it: the same
    ubatches as nll() computes, so the same logits to the bit.) probe: as Llama.eval's (every layer
    computed); its scores: probe_scores(llm). logits=True: every row's logits [n, n_vocab] instead of the
    losses. The context is left as it was."""
    with llm._use():
        first = llm._conv.last_logits
        if first is None:
            raise ValueError("nll() needs a context: eval() a prompt first")
        arr = llm._checked_tokens(tokens)
        if arr.size == 0:
            return (np.zeros(0), None) if capture else np.zeros(0)
        llm._sync()
        out = np.empty(arr.size)
        out[0] = -log_softmax(first)[arr[0]]  # the first token from the context's last logits
        rows_in = None if hidden is None else np.ascontiguousarray(hidden, dtype=np.float32)
        targets = None if logits else np.append(arr[1:], -1).astype(np.int32)  # each row's next token
        probed = {} if probe is None else probe_args(probe, arr.size)
        rows, entering = _native.lab.eval_stream(llm._engine, arr.astype(np.int32), first_layer, rows_in, capture,
                                                 targets, **probed)
        if logits:
            out = rows
        else:
            out[1:] = rows[:-1]
        llm.n_evaluated += int(arr.size)
        llm._forget_what_if(first)
    return (out, entering) if capture else out
