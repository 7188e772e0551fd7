"""One layer's attention alone on the CPU, per KV cache type and depth: simkv's kernels against ggml's flash
attention over f16 cells (the anchor) and over the same quantized cells (what llama.cpp runs).

Kernels (native/lab_attention.h, through `_native.lab.attention`):
  ggml         ggml's flash attention over the cells as stored (f16: the anchor; q8_0/q4_0: llama.cpp's path)
  simkv        the decode kernel (native/attention_quantized.h): few queries, quantized cells read in place
  dequantized  the cells dequantized to f32 once, then ggml's flash attention (simkv's path for many queries)

Shapes default to SmolLM2-135M's layer (head size 64, 9 query heads over 3 KV heads); every cell is visible.
Rounds interleave the kernels (each round in another order); each call times `--repeats` computes on a
live thread pool after one warm-up; the table gives medians over rounds and calls, and the ratio of the f16
anchor's time to each (> 1: faster than ggml over f16). For decode it also gives the K+V bytes read per
second.

    python benchmarks/bench_attention.py                            # decode and a 512-query prefill
    python benchmarks/bench_attention.py --queries 1 --depths 512 2048 6144 16384 32768
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
from gguf import GGMLQuantizationType as GGML
from gguf.quants import quantize

from py_simkv import _native

KIND = {"q8_0": GGML.Q8_0, "q4_0": GGML.Q4_0}


def cells(x: np.ndarray, kind: str) -> bytes:
    return x.astype(np.float16).tobytes() if kind == "f16" else quantize(x, KIND[kind]).tobytes()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[512, 2048, 6144, 16384, 32768])
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 512])
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--n-head", type=int, default=9)
    ap.add_argument("--n-head-kv", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5, help="timed computes per call (decode; prefill takes 1)")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    d, n_head, n_head_kv = a.head_dim, a.n_head, a.n_head_kv
    pairs = [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "q4_0")]
    print(f"head size {d}, {n_head} query heads over {n_head_kv} KV heads, {a.threads} threads, "
          f"{a.rounds} rounds (medians)", flush=True)
    rows = []
    for n_q in a.queries:
        for depth in a.depths:
            q = rng.standard_normal((n_q, n_head, d)).astype(np.float32)
            k = (rng.standard_normal((depth, n_head_kv * d)) * 2).astype(np.float32)
            v = rng.standard_normal((depth, n_head_kv * d)).astype(np.float32)
            mask = np.zeros((n_q, depth), np.float32)
            runs = [("f16", "f16", "ggml")]
            for kt, vt in pairs[1:]:
                runs += [(kt, vt, "ggml"), (kt, vt, "simkv" if n_q <= 63 else "dequantized")]
            data = {}
            for kt, vt, _ in runs:
                data[kt, vt] = (cells(k, kt), cells(v, vt))
            repeats = a.repeats if n_q <= 63 else 1
            times = {r: [] for r in runs}
            for rnd in range(a.rounds):
                for kt, vt, kernel in runs[rnd % len(runs):] + runs[:rnd % len(runs)]:
                    kb, vb = data[kt, vt]
                    _, sec = _native.lab.attention(q, kb, vb, kt, vt, n_head_kv, mask, 1 / np.sqrt(d), kernel,
                                                   a.threads, repeats + 1)
                    times[kt, vt, kernel] += sec[1:]  # the first compute wakes the thread pool
            anchor = statistics.median(times["f16", "f16", "ggml"])
            for (kt, vt, kernel), t in times.items():
                med = statistics.median(t)
                kv_bytes = len(data[kt, vt][0]) + len(data[kt, vt][1])
                rows.append((n_q, depth, f"{kt}/{vt}", kernel, med * 1e3, anchor / med, kv_bytes / med / 1e9))
                print(f"  queries {n_q:>4} depth {depth:>6} {kt:>4}/{vt:<4} {kernel:<11} {med * 1e3:9.3f} ms  "
                      f"x{anchor / med:5.2f} vs f16  {kv_bytes / med / 1e9:6.2f} GB/s", flush=True)
    print()
    print("| queries | depth | K/V types | kernel | ms | speed vs ggml f16 | K+V read GB/s |")
    print("|---|---|---|---|---|---|---|")
    for n_q, depth, types, kernel, ms, ratio, gbs in rows:
        print(f"| {n_q} | {depth} | {types} | {kernel} | {ms:.3f} | {ratio:.2f} | {gbs:.2f} |")


if __name__ == "__main__":
    main()
