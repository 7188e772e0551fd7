"""Which part of a lazy layer's 4-bit ring costs the perplexity: a PyTorch experiment.

A lazy layer's attention goes almost all to its sinks and its most recent keys, so those are the keys
whose rounding matters. This script evaluates the held-out texts of eval_quality.py with the PyTorch
reference forward (tests/torch_reference.py, independent of simkv's graph) under exact prefill: the first
half of n_ctx tokens is the prompt, seen at full f16 precision by every layer; the second half is scored,
and there each lazy layer sees its n_sink sinks and its n_window most recent keys, each stored as a
variant says:

    f16 ring          every kept key and value in f16 (trimming alone)
    q4_0 ring         every kept key and value q4_0 (Hadamard-rotated, as simkv stores them)
    q4_0 + f16 sinks  the n_sink sink cells in f16, the rest q4_0
    ... + last R f16  also the R most recent positions (relative to each query) in f16 (KIVI's residual)
    K q8_0 / K q5_0   a finer type for K only, V q4_0

It prints perplexity and the cost against the full cache for each, and the ring's bytes against a q4_0
ring of the same window. The prompt's per-layer K/V are computed once and shared by every variant.

    python benchmarks/research/ring_precision.py --n-ctx 8192 --n-window 1024 --ratio 0.5
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))  # benchmarks/

import torch_reference as tr  # noqa: E402
from eval_quality import heldout_texts  # noqa: E402
from py_simkv import Llama, LazyProfile, default_model_path  # noqa: E402
from py_simkv.lazy_profile import shipped_profile  # noqa: E402

# bits per stored value, block scales included (ggml's block sizes)
BITS = {"f16": 16.0, "q8_0": 8.5, "q5_0": 5.5, "q4_0": 4.5}


def rounded(x: torch.Tensor, kind: str, rotate: int) -> torch.Tensor:
    """[n, Hkv, D] as a store of `kind` gives it back (rotated before quantizing and back after)."""
    if kind == "f16":
        return x.half().float()
    n, h, d = x.shape
    y = tr._rotate(x, rotate) if rotate else x
    if kind == "q5_0":
        flat = y.reshape(-1, d * h).numpy().astype(np.float32)
        q = tr.GGML.Q5_0
        y = torch.from_numpy(np.ascontiguousarray(tr.dequantize(tr.quantize(flat, q), q).reshape(y.shape), dtype=np.float32))
    else:
        y = tr._round_rows(y.reshape(n, h * d), kind).view(n, h, d)
    return tr._rotate(y, rotate) if rotate else y


class Variant:
    def __init__(self, name, k_type, v_type, f16_sinks=False, f16_recent=0, rotated=True):
        self.name, self.k_type, self.v_type = name, k_type, v_type
        self.f16_sinks, self.f16_recent, self.rotated = f16_sinks, f16_recent, rotated

    def ring_bits(self, n_sink, n_window):
        """Bits per (K+V) position of the ring, averaged over its cells (the f16 parts counted apart)."""
        cells = n_sink + n_window
        f16_cells = (n_sink if self.f16_sinks else 0) + self.f16_recent
        base = (BITS[self.k_type] + BITS[self.v_type]) * cells
        return (base + 32.0 * f16_cells) / cells


def prompt_pass(w, tokens, n_prompt):
    """Every layer full f16 over the prompt (exact prefill): the hidden state out and each layer's K, V."""
    kv = []
    x = embed(w, tokens[:n_prompt])
    pos = torch.arange(n_prompt)
    for il in range(w.n_layer):
        q, k, v = qkv(w, il, x, pos)
        kq, vq = k.half().float(), v.half().float()
        o = attend(q.half().float(), kq, vq, tr.causal_mask(n_prompt), w)
        x = block_out(w, il, x, o)
        kv.append((k, v))
    return kv


def embed(w, tokens):
    x = w.t["token_embd.weight"][torch.as_tensor(tokens, dtype=torch.long)]
    return x * np.sqrt(w.n_embd) if w.arch == "gemma3" else x


def qkv(w, il, x, pos):
    p = lambda s: w.t[f"blk.{il}.{s}"]  # noqa: E731
    n = x.shape[0]
    h = tr._rms(x, p("attn_norm.weight"), w.eps)
    q, k, v = h @ p("attn_q.weight").T, h @ p("attn_k.weight").T, h @ p("attn_v.weight").T
    q, k, v = q.view(n, w.n_head, w.head_dim), k.view(n, w.n_head_kv, w.head_dim), v.view(n, w.n_head_kv, w.head_dim)
    neox = w.arch in ("qwen2", "qwen3", "gemma3")
    return tr._rope(q, pos, w.n_rot, w.freq_base, neox), tr._rope(k, pos, w.n_rot, w.freq_base, neox), v


def attend(q, k, v, mask, w, k2=None, v2=None, use2=None):
    """softmax(q k^T / sqrt(d)) v per head in float32, queries in chunks; where use2[q, j], key j comes from
    (k2, v2) instead (a second precision of the same keys)."""
    rep = w.n_head // w.n_head_kv
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if k2 is not None:
        k2, v2 = k2.repeat_interleave(rep, 1), v2.repeat_interleave(rep, 1)
    out = torch.empty(q.shape[0], w.n_head, w.head_dim)
    scale = 1.0 / np.sqrt(w.head_dim)
    for c0 in range(0, q.shape[0], 512):
        c1 = min(q.shape[0], c0 + 512)
        qc = q[c0:c1]
        cols = mask[c0:c1].any(0).nonzero().squeeze(1)  # only the keys some query of the chunk sees
        mc = mask[c0:c1][:, cols]
        s = torch.einsum("qhd,khd->hqk", qc, k[cols]) * scale
        if k2 is not None:
            uc = use2[c0:c1][:, cols]
            s2 = torch.einsum("qhd,khd->hqk", qc, k2[cols]) * scale
            s = torch.where(uc[None], s2, s)
        s = s.masked_fill(~mc[None], float("-inf"))
        a = torch.softmax(s, dim=-1)
        if k2 is not None:
            sel = uc[None].float()
            o = torch.einsum("hqk,khd->qhd", a * (1 - sel), v[cols]) + torch.einsum("hqk,khd->qhd", a * sel, v2[cols])
        else:
            o = torch.einsum("hqk,khd->qhd", a, v[cols])
        out[c0:c1] = o
    return out


def block_out(w, il, x, o):
    p = lambda s: w.t[f"blk.{il}.{s}"]  # noqa: E731
    x = x + o.reshape(x.shape[0], -1) @ p("attn_output.weight").T
    h = tr._rms(x, p("ffn_norm.weight"), w.eps)
    f = (torch.nn.functional.silu(h @ p("ffn_gate.weight").T) * (h @ p("ffn_up.weight").T)) @ p("ffn_down.weight").T
    return x + f


@torch.no_grad()
def scored_nll(w, tokens, n_prompt, prompt_kv, lazy, variant, n_sink, n_window):
    """Mean next-token loss of tokens[n_prompt:] (each predicting the next) under a variant."""
    n, m = len(tokens), len(tokens) - n_prompt
    pos = torch.arange(n_prompt, n)
    qpos, kpos = pos[:, None], torch.arange(n)[None, :]
    causal = kpos <= qpos
    window = causal & ((kpos < n_sink) | (qpos - kpos < n_window))
    f16_cells = torch.zeros(m, n, dtype=torch.bool)
    if variant and variant.f16_sinks:
        f16_cells |= kpos < n_sink
    if variant and variant.f16_recent:
        f16_cells |= (qpos - kpos) < variant.f16_recent
    rot = tr.rotation_sizes("q4_0", w.head_dim) if variant is None or variant.rotated else (0, 0)
    x = embed(w, tokens[n_prompt:])
    for il in range(w.n_layer):
        q, k_new, v_new = qkv(w, il, x, pos)
        k_all = torch.cat([prompt_kv[il][0], k_new])
        v_all = torch.cat([prompt_kv[il][1], v_new])
        if variant is None or il not in lazy:
            o = attend(q.half().float(), k_all.half().float(), v_all.half().float(), causal, w)
        else:
            # exact prefill: the prompt's keys went through the full f16 store before the ring
            k_src = torch.cat([prompt_kv[il][0].half().float(), k_new])
            v_src = torch.cat([prompt_kv[il][1].half().float(), v_new])
            kq = rounded(k_src, variant.k_type, rot[0] if variant.k_type != "f16" else 0)
            vq = rounded(v_src, variant.v_type, rot[1] if variant.v_type != "f16" else 0)
            if f16_cells.any():
                o = attend(q, kq, vq, window, w, k_src.half().float(), v_src.half().float(), f16_cells)
            else:
                o = attend(q, kq, vq, window, w)
        x = block_out(w, il, x, o)
    x = tr._rms(x, w.t["output_norm.weight"], w.eps)
    logits = x[:-1] @ w.t["output.weight"].T
    targets = torch.as_tensor(tokens[n_prompt + 1:], dtype=torch.long)
    return torch.nn.functional.cross_entropy(logits, targets).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--n-window", type=int, default=1024)
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.5, help="lazy layers: this share of the shipped profile")
    ap.add_argument("--texts", nargs="+", default=["prose", "code", "dialogue"])
    ap.add_argument("--recent", type=int, nargs="+", default=[32, 128], help="R values of the f16 residual")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run only the variants named so")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or default_model_path()
    prof = LazyProfile.load(shipped_profile(path))
    lazy = set(prof.select(ratio=args.ratio))
    print(f"lazy layers ({len(lazy)}): {sorted(lazy)}", file=sys.stderr)
    w = tr.Weights(path)
    vocab = Llama(path, vocab_only=True, verbose=False)
    variants = [Variant("f16 ring", "f16", "f16"), Variant("q4_0 ring", "q4_0", "q4_0"),
                Variant("q4_0 ring, f16 sinks", "q4_0", "q4_0", f16_sinks=True)]
    variants += [Variant(f"q4_0 ring, f16 sinks + last {r} f16", "q4_0", "q4_0", True, r) for r in args.recent]
    variants += [Variant("K q8_0 / V q4_0", "q8_0", "q4_0"), Variant("K q5_0 / V q4_0", "q5_0", "q4_0"),
                 Variant("K q4_0 / V q8_0", "q4_0", "q8_0"),
                 Variant("K q5_0 / V q4_0, f16 sinks", "q5_0", "q4_0", f16_sinks=True)]
    # the engine's ring (sinks in 4 bits, the last 32 positions in f16), with and without the rotation
    variants += [Variant("q4_0 ring + last 32 f16", "q4_0", "q4_0", False, 32),
                 Variant("q4_0 ring + last 32 f16, unrotated", "q4_0", "q4_0", False, 32, rotated=False),
                 Variant("q4_0 ring, unrotated", "q4_0", "q4_0", rotated=False)]
    if args.only:
        variants = [v for v in variants if v.name in args.only]
    rows = {}
    for name, text in heldout_texts():
        if name not in args.texts:
            continue
        tokens = vocab.tokenize(text.encode(), add_bos=True)[: args.n_ctx]
        half = len(tokens) // 2
        t0 = time.time()
        kv = prompt_pass(w, tokens, half)
        base = scored_nll(w, tokens, half, kv, lazy, None, args.n_sink, args.n_window)
        rows.setdefault("full f16", {})[name] = np.exp(base)
        for v in variants:
            rows.setdefault(v.name, {})[name] = np.exp(scored_nll(w, tokens, half, kv, lazy, v, args.n_sink, args.n_window))
            print(f"{name:9s} {v.name:34s} {rows[v.name][name]:.3f}  ({time.time() - t0:.0f} s)", file=sys.stderr)
    texts = [t for t in ("prose", "code", "dialogue") if t in args.texts]
    q4_bits = Variant("", "q4_0", "q4_0").ring_bits(args.n_sink, args.n_window)
    print(f"\nSmolLM2 ring precision, n_ctx {args.n_ctx}, window {args.n_window}, {len(lazy)} lazy layers "
          f"({int(args.ratio * 100)}% of the shipped profile), exact prefill, PyTorch reference\n")
    print("| ring | " + " | ".join(texts) + " | ring bytes vs q4_0 ring |")
    print("|---|" + "---|" * len(texts) + "---|")
    for label, ppl in rows.items():
        cells = []
        for t in texts:
            full = rows["full f16"][t]
            cells.append(f"{ppl[t]:.3f}" if label == "full f16" else f"{ppl[t]:.3f} ({(ppl[t] / full - 1) * 100:+.1f}%)")
        v = next((v for v in variants if v.name == label), None)
        ratio = "" if v is None else f"{v.ring_bits(args.n_sink, args.n_window) / q4_bits:.2f}x"
        print(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    main()
