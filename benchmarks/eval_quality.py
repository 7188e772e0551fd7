"""Quality of lazy-layer choices: perplexity on held-out long text and passkey retrieval, one table.

Perplexity: evaluate the first half of an n_ctx-token text as the prompt, score the second half (mean
negative log-likelihood of each next token). Passkey: a number hidden at several depths of filler text,
asked for at the end (greedy answer). Configurations: full f16, full q4_0, SimLayerKV from the profile at
25/50/75% lazy by each criterion (exact and streaming prefill), dynamic mode, every layer lazy
(StreamingLLM), and random lazy layers at the same ratios (several seeds, exact prefill); each with
q4_0 lazy rings (simkv's default) and f16 ones (trimming alone, without the quantization). KV compression
is against full f16.

The profile is made on the calibration set shipped with simkv (first half of the Python Language
Reference topics + some standard-library modules); the held-out texts are the other half of the topics
and other standard-library modules.

    python benchmarks/eval_quality.py                 # SmolLM2-135M, n_ctx 4096, window 256
    python benchmarks/eval_quality.py --n-ctx 8192 --n-window 512 --seeds 0 1 2 3
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import random
import sys
import time

import numpy as np

from py_simkv import Llama, LazyProfile, default_model_path, profile_model
from py_simkv.engine_config import DEFAULTS
from py_simkv.lazy_profile import find_profile

RATIOS = (0.25, 0.5, 0.75)
PROMPT_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def heldout_texts():
    """Text not used for calibration: the second half of the Language Reference topics, other modules,
    the chatterbot-corpus categories left out of the calibration dialogue (make_dialogue_texts.py)."""
    import pydoc_data.topics as t

    keys = sorted(t.topics)
    prose = "\n\n".join(t.topics[k].strip() for k in keys[len(keys) // 2:])
    code = "\n\n".join(inspect.getsource(importlib.import_module(m))
                       for m in ("argparse", "dataclasses", "string", "statistics", "pprint", "copy", "glob"))
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "heldout", "dialogue_chatterbot_heldout.txt"), encoding="utf-8") as f:
        dialogue = f.read()
    return [("prose", prose), ("code", code), ("dialogue", dialogue)]


def perplexity(llm: Llama, tokens) -> float:
    """exp(mean next-token loss) of the second half after the first half as the prompt."""
    half = len(tokens) // 2
    llm.reset()
    llm.eval(tokens[:half])
    return float(np.exp(llm.nll(tokens[half:]).mean()))


def passkey_prompt(llm: Llama, n_tokens: int, depth: float, key: int) -> list:
    filler = llm.tokenize(PROMPT_FILLER.encode(), add_bos=False)
    needle = llm.tokenize(f" The pass key is {key}. Remember it. {key} is the pass key. ".encode(), add_bos=False)
    question = llm.tokenize(b" What is the pass key? The pass key is", add_bos=False)
    body = n_tokens - len(needle) - len(question)
    hay = (filler * (body // len(filler) + 1))[:body]
    at = int(depth * body)
    return hay[:at] + needle + hay[at:] + question


def passkey(llm: Llama, n_tokens: int, depths, seed: int = 0) -> float:
    rng = random.Random(seed)
    hits = 0
    for d in depths:
        key = rng.randint(10000, 99999)
        prompt = passkey_prompt(llm, n_tokens, d, key)
        llm.reset()
        out = [t for _, t in zip(range(8), llm.generate(prompt, temp=0.0))]
        hits += str(key) in llm.detokenize(out).decode("utf-8", errors="ignore")
    return hits / len(depths)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--n-window", type=int, default=256)
    ap.add_argument("--n-ubatch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", default=None, help="lazy profile (default: beside the model, made if missing)")
    ap.add_argument("--ring-types", nargs="+", default=["q4_0", "f16"],
                    help="lazy_type of the lazy layers (q4_0: simkv's default; f16: trimming alone)")
    ap.add_argument("--residuals", type=int, nargs="+", default=[DEFAULTS.lazy_residual], metavar="N",
                    help="f16 residuals of quantized rings to compare (lazy_residual; default the engine's)")
    ap.add_argument("--texts", nargs="+", default=["prose", "code", "dialogue"], choices=["prose", "code", "dialogue"],
                    help="held-out texts to score")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the random choices")
    ap.add_argument("--passkey-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--skip-passkey", action="store_true")
    ap.add_argument("--passkey-only", nargs="+", default=None, metavar="TEXT",
                    help="run the passkey test only for configurations whose label contains one of these")
    ap.add_argument("--budgets", type=float, nargs="+", default=[], metavar="NATS",
                    help="also the default selection rule at these loss budgets (laziest layers while their summed "
                         "profile loss stays within the budget), with streaming prefill as the CLI ships it")
    ap.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                    help="run only configurations whose label contains one of these (full f16 always runs)")
    a = ap.parse_args()
    path = a.model or default_model_path()

    prof_path = a.profile or find_profile(path)
    if prof_path:
        prof = LazyProfile.load(prof_path)
        prof.check_model(path, Llama(path, n_ctx=16, n_threads=1)._model)
    else:
        print("profiling the model on the shipped calibration set ...", file=sys.stderr)
        prof = profile_model(path, n_threads=a.threads)
    # Layers that can be lazy: all but a model's own sliding-window layers (gemma3), whose profile scores
    # are NaN; "all lazy" and the random choices draw from these.
    candidates = [il for il in range(prof.n_layer) if not np.isnan(prof.mean("mass")[il])]
    print(f"model {path}\nn_ctx {a.n_ctx} (first half prompt, second half scored), n_window {a.n_window}, "
          f"n_ubatch {a.n_ubatch}, profile params {prof.params}", flush=True)
    print("mean mass  :", np.round(prof.mean("mass"), 3).tolist())
    print("mean change:", np.round(prof.mean("change"), 3).tolist(), flush=True)
    if all("loss" in smp for smp in prof.samples):
        print("mean loss  :", np.round(prof.mean("loss"), 4).tolist(), flush=True)

    common = dict(n_ctx=a.n_ctx, n_threads=a.threads, n_window=a.n_window, n_ubatch=a.n_ubatch, n_batch=a.n_ubatch)
    configs = [("full f16", dict()), ("full q4_0", dict(type_k="q4_0", type_v="q4_0"))]
    crits = ["mass", "change"] + (["loss"] if all("loss" in smp for smp in prof.samples) else [])
    rings = [(t, r) for t in a.ring_types for r in (a.residuals if t.startswith("q") else [0])]
    for ring_type, residual in rings:
        # a quantized ring at the default residual is "q4_0 ring"; other residuals are named
        ring = ring_type if residual == DEFAULTS.lazy_residual or not ring_type.startswith("q") else \
            f"{ring_type} (residual {residual})"
        lazy = lambda layers, **kw: dict(lazy_layers=layers, lazy_type=ring_type, lazy_residual=residual, **kw)  # noqa: E731
        for crit in crits:
            for ratio in RATIOS:
                layers = prof.select(ratio=ratio, criterion=crit)
                for prefill in ("exact", "streaming"):
                    configs.append((f"{crit} {int(ratio * 100)}% {prefill}, {ring} ring",
                                    lazy(layers, lazy_prefill=prefill)))
        for budget in a.budgets:
            configs.append((f"loss budget {budget:g} streaming, {ring} ring",
                            lazy(prof.select(budget=budget), lazy_prefill="streaming")))
        configs.append((f"dynamic (mass > family threshold), {ring} ring",
                        dict(lazy_mode="dynamic", lazy_type=ring_type, lazy_residual=residual)))
        configs.append((f"all lazy (StreamingLLM), {ring} ring", lazy(candidates)))
        for ratio in RATIOS:
            for seed in a.seeds:
                layers = sorted(random.Random(seed).sample(candidates, int(round(ratio * len(candidates)))))
                configs.append((f"random {int(ratio * 100)}% seed {seed} exact, {ring} ring",
                                lazy(layers, lazy_prefill="exact")))

    if a.only:
        configs = [c for c in configs if c[0] == "full f16" or any(o in c[0] for o in a.only)]
    probe_llm = Llama(path, n_ctx=16, n_threads=1)
    texts = [(name, probe_llm.tokenize(text.encode(), add_bos=True)[: a.n_ctx]) for name, text in heldout_texts()
             if name in a.texts]
    for name, toks in texts:
        assert len(toks) == a.n_ctx, f"{name}: only {len(toks)} tokens"
    del probe_llm

    rows = []
    base_bytes = None
    for label, kw in configs:
        t0 = time.perf_counter()
        llm = Llama(path, **dict(common, **kw))
        ppl = [perplexity(llm, toks) for _, toks in texts]
        stats = llm.kv_cache_stats()
        kv = stats["total_bytes"]
        base_bytes = base_bytes or kv
        skip_pk = a.skip_passkey or (a.passkey_only and not any(o in label for o in a.passkey_only))
        pk = float("nan") if skip_pk else passkey(llm, a.n_ctx - 16, a.passkey_depths)
        lazy = stats["lazy_layers"]
        rows.append((label, ppl, pk, base_bytes / kv, stats["peak_bytes"] / 2**20, lazy))
        print(f"  {label:<36} ppl {' / '.join(f'{p:.3f}' for p in ppl)}  passkey {pk:.2f}  "
              f"compression {base_bytes / kv:.2f}x  ({time.perf_counter() - t0:.0f} s)", flush=True)

    full = rows[0][1]
    print()
    head = "| configuration | " + " | ".join(f"ppl {n} | vs full" for n, _ in texts)
    print(head + " | passkey | KV compression | peak MiB | lazy layers |")
    print("|---" * (2 + 2 * len(texts) + 3) + "|")
    for label, ppl, pk, comp, peak, lazy in rows:
        cells = " | ".join(f"{p:.3f} | {100 * (p / f - 1):+.1f}%" for p, f in zip(ppl, full))
        print(f"| {label} | {cells} | {pk:.2f} | {comp:.2f}x | {peak:.0f} | {len(lazy)}: {','.join(map(str, lazy))} |")


if __name__ == "__main__":
    main()
