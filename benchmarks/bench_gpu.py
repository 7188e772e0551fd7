"""GPU benchmark: simkv vs llama-cpp-python (CUDA) on the same card and GGUF, in the same run, one table.

Default model: a Llama-3-8B-shaped Q4_0 GGUF with random weights (models/synthetic.py; speed does not
depend on weight values), every layer offloaded (n_gpu_layers=-1), flash attention. At each depth (the
context filled once), `--runs` times, configurations taking turns:
  pp = a 512-token chunk evaluated (then rewound), tg = 64 single-token evals (then rewound);
medians in tok/s, ratios to llama-cpp-python with f16 KV and with q4_0 KV. KV MiB: the cache in VRAM
(simkv: kv_cache_stats(); llama.cpp: its allocation rule, n_ctx cells per layer).
Lazy = the deeper half of the layers, q4_0 rings of window 1024 (+4 sinks).

    python benchmarks/bench_gpu.py                               # writes /tmp/simkv-llama3-8b-q4_0.gguf once
    python benchmarks/bench_gpu.py --model M.gguf --depths 0 8192 32768 131072
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from bench_cpu import PP_CHUNK, TG_STEPS, Ours, Reference, corpus_text, measure_all
from py_simkv import Llama, gpu_devices

HERE = os.path.dirname(os.path.abspath(__file__))


def synthetic_model(path: str) -> str:
    if not os.path.exists(path):
        spec = importlib.util.spec_from_file_location("synthetic", os.path.join(HERE, "..", "models", "synthetic.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        print(f"writing {path} (Llama-3-8B shape, random Q4_0) ...", file=sys.stderr, flush=True)
        mod.write_model(path + ".tmp", "llama3-8b", weight_type="q4_0", n_ctx_train=131072, rope_freq_base=500000.0)
        os.replace(path + ".tmp", path)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF (default: a synthetic Llama-3-8B-shaped Q4_0)")
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 8192, 32768])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--n-window", type=int, default=1024)
    ap.add_argument("--configs", nargs="+", default=None, help="subset of config labels to run")
    a = ap.parse_args()
    if not gpu_devices():
        raise SystemExit("no GPU in this ggml build: install llama-cpp-python with CMAKE_ARGS=\"-DGGML_CUDA=on\"")
    path = a.model or synthetic_model("/tmp/simkv-llama3-8b-q4_0.gguf")
    n_ctx = max(a.depths) + PP_CHUNK + TG_STEPS + 1

    probe = Llama(path, n_ctx=16, n_threads=1)
    n_layer = probe.hparams["n_layer"]
    tokens = probe.tokenize(corpus_text().encode())
    need = max(a.depths) + PP_CHUNK + 1
    tokens = tokens * (need // len(tokens) + 1)
    half = list(range(n_layer // 2, n_layer))
    del probe

    gpu = dict(n_gpu_layers=-1)
    lazy = dict(gpu, lazy_layers=half, n_window=a.n_window, lazy_type="q4_0")
    configs = [
        ("llama-cpp-python f16 KV", lambda label: Reference(path, label, n_ctx, a.threads, "f16", **gpu)),
        ("llama-cpp-python q4_0 KV", lambda label: Reference(path, label, n_ctx, a.threads, "q4_0", **gpu)),
        ("simkv no lazy (f16)", lambda label: Ours(path, label, n_ctx, a.threads, **gpu)),
        ("simkv 50% lazy, f16 + q4_0 ring", lambda label: Ours(path, label, n_ctx, a.threads, **lazy)),
        ("simkv 50% lazy, q8_0 + q4_0 ring",
         lambda label: Ours(path, label, n_ctx, a.threads, type_k="q8_0", type_v="q8_0", **lazy)),
        ("simkv 50% lazy, q4_0 + q4_0 ring",
         lambda label: Ours(path, label, n_ctx, a.threads, type_k="q4_0", type_v="q4_0", **lazy)),
    ]
    if a.configs:
        configs = [c for c in configs if c[0] in a.configs]
    print(f"model {path}\ndevice {gpu_devices()[0]}\nn_ctx {n_ctx}, runs {a.runs} (medians), pp = {PP_CHUNK}-token "
          f"chunk, tg = {TG_STEPS} tokens, lazy = layers {half[0]}..{half[-1]}, n_window {a.n_window}", flush=True)
    runners = [make(label) for label, make in configs]
    speeds = measure_all(runners, tokens, a.depths, a.runs)
    results = {r.label: (speeds[r.label], r.kv_bytes()) for r in runners}

    f16, q4 = results.get("llama-cpp-python f16 KV"), results.get("llama-cpp-python q4_0 KV")
    nan = float("nan")
    print()
    head = "| configuration | KV MiB | KV vs f16 |"
    for d in a.depths:
        head += f" pp@{d} | vs f16 | tg@{d} | vs f16 | vs q4_0 |"
    print(head)
    print("|" + "|".join("---" for _ in range(3 + 5 * len(a.depths))) + "|")
    for label, (res, kv) in results.items():
        row = f"| {label} | {kv / 2**20:.1f} | {f16[1] / kv if f16 else nan:.2f}x smaller |"
        for d in a.depths:
            pp, tg = res[d]
            row += (f" {pp:.0f} | {pp / f16[0][d][0] if f16 else nan:.2f} | {tg:.1f} | "
                    f"{tg / f16[0][d][1] if f16 else nan:.2f} | {tg / q4[0][d][1] if q4 else nan:.2f} |")
        print(row)


if __name__ == "__main__":
    main()
