"""Batched decode in process, as llama.cpp's llama-batched-bench measures it: S sequences each prefilled to
depth D, then N tokens decoded for all of them together (one token per sequence per step); aggregate
tok/s, against one sequence at the same depth. No HTTP: this is the engine's share of workload B of
bench_serve.py, and the figure to put beside llama-batched-bench's (run it right before or after: `llama-batched-bench
-npp 4000 -ntg 64 -npl 1,4 -fa on -t 2 -no-kvu`, one KV stream per sequence).

    python benchmarks/bench_batched.py --depth 4000 --seqs 1 4 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from py_simkv import Llama, default_model_path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu import corpus_text  # noqa: E402

LAZY = list(range(15, 30))
# The KV settings each --configs name stands for. "dynamic": each prompt's probe picks its sequence's lazy
# layers (the family threshold), which keep that sequence's sinks + window in the f16 pool.
CONFIGS = {"no lazy": {}, "half lazy": dict(lazy_layers=LAZY, n_window=1024),
           "dynamic": dict(lazy_mode="dynamic", n_window=1024)}


def run(path, cfg, n_seq, depth, n_gen, repeats, threads):
    kw = CONFIGS[cfg]
    llm = Llama(path, n_ctx=n_seq * (depth + n_gen + 256), n_seq_max=n_seq, n_threads=threads, **kw)
    seqs = llm.sequences
    toks = llm.tokenize(corpus_text().encode(), add_bos=False)
    prompts = [toks[i * depth:(i + 1) * depth] for i in range(n_seq)]
    t0 = time.perf_counter()
    for s, p in enumerate(prompts):  # one after another, as requests arrive
        seqs.decode({s: p})
    prefill = n_seq * depth / (time.perf_counter() - t0)
    rates, lazy = [], [len(seqs.kv_cache_stats()["sequences"][s]["lazy_layers"]) for s in range(n_seq)]
    for _ in range(repeats):
        for s in range(n_seq):
            # A sequence lazy in a pool (dynamic mode) keeps only the window of its latest query, so it cannot
            # rewind 64 tokens: it goes on from where it is (depth + n_gen per repeat).
            seqs.truncate(s, depth)
        nxt = {s: [int(seqs.last_logits(s).argmax()) if seqs.last_logits(s) is not None else 0] for s in range(n_seq)}
        t0 = time.perf_counter()
        for _ in range(n_gen):
            out = seqs.decode(nxt)
            nxt = {s: [int(lg.argmax())] for s, lg in out.items()}
        rates.append(n_seq * n_gen / (time.perf_counter() - t0))
    llm.close()
    return prefill, statistics.median(rates), lazy


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--depth", type=int, default=4000)
    ap.add_argument("--seqs", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=["no lazy", "half lazy"], choices=list(CONFIGS))
    args = ap.parse_args()
    path = args.model or default_model_path()
    rows = []
    for cfg in args.configs:
        for n_seq in args.seqs:
            prefill, rate, lazy = run(path, cfg, n_seq, args.depth, args.gen, args.repeats, args.threads)
            rows.append((cfg, n_seq, prefill, rate))
            print(f"{cfg}, {n_seq} seq: prefill {prefill:.1f} tok/s, decode {rate:.1f} tok/s, lazy layers per "
                  f"sequence {lazy}", flush=True)
    print(f"\n| KV | sequences | decode tok/s (aggregate, median of {args.repeats}) | vs 1 sequence | prefill tok/s |")
    print("|---|---|---|---|---|")
    one = {cfg: rate for cfg, n, _, rate in rows if n == 1}
    for cfg, n_seq, prefill, rate in rows:
        ratio = f"{rate / one[cfg]:.2f}x" if cfg in one else ""
        print(f"| {cfg} | {n_seq} | {rate:.1f} | {ratio} | {prefill:.0f} |")


if __name__ == "__main__":
    main()
