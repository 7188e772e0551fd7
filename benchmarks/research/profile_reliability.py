"""How reproducible the profile's loss ranking is, i.e. what any cheaper profile can hope to agree with
(a cheaper profile was to rank layers with a Spearman of at least 0.9 against the full one).

The profile's `loss` of a layer is a mean over scored tokens of (nll with the layer trimmed - nll with none
trimmed). This script keeps those per-token differences instead of their means, for 2 x N samples (the
profile's settings: n_ctx 2048, the second half scored, window 256), and asks:
- split-half: rank the layers on one half of each sample's scored tokens (even positions, or the first
  half) and on the other half; how well do the two rankings agree?
- subsets: rank the layers on a random fraction f of the scored tokens (the exact per-token values, as if
  a cheaper method computed them perfectly); how well does that agree with the ranking on all of them?
- retest: the same profile on the next N samples of the calibration text (same method, same cost) against
  the first N.
- racing: what `simkv profile`'s racing (profiler.py: _n_running, _still_running) would measure and choose on
  the first N samples and on the next N, from the kept per-token values (exact: a what-if's losses do not
  depend on which others ran), against measuring every layer: its what-if work, Spearman, and the layers it
  shares with every-layer's default (budget) set and 25% / 50% / 75% sets. --keep tries other fractions.
- retest sets: the sets every layer measured on the next N samples, and on all 2N, chooses, against the
  first N's (eval_quality.py measures what a set costs held out).

    python benchmarks/research/profile_reliability.py [--samples 3] [--save deltas.npz | --load deltas.npz]
                                             [--keep 0.55 0.4] [--head-layers 2]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from py_simkv import default_model_path
from py_simkv import lab
from py_simkv.engine_config import DEFAULTS
from py_simkv.lazy_profile import LazyProfile
from py_simkv.llama import Llama
from py_simkv.memory import layers_that_can_be_lazy
from py_simkv.profiler import (PROFILE_LOSS_TOKENS, PROFILE_N_CTX, PROFILE_N_WINDOW, PROFILE_RACE_KEEP,
                               _n_running, _samples, _still_running, _what_if, default_calibration_texts)


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def per_token_deltas(path: str, n_samples: int, threads: int):
    """[sample][layer] -> per-token loss differences (tail tokens), and the layers measured."""
    llm = Llama(path, n_ctx=PROFILE_N_CTX, n_threads=threads, verbose=False)
    layers = layers_that_can_be_lazy(llm.hparams)
    out = []
    for source, toks in _samples(llm, default_calibration_texts(), PROFILE_N_CTX, n_samples):
        t0 = time.perf_counter()
        tail_n = min(PROFILE_LOSS_TOKENS, len(toks) - 1)
        llm.reset()
        llm.eval(toks[:len(toks) - tail_n])
        tail = toks[len(toks) - tail_n:]
        with llm._use():
            base, streams = lab.what_if_nll(llm, tail, capture=True)
        rows = [_what_if(llm, tail, il, streams, DEFAULTS.n_sink, PROFILE_N_WINDOW) - base for il in layers]
        llm.set_masked_layers([])
        out.append(np.array(rows))
        print(f"{source}: {time.perf_counter() - t0:.0f} s", flush=True)
    return np.array(out), np.array(layers)  # [samples, layers, tokens]


def ranking(d: np.ndarray, cols=None) -> np.ndarray:
    """The profile's criterion: per sample the mean over (these) tokens, then the mean over samples."""
    return (d if cols is None else d[:, :, cols]).mean(axis=2).mean(axis=0)


def raced(d: np.ndarray, layers: np.ndarray, n_layer: int, keep, head: float):
    """Racing on these samples' per-token deltas [samples, layers, tokens]: the per-sample losses it would
    record (None where a sample does not re-measure a layer) and its what-if work, each what-if counted as
    the layers it computes plus `head` for the vocabulary projection."""
    running, rows, work = [int(il) for il in layers], [], 0.0
    where = {int(il): j for j, il in enumerate(layers)}
    for k in range(d.shape[0]):
        row = [None] * n_layer
        for il in running:
            row[il] = float(d[k, where[il]].mean())
            work += (n_layer - il + head) * d.shape[2]
        rows.append(row)
        if k + 1 < d.shape[0]:
            running = _still_running(rows, running, _n_running(k + 1, len(layers), keep))
    return rows, work


def loss_profile(rows, n_layer: int) -> LazyProfile:
    """A profile holding only per-sample losses (rows: raced's), to choose sets from."""
    return LazyProfile(model={"n_layer": n_layer}, params={}, samples=[{"loss": r} for r in rows])


def shared(ref: dict, got: dict) -> str:
    """Table cells: how many of each of ref's sets got's same set shares."""
    return " | ".join(f"{len(set(ref[k]) & set(got[k]))} of {len(ref[k])}" for k in ref)


def chosen_sets(prof: LazyProfile) -> dict:
    """The sets the profile chooses: the default (budget) set and by ratio."""
    return {"default": prof.select(), **{f"{r:.0%}": prof.select(ratio=r) for r in (0.25, 0.5, 0.75)}}


def racing_table(d: np.ndarray, layers: np.ndarray, n: int, keep, head: float) -> None:
    n_layer = int(layers.max()) + 1
    print(f"\nracing (keep {tuple(keep)}) against every layer measured; what-if work with the vocabulary "
          f"projection as {head} layers\n")
    print("| samples | what-if work | Spearman | default set | 25% | 50% | 75% | 50%: not chosen / chosen instead |")
    print("|---|---|---|---|---|---|---|---|")
    for name, part in (("first", d[:n]), ("next", d[n:2 * n])):
        if not len(part):
            continue
        (every, every_work), (rows, work) = (raced(part, layers, n_layer, k, head) for k in ([1.0], keep))
        prof_ref, prof_got = loss_profile(every, n_layer), loss_profile(rows, n_layer)
        ref, got = chosen_sets(prof_ref), chosen_sets(prof_got)
        mean_ref, mean_got = prof_ref.mean(), prof_got.mean()
        lost, added = sorted(set(ref["50%"]) - set(got["50%"])), sorted(set(got["50%"]) - set(ref["50%"]))
        print(f"| {name} {len(part)} | {work / every_work:.2f} | {spearman(mean_got[layers], mean_ref[layers]):.3f} | "
              f"{shared(ref, got)} | {lost} / {added} |")


def retest_sets(d: np.ndarray, layers: np.ndarray, n: int) -> None:
    """The sets chosen with every layer measured on the next n samples, and on all 2n, against the first n's:
    how far a profile made the shipped way moves on other text of the same kinds."""
    n_layer = int(layers.max()) + 1
    profiles = {name: loss_profile(raced(part, layers, n_layer, [1.0], 0.0)[0], n_layer)
                for name, part in (("first", d[:n]), ("next", d[n:2 * n]), ("all", d[:2 * n]))}
    ref = chosen_sets(profiles["first"])
    print(f"\nevery layer measured, against the first {n} samples' sets (layers shared; 50%: the layers each set "
          "chooses, to measure held out with eval_quality.py)\n")
    print("| samples | Spearman | default set | 25% | 50% | 75% | 50% set |")
    print("|---|---|---|---|---|---|---|")
    for name in ("first", "next", "all"):
        got = chosen_sets(profiles[name])
        rho = spearman(profiles[name].mean()[layers], profiles["first"].mean()[layers])
        print(f"| {name} {n if name != 'all' else 2 * n} | {rho:.3f} | {shared(ref, got)} | {sorted(got['50%'])} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=3, help="samples per profile (the retest profiles as many more)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draws", type=int, default=200, help="random subsets per fraction")
    ap.add_argument("--save", default=None)
    ap.add_argument("--load", default=None)
    ap.add_argument("--keep", type=float, nargs="+", default=list(PROFILE_RACE_KEEP),
                    help="racing's keep fractions (default: simkv profile's)")
    ap.add_argument("--head-layers", type=float, default=2.0,
                    help="the vocabulary projection's cost in layers, for the work column (SmolLM2: about 2)")
    args = ap.parse_args()
    if args.load:
        z = np.load(args.load)
        d, layers = z["deltas"], z["layers"]
    else:
        d, layers = per_token_deltas(default_model_path(), 2 * args.samples, args.threads)
        if args.save:
            np.savez_compressed(args.save, deltas=d, layers=layers)
    n = args.samples
    first, retest = d[:n], d[n:]
    ref = ranking(first)
    t = first.shape[2]
    rng = np.random.default_rng(0)
    print(f"\n{len(layers)} layers, {n} samples x {t} scored tokens; reference: the ranking on all of them\n")
    print("| ranking from | Spearman vs the reference | vs each other |")
    print("|---|---|---|")
    halves = {"even / odd tokens": (np.arange(0, t, 2), np.arange(1, t, 2)),
              "first / second half of the tail": (np.arange(t // 2), np.arange(t // 2, t))}
    for name, (a, b) in halves.items():
        ra, rb = ranking(first, a), ranking(first, b)
        print(f"| {name} | {spearman(ra, ref):.3f} / {spearman(rb, ref):.3f} | {spearman(ra, rb):.3f} |")
    for f in (0.25, 0.5, 0.6, 0.75, 0.9):
        rhos = [spearman(ranking(first, np.sort(rng.choice(t, int(f * t), replace=False))), ref)
                for _ in range(args.draws)]
        lo, med = np.percentile(rhos, [10, 50])
        print(f"| a random {f:.0%} of the tokens ({args.draws} draws) | median {med:.3f}, 10th percentile {lo:.3f} | |")
    if len(retest):
        print(f"| the next {len(retest)} samples (a retest: same method, same cost, other text) | "
              f"{spearman(ranking(retest), ref):.3f} | |")
        for k in range(n):
            others = np.delete(np.arange(n), k)
            rho = spearman(ranking(first[[k]]), ranking(first[others]))
            print(f"| sample {k} alone vs the other {n - 1} | {rho:.3f} | |")
    racing_table(d, layers, n, args.keep, args.head_layers)
    if len(retest) >= n:
        retest_sets(d, layers, n)


if __name__ == "__main__":
    main()
