"""Making a lazy-layer profile: run the model over calibration text with every layer full and measure,
per layer, the criteria lazy_profile.py describes ("mass" and "change" by the native probe, "loss" by
trimming one layer at a time over a shared full prefix).
"""
from __future__ import annotations

import math
import sys
import time
from importlib import resources
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .checks import check_int
from .engine_config import DEFAULTS
from . import lab
from .lazy_profile import LazyProfile, mean_of_measured
from .llama import Llama
from .logprobs import log_softmax
from .memory import layers_that_can_be_lazy


def default_calibration_texts() -> List[Tuple[str, str]]:
    """(source, text) pairs of the calibration set shipped in py_simkv/calibration (see its README)."""
    folder = resources.files("py_simkv") / "calibration"
    return [(name, (folder / name).read_text(encoding="utf-8"))
            for name in ("python_reference_prose.txt", "python_stdlib_code.txt", "dialogue_chatterbot.txt")]


def _samples(llm, texts: Sequence[Tuple[str, str]], n_ctx: int, max_samples: int) -> List[Tuple[str, List[int]]]:
    """Cut each text into n_ctx-token samples, alternating sources, up to max_samples."""
    per_source = []
    for source, text in texts:
        toks = llm.tokenize(text.encode("utf-8"), add_bos=True)
        chunks = [(f"{source}[{i // n_ctx}]", toks[i:i + n_ctx]) for i in range(0, len(toks) - n_ctx + 1, n_ctx)]
        if not chunks and len(toks) > 0:
            chunks = [(source, toks)]
        per_source.append(chunks)
    out = []
    for i in range(max(len(c) for c in per_source) if per_source else 0):
        for chunks in per_source:
            if i < len(chunks) and len(out) < max_samples:
                out.append(chunks[i])
    return out


# Profiling defaults (the CLI's `simkv profile` reads these): 2K-token samples, a 256-token window (the
# prefill window of the paper scaled to the sample), three samples scored by loss (one per kind of text),
# each on its second half. (Scoring only the last 256 tokens takes a third of the time but ranked the layers
# with a Spearman correlation of 0.85 to this: benchmarks/research/profile_speed.py.)
# No samples beyond the loss samples: five more fed only the probe's criteria (mass, change), which are not
# the default where loss is measured, for about a minute; the documentation's quality tables were made with these
# three. (--samples adds samples, --loss-samples scores them: the shipped SmolLM2 profile has 6, which chose
# better sets on held-out text, for about three times this default's time; profiles/README.md.)
PROFILE_N_CTX, PROFILE_N_WINDOW, PROFILE_SAMPLES, PROFILE_LOSS_SAMPLES, PROFILE_LOSS_TOKENS = 2048, 256, 3, 3, 1024
# Racing (successive elimination): a layer whose loss on the first samples ranks it among the worst is
# unlikely to be among the laziest half, so it is not measured again. The first loss sample measures every
# layer; the second re-measures the lowest 55% by loss so far, each later one the lowest 40% (of all
# lazy-able layers, among those the sample before measured). A layer's loss is the mean over the samples
# that measured it (LazyProfile.mean). On SmolLM2 it took two thirds of the work and chose the default
# (budget) set and the 25% set as measuring every layer did, 14 of the 50% set's 15 layers, Spearman 0.96
# over the layers; the same on three other samples of the calibration text (README, "Profile speed";
# benchmarks/research/profile_reliability.py). race=False measures every layer on every loss sample.
PROFILE_RACE_KEEP = (0.55, 0.4)
# Types: on each loss sample, every lazy-able layer's K/V options are tried one layer at a time over a cache
# whose full layers hold q8_0 (TYPE_BASE: nearly free, llama.cpp's -ctk q8_0 -ctv q8_0), scoring the first
# PROFILE_TYPE_TOKENS tokens of the scored tail by KL divergence from the f16 model's next-token
# distributions. A layer's cost is how much its option raises that divergence over the all-q8_0 cache's
# (kv_choice.py adds them up). Divergences rather than losses: on SmolLM2 one layer's 4-bit keys move the
# loss by less than its noise, but the divergence by 2-6x the noise.
PROFILE_TYPE_TOKENS = 256
TYPE_BASE = ("q8_0", "q8_0")
TYPE_OPTIONS = (("q8_0", "q4_0"), ("q4_0", "q4_0"))  # beside the base and "lazy" (sinks + window)


def profile_model(model_path: str, texts: Optional[Iterable] = None, n_ctx: int = PROFILE_N_CTX,
                  n_sink: int = DEFAULTS.n_sink, n_window: int = PROFILE_N_WINDOW, w_last: int = DEFAULTS.w_last,
                  max_samples: int = PROFILE_SAMPLES, loss_samples: int = PROFILE_LOSS_SAMPLES,
                  loss_tokens: Optional[int] = None, n_threads: Optional[int] = None,
                  progress: bool = True, devices: Optional[dict] = None, race: bool = True,
                  type_tokens: int = PROFILE_TYPE_TOKENS, type_samples: Optional[int] = None) -> LazyProfile:
    """Probe every layer (all full) on calibration samples of n_ctx tokens; return their scores.

    texts: strings or (source, text) pairs; default: the calibration set shipped with simkv.
    loss_samples: how many of the samples (the first ones: samples alternate between the texts, so one of
    each kind) also measure the "loss" criterion: the loss of the sample's last loss_tokens tokens (default
    PROFILE_LOSS_TOKENS, at most half the sample) with each layer trimmed in turn, over the shared full prefix
    (n_layer + 1 evaluations of loss_tokens each); 0 = none. race: after the first loss sample, re-measure
    only the layers still in the running (PROFILE_RACE_KEEP); False: every layer on every loss sample.
    type_tokens: on each loss sample (the first type_samples of them, if given), score every lazy-able layer's
    K/V options (TYPE_OPTIONS, and lazy) one at a time on that many tokens of the scored tail (kv_choice.py
    chooses from them); 0 = none. Quantized options keep the engine's default f16 residual (full_residual).
    devices: Llama's placement arguments (n_gpu_layers, main_gpu, rpc_servers, tensor_split)."""
    check_int("n_ctx", n_ctx, 2)
    check_int("w_last", w_last, 1)
    check_int("loss_samples", loss_samples, 0)
    check_int("type_tokens", type_tokens, 0)
    if type_samples is not None:
        check_int("type_samples", type_samples, 0)
    loss_tokens = min(PROFILE_LOSS_TOKENS, n_ctx // 2) if loss_tokens is None else check_int("loss_tokens", loss_tokens, 1)
    if w_last > n_ctx:
        raise ValueError(f"w_last ({w_last}) must not exceed n_ctx ({n_ctx})")
    if check_int("n_window", n_window, 1) >= n_ctx:
        raise ValueError(f"n_window ({n_window}) must be smaller than n_ctx ({n_ctx}): a window covering the whole "
                         "sample trims nothing, and every layer would look lazy")
    if loss_samples and loss_tokens >= n_ctx:
        raise ValueError(f"loss_tokens ({loss_tokens}) must be smaller than n_ctx ({n_ctx}): the scored tokens "
                         "need a prefix to attend to")
    pairs = default_calibration_texts() if texts is None else [
        t if isinstance(t, tuple) else (f"text{i}", t) for i, t in enumerate(texts)]
    if not pairs or not all(isinstance(t, str) and t for _, t in pairs):
        raise ValueError("calibration texts must be non-empty strings")
    llm = Llama(model_path, n_ctx=n_ctx, n_threads=n_threads, **(devices or {}))
    samples = _samples(llm, pairs, n_ctx, max_samples)
    layers = layers_that_can_be_lazy(llm.hparams)
    n_loss = min(loss_samples, len(samples))
    n_layer = llm.hparams["n_layer"]
    chosen = [list(layers)]  # per loss sample, the layers it measures (the first: all)
    type_tokens = min(type_tokens, loss_tokens)
    n_typed = n_loss if type_samples is None else min(type_samples, n_loss)
    planned = lambda: _planned_work(samples, n_loss, loss_tokens, layers, n_layer, race, chosen, type_tokens, n_typed)
    meter = _Progress(planned(), progress, calibrates=n_loss > 0 and len(layers) > 1)
    results = []
    for k, (source, toks) in enumerate(samples):
        probe = {"n_probe": min(w_last, len(toks)), "n_sink": n_sink, "n_window": n_window}
        llm.reset()
        if k < n_loss:
            # The prefix once; then the tail scored untrimmed, which the probe watches (it sees the whole
            # sample), and with each layer trimmed (what-ifs that leave the prefix in place).
            tail = min(loss_tokens, len(toks) - 1)
            prefix = len(toks) - tail
            llm.eval(toks[:prefix])
            meter.add(prefix, n_layer)
            losses, scores = _trim_losses(llm, toks[prefix:], chosen[k], n_sink, n_window, meter,
                                          dict(probe, n_probe=min(w_last, tail)))
            for il in set(layers) - set(chosen[k]):
                losses[il] = None  # not re-measured (racing)
            result = {"loss": losses}
            if type_tokens and k < n_typed:
                result["types"] = _type_klds(llm, toks[prefix:prefix + type_tokens], layers, n_sink, n_window, meter)
        else:
            scores = llm.eval(toks, probe=probe)
            meter.add(len(toks), n_layer)
            result = {}
        results.append({"source": source, "n_tokens": len(toks), "mass": scores["mass"].tolist(),
                        "change": scores["change"].tolist(), **result})
        if k + 1 < n_loss:
            n_next = _n_running(k + 1, len(layers)) if race else len(layers)
            chosen.append(_still_running([r["loss"] for r in results], chosen[k], n_next))
            meter.total = planned()
    meter.done()
    types = ({"type_tokens": type_tokens, "type_base": _option_name(TYPE_BASE), "full_residual": llm.full_residual}
             if type_tokens and n_typed else {})
    return LazyProfile(model=llm.model_identity(),
                       params={"n_ctx": n_ctx, "n_sink": n_sink, "n_window": n_window, "w_last": w_last,
                               "loss_tokens": loss_tokens, **types},
                       samples=results)


def _n_running(k: int, n_layers: int, keep: Sequence[float] = PROFILE_RACE_KEEP) -> int:
    """How many of n_layers lazy-able layers loss sample k (k >= 1) re-measures when racing."""
    return min(n_layers, math.ceil(keep[min(k - 1, len(keep) - 1)] * n_layers))


def _still_running(losses: List[List[Optional[float]]], running: List[int], n: int) -> List[int]:
    """Of the layers the last sample measured (running), the n with the lowest loss so far."""
    mean = mean_of_measured(np.array(losses, dtype=np.float64))
    return sorted(sorted(running, key=lambda il: mean[il])[:n])


def _planned_work(samples, n_loss: int, loss_tokens: int, layers: List[int], n_layer: int, race: bool,
                  chosen: Sequence[List[int]], type_tokens: int = 0, n_typed: int = 0) -> "_Work":
    """The profile's work (_Work): a whole sample each, and per loss sample its what-ifs: of the layers in
    chosen[k] where known, else (racing) of as many layers as it will re-measure, at the average layer's
    cost."""
    total = _Work()
    average = sum(n_layer - il for il in layers) / max(len(layers), 1)
    for k, (_, t) in enumerate(samples):
        total.add(len(t), n_layer)
        if k >= n_loss:
            continue
        tail = min(loss_tokens, len(t) - 1)
        if k < len(chosen):
            depths = [n_layer - il for il in chosen[k]]
        elif not race:
            depths = [n_layer - il for il in layers]
        else:  # not chosen yet
            depths = [average] * _n_running(k, len(layers))
        for depth in depths:
            total.add(tail, depth)
        if type_tokens and k < n_typed:  # the f16 and the q8_0 runs, then each option of each layer from it up
            total.add(type_tokens, 2 * n_layer)
            for il in layers:
                total.add(type_tokens * (len(TYPE_OPTIONS) + 1), n_layer - il)
    return total


def _trim_losses(llm, tail, layers, n_sink: int, n_window: int, meter, probe: dict) -> Tuple[List[float], dict]:
    """For each layer: mean next-token loss of `tail` (after the context llm holds, every layer full) with
    only that layer trimmed to sinks + window, minus the loss with none trimmed; and the probe's scores of
    the untrimmed tail.

    Trimming layer il changes nothing below it: the residual stream entering il is the untrimmed run's, so
    each what-if starts there, from the stream the untrimmed run kept (the same numbers as computing every
    layer, in about half the time). The highest and the lowest layer go first: their times tell the meter
    what a layer and what the rest (the vocabulary projection) cost."""
    n_layer = llm.hparams["n_layer"]
    with llm._use():
        base, streams = lab.what_if_nll(llm, tail, capture=True, probe=probe)
        scores = lab.probe_scores(llm)
    base = float(base.mean())
    meter.add(len(tail), n_layer)
    # NaN for layers that cannot be lazy (the probe, too, reports NaN for them): never selected.
    out = [float("nan")] * n_layer
    order = sorted(layers, reverse=True)
    timed = []  # (layer, seconds) of the first two what-ifs
    for il in order[:1] + order[1:][-1:] + order[1:-1]:  # each layer once, the top and the bottom first
        t0 = time.perf_counter()
        out[il] = float(_what_if(llm, tail, il, streams, n_sink, n_window).mean()) - base
        timed.append((il, time.perf_counter() - t0))
        if len(timed) == 2:
            meter.calibrate(len(tail), n_layer, *timed)
        meter.add(len(tail), n_layer - il)
    llm.set_masked_layers([])
    return out, scores


def _what_if(llm, tail, il: int, streams, n_sink: int, n_window: int) -> np.ndarray:
    """Per-token next-token losses of `tail` (after the context llm holds) with only layer il trimmed to sinks +
    window, computed from layer il up, from the stream the untrimmed run captured entering it (streams[il]).
    Leaves layer il masked: the caller unmasks (set_masked_layers([])) when its what-ifs are done."""
    llm.set_masked_layers([il], n_sink=n_sink, n_window=n_window)
    with llm._use():
        return lab.what_if_nll(llm, tail, first_layer=il, hidden=streams[il])


def _type_klds(llm, head, layers, n_sink: int, n_window: int, meter) -> dict:
    """KL divergence from the f16 model's next-token distributions over `head` (after the context llm
    holds, every layer full and f16) of the cache whose lazy-able layers hold TYPE_BASE ("base"), and of that
    cache with one layer changed (each of TYPE_OPTIONS, with the f16 residual quantized full layers keep, and
    "lazy": trimmed to sinks + window), per layer (NaN for layers that cannot be lazy). Each what-if starts at
    its layer, from the stream the base run kept. Leaves every layer as it was."""
    n_layer = llm.hparams["n_layer"]
    reference = log_softmax(lab.what_if_nll(llm, head, logits=True).astype(np.float64))
    meter.add(len(head), n_layer)
    base_types = {il: TYPE_BASE for il in layers}
    lab.set_what_if_types(llm, base_types)
    try:
        base, streams = lab.what_if_nll(llm, head, capture=True, logits=True)
        meter.add(len(head), n_layer)
        out = {"base": _kld(reference, base)}
        options = [*TYPE_OPTIONS, "lazy"]
        for o in options:
            out[_option_name(o)] = [float("nan")] * n_layer
        for il in layers:
            for o in options:
                lazy = o == "lazy"
                # lazy: the layer trimmed to sinks + window in f16 (a ring's quantization, with its f16
                # residual, is not measured: the "loss" criterion does the same)
                lab.set_what_if_types(llm, {**{i: t for i, t in base_types.items() if not (lazy and i == il)},
                                            **({} if lazy else {il: o})})
                if lazy:
                    llm.set_masked_layers([il], n_sink=n_sink, n_window=n_window)
                logits = lab.what_if_nll(llm, head, first_layer=il, hidden=streams[il], logits=True)
                if lazy:
                    llm.set_masked_layers([])
                out[_option_name(o)][il] = _kld(reference, logits)
                meter.add(len(head), n_layer - il)
    finally:
        llm.set_masked_layers([])
        lab.set_what_if_types(llm, {})
    return out


def _option_name(option) -> str:
    """'lazy', 'q4_0' (K and V) or 'q8_0/q4_0', as kv_types.py writes a pair."""
    return option if isinstance(option, str) else option[0] if option[0] == option[1] else "/".join(option)


def _kld(reference: np.ndarray, logits: np.ndarray) -> float:
    """Mean over rows of KL(reference || softmax(logits)); reference: log-probabilities (float64)."""
    other = log_softmax(logits.astype(np.float64))
    return float((np.exp(reference) * (reference - other)).sum(axis=-1).mean())


class _Work:
    """Evaluation work as tokens times the layers they go through, and the tokens that go through the
    vocabulary projection (each evaluated token does); in seconds once the projection's cost is known in
    layers (_Progress.calibrate)."""

    def __init__(self):
        self.tokens, self.token_layers = 0, 0

    def add(self, n_tokens: int, n_layers: int) -> None:
        self.tokens += n_tokens
        self.token_layers += n_tokens * n_layers

    def units(self, head: float) -> float:
        """In token-layers, the projection counted as `head` layers."""
        return self.token_layers + head * self.tokens


class _Progress:
    """A progress bar over the profile's work (_Work), with the time left; and the total time, printed once
    it can be told: after the first two what-ifs, which measure what a layer and what the vocabulary
    projection cost (calibrate); without them, after the first evaluation."""

    def __init__(self, total: _Work, on: bool, calibrates: bool):
        self.total, self.so_far, self.on, self.calibrates = total, _Work(), on, calibrates
        self.t0 = time.perf_counter()
        self.head = 0.0       # the projection's cost in layers, once calibrated
        self.per_unit = None  # seconds per token-layer, once calibrated
        self.estimated = self.drawn = False

    def calibrate(self, n_tokens: int, n_layer: int, a: Tuple[int, float], b: Tuple[int, float]) -> None:
        """What-ifs of n_tokens from layers a[0] and b[0] took a[1] and b[1] seconds: with t = k * n_tokens *
        (layers from il up + head), the two solve for k and head. (Once: the first profiled sample's.)"""
        (il_a, t_a), (il_b, t_b) = sorted([a, b])
        if self.per_unit is not None or il_a == il_b or t_a <= t_b:
            return
        self.per_unit = (t_a - t_b) / (n_tokens * (il_b - il_a))
        self.head = max(0.0, t_b / (self.per_unit * n_tokens) - (n_layer - il_b))

    def add(self, n_tokens: int, n_layers: int) -> None:
        self.so_far.add(n_tokens, n_layers)
        if not self.on:
            return
        elapsed = time.perf_counter() - self.t0
        total, done = self.total.units(self.head), self.so_far.units(self.head)
        if self.per_unit is not None:  # at the speed of the scored tails, not of the shallower prefix
            left = (total - done) * self.per_unit
        else:
            left = elapsed * (total - done) / max(done, 1)
        if not self.estimated and (self.per_unit is not None or not self.calibrates):
            self.estimated = True
            print(f"{chr(10) if self.drawn else ''}profiling {self.total.tokens:,} tokens of evaluation: about "
                  f"{elapsed + left:.0f} s at this machine's speed", file=sys.stderr, flush=True)
        width = 30
        filled = int(width * done // max(total, 1))
        print(f"\rprofiling [{'#' * filled}{'.' * (width - filled)}] {int(100 * done // max(total, 1))}%, "
              f"{elapsed:.0f} s, ~{left:.0f} s left", end="", file=sys.stderr, flush=True)
        self.drawn = True

    def done(self) -> None:
        if self.on:
            print(file=sys.stderr)
