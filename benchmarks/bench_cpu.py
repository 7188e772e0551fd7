"""CPU benchmark: simkv vs llama-cpp-python on the same GGUF, in the same run, one table.

Every configuration is loaded side by side and filled to each depth once; at that depth we time
  pp = eval of a 512-token chunk (then rewound), and
  tg = 64 single-token evals (then rewound),
`--runs` times each (configurations taking turns within a run, each run starting one later), and report medians (tok/s) and the ratio to llama-cpp-python with f16 KV.
KV bytes: simkv's kv_cache_stats(); llama.cpp's from its allocation rule (n_ctx cells per layer,
every layer, K and V of type_k/type_v).

    python benchmarks/bench_cpu.py                       # SmolLM2-135M, depths 0, 2K, 7K
    python benchmarks/bench_cpu.py --depths 0 2048 --runs 5 --threads 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from py_simkv import Llama, default_model_path

# The llama-cpp-python baseline is shared with the tests (tests/llama_cpp_reference.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from llama_cpp_reference import reference_llama  # noqa: E402

PP_CHUNK = 512
TG_STEPS = 64


def corpus_text() -> str:
    """Real English text and code: documentation strings of the standard library."""
    import importlib
    names = ["argparse", "json", "collections", "logging", "textwrap", "unittest", "email", "http.client",
             "asyncio", "typing", "dataclasses", "functools", "itertools", "pathlib", "subprocess", "threading",
             "decimal", "fractions", "statistics", "random", "datetime", "calendar", "csv", "sqlite3", "zipfile",
             "tarfile", "shutil", "tempfile", "inspect", "ast", "dis", "pickle", "copy", "pprint", "re", "string",
             "difflib", "enum", "heapq", "bisect", "weakref", "contextlib", "abc", "io", "os", "sys"]
    parts = []
    for n in names:
        m = importlib.import_module(n)
        if m.__doc__:
            parts.append(m.__doc__)
        for attr in sorted(dir(m)):
            doc = getattr(getattr(m, attr, None), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 200:
                parts.append(doc)
    return "\n\n".join(parts)


class Ours:
    def __init__(self, path, label, n_ctx, threads, **kw):
        self.label = label
        self.llm = Llama(path, n_ctx=n_ctx, n_threads=threads, **kw)

    def eval(self, tokens):
        self.llm.eval(tokens)

    def n_tokens(self):
        return self.llm.n_tokens

    def rewind(self, n):
        if not self.llm._rewind(n):
            raise RuntimeError("rewind refused")

    def kv_bytes(self):
        return self.llm.kv_cache_stats()["total_bytes"]


class Reference:
    ROW = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}

    def __init__(self, path, label, n_ctx, threads, type_kv, **kw):
        import llama_cpp
        t = {"f16": llama_cpp.GGML_TYPE_F16, "q4_0": llama_cpp.GGML_TYPE_Q4_0, "q8_0": llama_cpp.GGML_TYPE_Q8_0}[type_kv]
        self.label = label
        self.llm = reference_llama(path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                                   n_threads_batch=threads, flash_attn=True, type_k=t, type_v=t, **kw)
        # llama.cpp's rule: every layer holds n_ctx cells (padded to 256) of K and V
        md = self.llm.metadata
        arch = md["general.architecture"]
        n_layer, n_embd = int(md[f"{arch}.block_count"]), int(md[f"{arch}.embedding_length"])
        n_head, n_head_kv = int(md[f"{arch}.attention.head_count"]), int(md[f"{arch}.attention.head_count_kv"])
        head = int(md.get(f"{arch}.attention.key_length", n_embd // n_head))
        cells = (n_ctx + 255) // 256 * 256
        self._kv = int(n_layer * 2 * cells * head * n_head_kv * self.ROW[type_kv])

    def eval(self, tokens):
        self.llm.eval(tokens)

    def n_tokens(self):
        return self.llm.n_tokens

    def rewind(self, n):
        self.llm.n_tokens = n  # llama-cpp-python drops cells >= n_tokens at the next eval

    def kv_bytes(self):
        return self._kv


def measure_all(runners, tokens, depths, runs):
    """Configurations take turns within each run, so drift in machine load hits them all alike; each run
    starts one configuration later, so each takes each place in the turn equally often (with `runs` a
    multiple of the configurations). In a fixed order the same configuration always came right after the
    same other one, and in-process A/Bs in a fixed order put the q4_0 ring 5% behind the f16 ring at depth,
    where rotating the order put them within 1%."""
    out = {r.label: {} for r in runners}
    for depth in depths:
        base = max(depth, 1)
        for r in runners:
            if r.n_tokens() < base:
                r.eval(tokens[r.n_tokens():base])
        samples = {r.label: ([], []) for r in runners}
        for run in range(runs):
            for r in runners[run % len(runners):] + runners[:run % len(runners)]:
                pp, tg = samples[r.label]
                chunk = tokens[base:base + PP_CHUNK]
                t0 = time.perf_counter()
                r.eval(chunk)
                pp.append(len(chunk) / (time.perf_counter() - t0))
                r.rewind(base)
                t0 = time.perf_counter()
                for i in range(TG_STEPS):
                    r.eval([tokens[base + i]])
                tg.append(TG_STEPS / (time.perf_counter() - t0))
                r.rewind(base)
        for r in runners:
            pp, tg = samples[r.label]
            out[r.label][depth] = (statistics.median(pp), statistics.median(tg))
            print(f"  {r.label:<34} depth {depth:>5}: pp {out[r.label][depth][0]:7.1f} tok/s  "
                  f"tg {out[r.label][depth][1]:6.1f} tok/s", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 2048, 7000])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-window", type=int, default=1024)
    ap.add_argument("--configs", nargs="+", default=None, help="subset of config labels to run")
    a = ap.parse_args()
    path = a.model or default_model_path()

    probe = Llama(path, n_ctx=16, n_threads=1)
    n_layer = probe.hparams["n_layer"]
    tokens = probe.tokenize(corpus_text().encode())
    need = max(a.depths) + PP_CHUNK + 1
    if len(tokens) < need:
        tokens = (tokens * (need // len(tokens) + 1))
    if need > a.n_ctx:
        raise SystemExit(f"--n-ctx {a.n_ctx} is too small for depth {max(a.depths)} + {PP_CHUNK}")
    half = list(range(n_layer // 2, n_layer))  # the deeper half (the paper finds lazy layers deep)
    del probe

    configs = [
        ("llama-cpp-python f16 KV", lambda: Reference(path, "llama-cpp-python f16 KV", a.n_ctx, a.threads, "f16")),
        ("llama-cpp-python q4_0 KV", lambda: Reference(path, "llama-cpp-python q4_0 KV", a.n_ctx, a.threads, "q4_0")),
        ("llama-cpp-python q8_0 KV", lambda: Reference(path, "llama-cpp-python q8_0 KV", a.n_ctx, a.threads, "q8_0")),
        ("simkv no lazy (f16)", lambda: Ours(path, "simkv no lazy (f16)", a.n_ctx, a.threads)),
        # quantized full layers (K and V rotated, as llama.cpp's): on the CPU read by simkv's own attention
        ("simkv no lazy (q8_0)", lambda: Ours(path, "simkv no lazy (q8_0)", a.n_ctx, a.threads, type_k="q8_0",
                                                type_v="q8_0")),
        ("simkv no lazy (q4_0)", lambda: Ours(path, "simkv no lazy (q4_0)", a.n_ctx, a.threads, type_k="q4_0",
                                                type_v="q4_0")),
        ("simkv half lazy (q4_0 ring)", lambda: Ours(path, "simkv half lazy (q4_0 ring)", a.n_ctx, a.threads,
                                                       lazy_layers=half, n_window=a.n_window, lazy_type="q4_0")),
        ("simkv half lazy (f16 ring)", lambda: Ours(path, "simkv half lazy (f16 ring)", a.n_ctx, a.threads,
                                                      lazy_layers=half, n_window=a.n_window, lazy_type="f16")),
        # the q4_0 ring without its f16 residual (lazy_residual=0): what reading the residual costs
        ("simkv half lazy (q4_0 ring, no residual)",
         lambda: Ours(path, "simkv half lazy (q4_0 ring, no residual)", a.n_ctx, a.threads, lazy_layers=half,
                      n_window=a.n_window, lazy_type="q4_0", lazy_residual=0)),
    ]
    if a.configs:
        configs = [c for c in configs if c[0] in a.configs]
    print(f"model {path}\nn_ctx {a.n_ctx}, threads {a.threads}, runs {a.runs} (medians), pp = {PP_CHUNK}-token chunk, "
          f"tg = {TG_STEPS} tokens, lazy = layers {half[0]}..{half[-1]}, n_window {a.n_window}", flush=True)
    runners = [make() for _, make in configs]
    speeds = measure_all(runners, tokens, a.depths, a.runs)
    results = {r.label: (speeds[r.label], r.kv_bytes()) for r in runners}

    base_label = "llama-cpp-python f16 KV"
    base = results.get(base_label)
    print()
    head = f"| {'configuration':<30} | {'KV MiB':>7} | {'KV ratio':>8} |"
    for d in a.depths:
        head += f" pp@{d} | ratio | tg@{d} | ratio |"
    print(head)
    print("|" + "|".join("---" for _ in range(3 + 4 * len(a.depths))) + "|")
    for label, (res, kv) in results.items():
        row = f"| {label:<30} | {kv / 2**20:7.1f} | {kv / base[1] if base else float('nan'):8.2f} |"
        for d in a.depths:
            pp, tg = res[d]
            bpp, btg = base[0][d] if base else (float("nan"),) * 2
            row += f" {pp:.1f} | {pp / bpp:.2f} | {tg:.1f} | {tg / btg:.2f} |"
        print(row)


if __name__ == "__main__":
    main()
