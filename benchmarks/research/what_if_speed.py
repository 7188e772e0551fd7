"""What one of `simkv profile`'s what-ifs costs: the first calibration sample's 1,024-token tail scored with
one layer trimmed, starting at that layer (profiler.py: _trim_losses). From the top layer it is one layer plus
the vocabulary projection and the per-token loss (native/graph_token_nll.cpp); from a lower one, more layers.
Medians of --reps; to compare two builds, run it under each (PYTHONPATH=<other install>) in turn, alternating.

    python benchmarks/research/what_if_speed.py [--layers 29 20] [--reps 3] [--label new]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from py_simkv import default_model_path
from py_simkv import lab
from py_simkv.engine_config import DEFAULTS
from py_simkv.llama import Llama
from py_simkv.profiler import (PROFILE_LOSS_TOKENS, PROFILE_N_CTX, PROFILE_N_WINDOW, _samples, _what_if,
                               default_calibration_texts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[29, 20])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    llm = Llama(default_model_path(), n_ctx=PROFILE_N_CTX, n_threads=args.threads, verbose=False)
    _, toks = _samples(llm, default_calibration_texts(), PROFILE_N_CTX, 1)[0]
    tail = toks[len(toks) - PROFILE_LOSS_TOKENS:]
    llm.eval(toks[:len(toks) - len(tail)])
    with llm._use():
        base, streams = lab.what_if_nll(llm, tail, capture=True)
    seconds, loss = {il: [] for il in args.layers}, {}
    for _ in range(args.reps):
        for il in args.layers:
            t0 = time.perf_counter()
            loss[il] = float(_what_if(llm, tail, il, streams, DEFAULTS.n_sink, PROFILE_N_WINDOW).mean() - base.mean())
            seconds[il].append(time.perf_counter() - t0)
    print(args.label, "  ".join(f"from layer {il}: {np.median(s):.3f} s (loss {loss[il]:+.9f})"
                                for il, s in seconds.items()))


if __name__ == "__main__":
    main()
