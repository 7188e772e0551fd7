"""Making a lazy-layer profile: run the model over calibration text with every layer full and measure,
per layer, the criteria lazy_profile.py describes ("mass" and "change" by the native probe, "loss" by
trimming one layer at a time over a shared full prefix).
"""
from __future__ import annotations

import sys
import time
from importlib import resources
from typing import Iterable, List, Optional, Sequence, Tuple

from .checks import check_int
from .engine_config import DEFAULTS
from .lazy_profile import LazyProfile
from .llama import Llama
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
# prefill window of the paper scaled to the sample), three samples scored by loss (one per kind of text).
PROFILE_N_CTX, PROFILE_N_WINDOW, PROFILE_SAMPLES, PROFILE_LOSS_SAMPLES = 2048, 256, 8, 3


def profile_model(model_path: str, texts: Optional[Iterable] = None, n_ctx: int = PROFILE_N_CTX,
                  n_sink: int = DEFAULTS.n_sink, n_window: int = PROFILE_N_WINDOW, w_last: int = DEFAULTS.w_last,
                  max_samples: int = PROFILE_SAMPLES, loss_samples: int = PROFILE_LOSS_SAMPLES,
                  n_threads: Optional[int] = None, progress: bool = True) -> LazyProfile:
    """Probe every layer (all full) on calibration samples of n_ctx tokens; return their scores.

    texts: strings or (source, text) pairs; default: the calibration set shipped with simkv.
    loss_samples: how many of the samples (the first ones: samples alternate between the texts, so one of
    each kind) also measure the "loss" criterion, n_layer + 1 half-sample evaluations each; 0 = none."""
    check_int("n_ctx", n_ctx, 2)
    check_int("w_last", w_last, 1)
    check_int("loss_samples", loss_samples, 0)
    if w_last > n_ctx:
        raise ValueError(f"w_last ({w_last}) must not exceed n_ctx ({n_ctx})")
    if check_int("n_window", n_window, 1) >= n_ctx:
        raise ValueError(f"n_window ({n_window}) must be smaller than n_ctx ({n_ctx}): a window covering the whole "
                         "sample trims nothing, and every layer would look lazy")
    pairs = default_calibration_texts() if texts is None else [
        t if isinstance(t, tuple) else (f"text{i}", t) for i, t in enumerate(texts)]
    if not pairs or not all(isinstance(t, str) and t for _, t in pairs):
        raise ValueError("calibration texts must be non-empty strings")
    llm = Llama(model_path, n_ctx=n_ctx, n_threads=n_threads)
    samples = _samples(llm, pairs, n_ctx, max_samples)
    n_layer = len(layers_that_can_be_lazy(llm.hparams))
    n_loss = min(loss_samples, len(samples))
    steps = len(samples) + n_loss * n_layer
    t0 = time.perf_counter()
    results = []
    for k, (source, toks) in enumerate(samples):
        done = k + min(k, n_loss) * n_layer
        if progress:
            _progress(done, steps, t0)
        llm.reset()
        scores = llm.eval(toks, probe={"n_probe": min(w_last, len(toks)), "n_sink": n_sink, "n_window": n_window})
        result = {"source": source, "n_tokens": len(toks), "mass": scores["mass"].tolist(),
                  "change": scores["change"].tolist()}
        if k < n_loss:
            tick = (lambda j: _progress(done + 2 + j, steps, t0)) if progress else (lambda j: None)
            result["loss"] = _trim_losses(llm, toks, n_sink, n_window, tick)
        results.append(result)
    if progress:
        _progress(steps, steps, t0)
        print(file=sys.stderr)
    return LazyProfile(model=llm.model_identity(),
                       params={"n_ctx": n_ctx, "n_sink": n_sink, "n_window": n_window, "w_last": w_last},
                       samples=results)


def _trim_losses(llm, toks, n_sink: int, n_window: int, tick) -> List[float]:
    """For each layer: mean next-token loss on toks[half:] with only that layer trimmed to sinks + window,
    minus the loss with none trimmed, after toks[:half] evaluated with every layer full."""
    half = len(toks) // 2
    llm.reset()
    llm.eval(toks[:half])
    base = float(llm.nll(toks[half:], keep=False).mean())
    # NaN for layers that cannot be lazy (the probe, too, reports NaN for them): never selected.
    out = [float("nan")] * llm.hparams["n_layer"]
    for j, il in enumerate(layers_that_can_be_lazy(llm.hparams)):
        llm.set_masked_layers([il], n_sink=n_sink, n_window=n_window)
        out[il] = float(llm.nll(toks[half:], keep=False).mean()) - base
        tick(j)
    llm.set_masked_layers([])
    return out


def _progress(done: int, total: int, t0: float) -> None:
    width = 30
    filled = width * done // max(total, 1)
    print(f"\rprofiling [{'#' * filled}{'.' * (width - filled)}] {done}/{total} evaluations, "
          f"{time.perf_counter() - t0:.0f} s", end="", file=sys.stderr, flush=True)
