"""Does choosing the lazy set jointly beat choosing it layer by layer?

Layer by layer (what simkv ships): rank the layers by the loss each costs when it alone is trimmed, take the
laziest. Jointly (greedy): grow the set one layer at a time, each time adding the layer whose addition gives
the set the smallest measured loss, trimming the whole set at once. Both on the profile's calibration samples
and settings (its first `loss_samples` samples, each scored on its last `loss_tokens` tokens after an
untrimmed prefix, as `simkv profile` does). To keep the greedy affordable, each step tries only the
`--candidates` remaining layers with the lowest single-layer loss.

Then both sets at `--ratio` are scored on held-out text at the settings the product ships (eval_quality.py's
perplexity: n_ctx 8192, the first half the prompt, window 1024, q4_0 rings with their f16 residual,
streaming prefill).

    python benchmarks/research/joint_selection.py --ratio 0.5 --candidates 4
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from py_simkv import Llama, LazyProfile, default_model_path
from py_simkv import lab
from py_simkv.lazy_profile import shipped_profile
from py_simkv.profiler import PROFILE_LOSS_TOKENS, _samples, default_calibration_texts

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/
from eval_quality import heldout_texts, perplexity  # noqa: E402


class Calibration:
    """The profile's loss samples, each held in a Llama after its untrimmed prefix, with the residual stream
    of its untrimmed tail: the loss of trimming any set of layers is one what-if per sample, computed from
    the set's lowest layer up (the layers below it compute what the untrimmed run computed)."""

    def __init__(self, path, prof: LazyProfile, n_threads: int):
        p = prof.params
        self.n_sink, self.n_window = p["n_sink"], p["n_window"]
        n_loss = sum("loss" in s for s in prof.samples)
        probe = Llama(path, n_ctx=16, n_threads=1)
        samples = _samples(probe, default_calibration_texts(), p["n_ctx"], n_loss)
        self.runs = []
        for _, toks in samples:
            # (profiles made before loss_tokens was recorded scored the default: a sample's second half)
            tail = min(p.get("loss_tokens", PROFILE_LOSS_TOKENS), len(toks) - 1)
            llm = Llama(path, n_ctx=p["n_ctx"], n_threads=n_threads)
            llm.eval(toks[: len(toks) - tail])
            with llm._use():
                base, streams = lab.what_if_nll(llm, toks[len(toks) - tail:], capture=True)
            self.runs.append((llm, toks[len(toks) - tail:], float(base.mean()), streams))

    def loss(self, layers) -> float:
        """Mean over the samples of the tail's loss increase with `layers` trimmed together."""
        first = min(layers)
        out = []
        for llm, tail, base, streams in self.runs:
            llm.set_masked_layers(sorted(layers), n_sink=self.n_sink, n_window=self.n_window)
            with llm._use():
                out.append(float(lab.what_if_nll(llm, tail, first_layer=first, hidden=streams[first]).mean()) - base)
            llm.set_masked_layers([])
        return float(np.mean(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--profile", default=None, help="default: the profile shipped for the model")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--candidates", type=int, default=4, help="layers tried per greedy step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=8192, help="held-out perplexity context")
    ap.add_argument("--n-window", type=int, default=1024, help="held-out perplexity window (the shipped one)")
    ap.add_argument("--skip-heldout", action="store_true")
    a = ap.parse_args()
    path = a.model or default_model_path()
    prof = LazyProfile.load(a.profile or shipped_profile(path))
    single = prof.mean("loss")
    layers = [il for il in range(len(single)) if not np.isnan(single[il])]
    n_pick = int(round(a.ratio * len(layers)))
    by_rank = prof.select(ratio=a.ratio, criterion="loss")

    t0 = time.perf_counter()
    cal = Calibration(path, prof, a.threads)
    check = min(layers, key=lambda il: single[il])
    print(f"calibration ready ({time.perf_counter() - t0:.0f} s); layer {check} alone: {cal.loss([check]):.5f} "
          f"nats here, {single[check]:.5f} in the profile", flush=True)
    rank_loss = cal.loss(by_rank)
    print(f"layer by layer, {len(by_rank)} layers {by_rank}: set loss {rank_loss:.5f} nats, summed single losses "
          f"{sum(max(single[il], 0) for il in by_rank):.5f}", flush=True)

    chosen, steps = [], []
    remaining = sorted(layers, key=lambda il: single[il])
    while len(chosen) < n_pick:
        tried = {c: cal.loss(chosen + [c]) for c in remaining[: a.candidates]}
        best = min(tried, key=tried.get)
        chosen.append(best)
        remaining.remove(best)
        steps.append((best, tried[best], sum(max(single[il], 0) for il in chosen)))
        print(f"  step {len(chosen):2d}: + layer {best:2d}  set loss {tried[best]:.5f}  (tried "
              f"{', '.join(f'{c}: {v:.5f}' for c, v in tried.items())})  {time.perf_counter() - t0:.0f} s", flush=True)
    joint = sorted(chosen)
    print(f"jointly, {len(joint)} layers {joint}: set loss {steps[-1][1]:.5f} nats "
          f"({time.perf_counter() - t0:.0f} s in all)", flush=True)
    for llm, *_ in cal.runs:
        llm.close()

    print("\n| set size | greedy adds | joint set loss (nats) | summed single losses |")
    print("|---|---|---|---|")
    for k, (il, loss, summed) in enumerate(steps, 1):
        print(f"| {k} | {il} | {loss:.5f} | {summed:.5f} |")
    if a.skip_heldout:
        return
    if joint == by_rank:
        print("\nthe two sets are the same: nothing to score on held-out text")
        return

    probe = Llama(path, n_ctx=16, n_threads=1)
    texts = [(name, probe.tokenize(text.encode(), add_bos=True)[: a.n_ctx]) for name, text in heldout_texts()]
    rows = []
    for label, lazy in (("full f16", []), ("layer by layer", by_rank), ("jointly (greedy)", joint)):
        llm = Llama(path, n_ctx=a.n_ctx, n_threads=a.threads, n_window=a.n_window, n_ubatch=512, n_batch=512,
                    lazy_layers=lazy)
        ppl = [perplexity(llm, toks) for _, toks in texts]
        llm.close()
        rows.append((label, lazy, ppl))
        print(f"  {label}: {' / '.join(f'{p:.3f}' for p in ppl)}", flush=True)
    full = rows[0][2]
    print("\n| selection | lazy layers | " + " | ".join(f"{n} ppl | vs full" for n, _ in texts) + " |")
    print("|---|---|" + "---|---|" * len(texts))
    for label, lazy, ppl in rows:
        cells = " | ".join(f"{p:.3f} | {100 * (p / f - 1):+.2f}%" for p, f in zip(ppl, full))
        print(f"| {label} | {len(lazy)}: {','.join(map(str, lazy))} | {cells} |")


if __name__ == "__main__":
    main()
