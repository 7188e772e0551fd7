"""The memory frontier: KV bytes against quality for each cache configuration, llama.cpp's caches in the table.

Each configuration evaluates the same held-out text (eval_quality.py's held-out prose: the half of the Python
Language Reference topics that calibration never saw): the first half as the prompt, then the second half
scored position by position. Reported per configuration: KV bytes at n_ctx (as the cache plans them and as
allocated), perplexity of the scored half, and the KL divergence of each scored position's next-token
distribution from the full f16 cache's (mean, 99th and 99.9th percentile) with top-1 agreement. llama.cpp's
f16, q8_0 and q4_0 caches (through llama-cpp-python, same GGUF, flash attention, rotated quantized caches)
are rows of the same table; llama.cpp's f16 cache is the reference (simkv's f16 cache computes the same
logits bit for bit: tests/test_parity_llama_cpp.py). Every configuration is held at once and fed the scored
half in chunks, so no logits beyond a chunk's are kept (Gemma's vocabulary at 32K positions would be 34 GB).

The Pareto front (configurations no other beats on both bytes and mean KLD) is marked; --plot saves bytes
against mean KLD (matplotlib). --passkey adds retrieval of a number hidden at several depths (a window
method's failure mode); --speed-depth adds prefill and decode tokens/s at that depth (bench_cpu.py's
timing, --speed-runs medians).

    python benchmarks/kv_frontier.py                                  # SmolLM2-135M at 8K
    python benchmarks/kv_frontier.py --plot frontier.png --passkey 0.1 0.5 0.9
    python benchmarks/kv_frontier.py --model GEMMA.gguf --n-ctx 32768
    python benchmarks/kv_frontier.py --quick                          # 1K tokens, three configurations
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np

from py_simkv import Llama, default_model_path
from py_simkv.kv_types import format_kv_types
from py_simkv.memory import kv_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # bench_cpu adds tests/ (llama-cpp-python's reference) itself
from bench_cpu import Ours, Reference, corpus_text, measure_all  # noqa: E402
from eval_quality import heldout_texts, passkey  # noqa: E402

REFERENCE = "llama.cpp f16"
# The profile's joint choice of kinds and types (kv_choice.py) at these shares of the f16 cache's bytes:
# llama.cpp q4_0's bytes, one above and the smaller points.
CHOICE_FRACTIONS = (0.35, 0.28, 0.22, 0.16)


@dataclass
class Config:
    label: str
    engine: str  # "llama.cpp" or "simkv"
    kw: Dict = field(default_factory=dict)


def default_configs() -> List[Config]:
    """llama.cpp's three cache types, and simkv's per-layer choices: the profile's default lazy layers and
    half the layers lazy (q4_0 rings with their f16 residual), with f16, q8_0, K q8_0 / V q4_0 and q4_0 full
    layers; and the profile's joint choice of every layer's kind and types at CHOICE_FRACTIONS."""
    out = [Config(f"llama.cpp {t}", "llama.cpp", dict(type_kv=t)) for t in ("f16", "q8_0", "q4_0")]
    full = [("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "q4_0"), ("q4_0", "q4_0")]
    for lazy, lazy_kw in (("default lazy", dict(lazy_profile="auto")), ("50% lazy", dict(lazy_profile="auto", lazy_ratio=0.5))):
        for k, v in full:
            name = k if k == v else f"K {k} / V {v}"
            out.append(Config(f"simkv {lazy}, {name} full", "simkv", dict(lazy_kw, type_k=k, type_v=v)))
    for fraction in CHOICE_FRACTIONS:
        out.append(Config(f"simkv profile's choice at {fraction}x", "simkv", dict(lazy_profile="auto", kv_fraction=fraction)))
    return out


def quick_configs() -> List[Config]:
    return [Config("llama.cpp f16", "llama.cpp", dict(type_kv="f16")),
            Config("llama.cpp q4_0", "llama.cpp", dict(type_kv="q4_0")),
            Config("simkv 50% lazy, q8_0 full", "simkv", dict(lazy_layers=list(range(15, 30)), type_k="q8_0",
                                                              type_v="q8_0"))]


class SimkvRunner(Ours):
    def __init__(self, path, label, n_ctx, threads, n_window, **kw):
        super().__init__(path, label, n_ctx, threads, n_window=n_window, verbose=False, **kw)
        self.seqs = self.llm.sequences  # logits of a chunk's positions only, never of every position

    def prefill(self, tokens):
        self.seqs.decode({0: tokens})

    def chunk(self, tokens) -> np.ndarray:
        return self.seqs.decode({0: tokens}, all_logits=True)[0]

    def bytes(self):
        """(as the cache plans them, as allocated)"""
        llm = self.llm
        planned = kv_bytes(llm, llm.n_ctx(), type_k=llm.type_k, type_v=llm.type_v, lazy_layers=llm.lazy_layers,
                           lazy_type=llm.lazy_type, kv_types=llm.kv_types, n_sink=llm.n_sink, n_window=llm.n_window,
                           n_ubatch=llm.n_ubatch, lazy_residual=llm.lazy_residual)
        return planned, self.kv_bytes()

    def layers(self) -> str:
        """'lazy 3,7,..; 0-2=q8_0,...' : which layers got which kind and types."""
        stats = self.llm.kv_cache_stats()["layers"]
        types = {d["layer"]: (d["type_k"], d["type_v"]) for d in stats}
        lazy = [d["layer"] for d in stats if d["kind"] == "lazy"]
        return f"lazy {','.join(map(str, lazy)) or 'none'}; {format_kv_types(types)}"


class LlamaCppRunner(Reference):
    def __init__(self, path, label, n_ctx, threads, type_kv):
        super().__init__(path, label, n_ctx, threads, type_kv)
        self.type_kv = type_kv

    def prefill(self, tokens):
        self.llm.eval(tokens)

    def chunk(self, tokens) -> np.ndarray:
        # llama_cpp.Llama.eval keeps every position's logits only with logits_all, in an n_ctx x n_vocab array;
        # here each batch is decoded asking for all its logits, which are copied out and dropped.
        llm, out = self.llm, []
        for i in range(0, len(tokens), llm.n_batch):
            batch = list(tokens[i:i + llm.n_batch])
            n_past = llm.n_tokens
            llm._batch.set_batch(batch=batch, n_past=n_past, logits_all=True)
            llm._ctx.decode(llm._batch)
            llm.input_ids[n_past:n_past + len(batch)] = batch
            llm.n_tokens += len(batch)
            out.append(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(batch), llm.n_vocab())).copy())
        return np.concatenate(out)

    def bytes(self):
        """llama.cpp allocates what its rule plans (bench_cpu.Reference)."""
        return self.kv_bytes(), self.kv_bytes()

    def layers(self) -> str:
        return f"every layer full, K/V {self.type_kv}"


def make_runner(c: Config, path, n_ctx, threads, n_window):
    if c.engine == "llama.cpp":
        return LlamaCppRunner(path, c.label, n_ctx, threads, c.kw["type_kv"])
    return SimkvRunner(path, c.label, n_ctx, threads, n_window, **c.kw)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


@dataclass
class Scores:
    """Per scored position: the configuration's loss, its KL divergence from the reference, top-1 agreement."""
    nll: List[np.ndarray] = field(default_factory=list)
    kld: List[np.ndarray] = field(default_factory=list)
    top1: List[np.ndarray] = field(default_factory=list)

    def add(self, ref_logp: np.ndarray, logq: np.ndarray, targets: np.ndarray):
        """ref_logp, logq: log-probabilities [positions, n_vocab] of the reference and the configuration."""
        self.nll.append(-logq[np.arange(len(targets)), targets])
        self.kld.append((np.exp(ref_logp) * (ref_logp - logq)).sum(1))
        self.top1.append(ref_logp.argmax(1) == logq.argmax(1))

    def summary(self) -> Dict[str, float]:
        nll, kld, top1 = np.concatenate(self.nll), np.concatenate(self.kld), np.concatenate(self.top1)
        return {"ppl": float(np.exp(nll.mean())), "kld_mean": float(kld.mean()), "kld_p99": float(np.percentile(kld, 99)),
                "kld_p999": float(np.percentile(kld, 99.9)), "top1": float(top1.mean())}


def evaluate(configs: List[Config], path, tokens, n_ctx, threads, n_window, chunk=256, log=print):
    """Every configuration's bytes and scores on tokens (first half the prompt, second half scored)."""
    half = len(tokens) // 2
    runners, scores = {}, {}
    for c in configs:
        t0 = time.perf_counter()
        runners[c.label] = make_runner(c, path, n_ctx, threads, n_window)
        runners[c.label].prefill(tokens[:half - 1])  # the logits of position half - 1 predict token half
        scores[c.label] = Scores()
        log(f"  {c.label}: prompt of {half - 1} tokens in {time.perf_counter() - t0:.1f} s")
    for lo in range(half - 1, len(tokens) - 1, chunk):
        part = tokens[lo:min(lo + chunk, len(tokens) - 1)]
        targets = np.asarray(tokens[lo + 1:lo + 1 + len(part)])
        ref_logp = log_softmax(runners[REFERENCE].chunk(part))
        for c in configs:
            logq = ref_logp if c.label == REFERENCE else log_softmax(runners[c.label].chunk(part))
            scores[c.label].add(ref_logp, logq, targets)
    rows = []
    for c in configs:
        planned, allocated = runners[c.label].bytes()
        rows.append(dict(label=c.label, engine=c.engine, planned=planned, allocated=allocated,
                         layers=runners[c.label].layers(), **scores[c.label].summary()))
    for r in runners.values():
        close = getattr(r.llm, "close", None)
        if close:
            close()
    return rows


def pareto(rows) -> set:
    """Labels no other row beats on both allocated bytes and mean KLD (one at least strictly)."""
    front = set()
    for r in rows:
        if not any(o["allocated"] <= r["allocated"] and o["kld_mean"] <= r["kld_mean"] and
                   (o["allocated"] < r["allocated"] or o["kld_mean"] < r["kld_mean"]) for o in rows):
            front.add(r["label"])
    return front


def passkeys(configs, path, n_ctx, threads, n_window, depths) -> Dict[str, float]:
    """The fraction of depths at which each configuration's greedy answer names the hidden number."""
    out = {}
    for c in configs:
        if c.engine == "llama.cpp":
            llm = Reference(path, c.label, n_ctx, threads, c.kw["type_kv"]).llm
        else:
            llm = Llama(path, n_ctx=n_ctx, n_threads=threads, n_window=n_window, verbose=False, **c.kw)
        out[c.label] = passkey(llm, n_ctx - 16, depths)
        close = getattr(llm, "close", None)
        if close:
            close()
    return out


def speeds(configs, path, n_ctx, threads, n_window, depth, runs, vocab) -> Dict[str, tuple]:
    """(prefill, decode) tokens/s at depth: bench_cpu.py's interleaved medians on its text."""
    runners = [Reference(path, c.label, n_ctx, threads, c.kw["type_kv"]) if c.engine == "llama.cpp"
               else Ours(path, c.label, n_ctx, threads, n_window=n_window, **c.kw) for c in configs]
    tokens = vocab.tokenize(corpus_text().encode())
    need = depth + 600
    tokens = (tokens * (need // len(tokens) + 1))[:need]
    res = measure_all(runners, tokens, [depth], runs)
    return {label: res[label][depth] for label in res}


def table(rows, front, keys=None, speed=None, depth=None):
    base = next(r for r in rows if r["label"] == REFERENCE)
    head = ("| configuration | KV MiB planned | allocated | vs f16 | ppl | ppl cost | mean KLD | p99 KLD | p99.9 KLD "
            "| top-1 |")
    sep = "|---|---|---|---|---|---|---|---|---|---|"
    if keys:
        head += " passkey |"
        sep += "---|"
    if speed:
        head += f" pp@{depth} | tg@{depth} | pp vs llama.cpp f16 | tg vs llama.cpp f16 |"
        sep += "---|---|---|---|"
    lines = [head, sep]
    for r in rows:
        mark = "**" if r["label"] in front else ""
        line = (f"| {mark}{r['label']}{mark} | {r['planned'] / 2**20:.1f} | {r['allocated'] / 2**20:.1f} | "
                f"{r['allocated'] / base['allocated']:.2f}x | {r['ppl']:.3f} | {100 * (r['ppl'] / base['ppl'] - 1):+.2f}% | "
                f"{r['kld_mean']:.4f} | {r['kld_p99']:.3f} | {r['kld_p999']:.3f} | {100 * r['top1']:.1f}% |")
        if keys:
            line += f" {keys[r['label']]:.2f} |"
        if speed:
            pp, tg = speed[r["label"]]
            bpp, btg = speed[REFERENCE]
            line += f" {pp:.1f} | {tg:.1f} | {pp / bpp:.2f} | {tg / btg:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def plot(rows, front, out_path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["label"] == REFERENCE)
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        if r["label"] == REFERENCE:
            continue
        x, y = r["allocated"] / base["allocated"], r["kld_mean"]
        ours = r["engine"] == "simkv"
        ax.scatter([x], [y], marker="o" if ours else "s", s=60 if r["label"] in front else 30,
                   color="tab:blue" if ours else "tab:red", edgecolors="black" if r["label"] in front else "none")
        ax.annotate(r["label"].replace("simkv ", ""), (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("KV bytes vs f16 cache")
    ax.set_ylabel("mean KL divergence from the f16 cache (log)")
    ax.set_title(title)
    ax.scatter([], [], marker="s", color="tab:red", label="llama.cpp cache types")
    ax.scatter([], [], marker="o", color="tab:blue", label="simkv configurations")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--n-ctx", type=int, default=8192, help="context; the held-out text fills it (half scored)")
    ap.add_argument("--n-window", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=None, help="subset of configuration labels (the f16 reference is kept)")
    ap.add_argument("--passkey", type=float, nargs="*", default=None, metavar="DEPTH",
                    help="also passkey retrieval at these depths (fractions of the context)")
    ap.add_argument("--speed-depth", type=int, default=0, help="also prefill/decode tokens/s at this depth")
    ap.add_argument("--speed-runs", type=int, default=5)
    ap.add_argument("--plot", default=None, metavar="PNG", help="save bytes vs mean KLD here (matplotlib)")
    ap.add_argument("--quick", action="store_true", help="1,024 tokens, window 128, three configurations")
    a = ap.parse_args(argv)
    path = a.model or default_model_path()
    configs = quick_configs() if a.quick else default_configs()
    if a.quick:
        a.n_ctx, a.n_window = 1024, 128
    if a.configs:
        unknown = set(a.configs) - {c.label for c in configs}
        if unknown:
            raise SystemExit(f"unknown configurations {sorted(unknown)}; known: {[c.label for c in configs]}")
        configs = [c for c in configs if c.label in a.configs or c.label == REFERENCE]
    vocab = Llama(path, vocab_only=True, verbose=False)
    text = dict(heldout_texts())["prose"]
    tokens = vocab.tokenize(text.encode())[:a.n_ctx]
    if len(tokens) < a.n_ctx:
        raise SystemExit(f"the held-out prose has {len(tokens)} tokens, fewer than --n-ctx {a.n_ctx}")
    print(f"model {path}\nn_ctx {a.n_ctx} ({a.n_ctx // 2} scored), window {a.n_window}, threads {a.threads}; held-out prose",
          flush=True)
    t0 = time.perf_counter()
    rows = evaluate(configs, path, tokens, a.n_ctx, a.threads, a.n_window, log=lambda s: print(s, flush=True))
    print(f"scored in {time.perf_counter() - t0:.0f} s", flush=True)
    front = pareto(rows)
    keys = passkeys(configs, path, a.n_ctx, a.threads, a.n_window, a.passkey) if a.passkey else None
    speed = (speeds(configs, path, a.n_ctx, a.threads, a.n_window, a.speed_depth, a.speed_runs, vocab)
             if a.speed_depth else None)
    print()
    print(table(rows, front, keys, speed, a.speed_depth))
    print("\n**bold**: on the Pareto front (no configuration has fewer bytes and a lower mean KLD)")
    for r in rows:
        print(f"  {r['label']}: {r['layers']}")
    if a.plot:
        plot(rows, front, a.plot, f"{os.path.basename(path)}, n_ctx {a.n_ctx}")
        print(f"plot: {a.plot}")
    return rows


if __name__ == "__main__":
    main()
