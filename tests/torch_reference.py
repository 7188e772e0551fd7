"""An independent forward pass in PyTorch over the weights of a GGUF (dequantized by the `gguf` package),
with a per-layer attention mask (causal, or sink + window), written from the model definition and not
from simkv's code. The K/V cache storage type is emulated by rounding K and V (and Q, which ggml converts
to the K type's dot-product type) exactly as the cache would store them. Quantized caches hold K and V
rotated by an orthonormal Hadamard matrix, as llama.cpp's do (rotate=False leaves that out).
"""
from __future__ import annotations

import numpy as np
import torch
import gguf
from gguf.quants import dequantize, quantize

GGML = gguf.GGMLQuantizationType


class Weights:
    def __init__(self, path: str):
        r = gguf.GGUFReader(path)
        self.arch = r.fields["general.architecture"].contents()
        f = lambda k, d=None: r.fields[f"{self.arch}.{k}"].contents() if f"{self.arch}.{k}" in r.fields else d  # noqa: E731
        self.n_layer = f("block_count")
        self.n_embd = f("embedding_length")
        self.n_head = f("attention.head_count")
        self.n_head_kv = f("attention.head_count_kv", self.n_head)
        self.head_dim = f("attention.key_length", self.n_embd // self.n_head)
        self.n_rot = f("rope.dimension_count", self.head_dim)
        self.eps = f("attention.layer_norm_rms_epsilon", 1e-5)
        self.freq_base = f("rope.freq_base", 10000.0)
        # gemma3: five sliding-window layers (own RoPE base) in every six, from the model card's definition
        self.n_swa = f("attention.sliding_window", 0) if self.arch == "gemma3" else 0
        self.freq_base_swa = f("rope.freq_base_swa", 10000.0)
        self.t = {}
        for t in r.tensors:
            arr = dequantize(np.array(t.data), t.tensor_type).astype(np.float32)
            self.t[t.name] = torch.from_numpy(arr.reshape([int(x) for x in reversed(t.shape)]).copy())
        if "output.weight" not in self.t:
            self.t["output.weight"] = self.t["token_embd.weight"]

    def is_swa(self, il):
        return bool(self.n_swa) and il % 6 < 5


def _rms(x, w, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, n_rot, base, neox):
    # x [n, heads, d]; rotate pairs (2i, 2i+1) (llama GGUFs are permuted for this) or (i, i + n_rot/2) (NEOX)
    d = x.shape[-1]
    half = n_rot // 2
    inv = base ** (-torch.arange(0, half, dtype=torch.float64) * 2.0 / n_rot)
    ang = pos.double()[:, None] * inv[None, :]
    cos, sin = torch.cos(ang).float()[:, None, :], torch.sin(ang).float()[:, None, :]
    out = x.clone()
    if neox:
        a, b = x[..., :half], x[..., half:n_rot]
        out[..., :half] = a * cos - b * sin
        out[..., half:n_rot] = a * sin + b * cos
    else:
        a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = a * cos - b * sin
        out[..., 1:n_rot:2] = a * sin + b * cos
    return out if n_rot == d else out


def _round_rows(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Round the last dimension as a cache row of `kind` would store it."""
    if kind == "f32":
        return x
    if kind == "f16":
        return x.half().float()
    if kind == "q8_0_simd":
        return _q8_0_like_ggml_cpu(x)
    q = {"q8_0": GGML.Q8_0, "q4_0": GGML.Q4_0}[kind]
    flat = x.reshape(-1, x.shape[-1]).numpy().astype(np.float32)
    back = dequantize(quantize(flat, q), q).reshape(x.shape)
    return torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32))


def _q8_0_like_ggml_cpu(x: torch.Tensor) -> torch.Tensor:
    """Q8_0 as ggml-cpu's x86 SIMD quantize_row_q8_0 computes it (the path that quantizes Q for a
    quantized K): scale amax/127 stored as f16, multiplier 127/amax in f32, round half to even."""
    blocks = x.reshape(-1, 32).float()
    amax = blocks.abs().amax(dim=1, keepdim=True)
    d = (amax / 127.0).half().float()
    mult = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(blocks * mult)
    return (q * d).reshape(x.shape)


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / np.sqrt(n)


def rotation_sizes(kind: str, head_dim: int):
    """(K, V) block sizes of the Hadamard rotation of a quantized cache (llama.cpp's choice: K by the
    largest power of two dividing the head size, V by 64), or None."""
    if kind in ("f16", "f32") or head_dim % 64:
        return None
    k = 64
    while head_dim % (2 * k) == 0:
        k *= 2
    return k, 64


def _rotate(x: torch.Tensor, n: int) -> torch.Tensor:
    """Each consecutive block of n values along the last dimension times H_n (symmetric, H_n H_n = I)."""
    blocks = x.double().reshape(*x.shape[:-1], x.shape[-1] // n, n)
    return (blocks @ _hadamard(n)).reshape(x.shape).to(x.dtype)


# ggml converts Q to the K type's dot-product type inside flash attention.
_Q_TYPE_FOR_K = {"f16": "f16", "q8_0": "q8_0_simd", "q4_0": "q8_0_simd"}


def causal_mask(n):
    i = torch.arange(n)
    return i[None, :] <= i[:, None]


def sink_window_mask(n, n_sink, n_window):
    i = torch.arange(n)
    q, k = i[:, None], i[None, :]
    return (k <= q) & ((k < n_sink) | (q - k < n_window))


@torch.no_grad()
def forward(w: Weights, tokens, masks, kv_types, probe=None, rotate=True, gathered=(), residual=None,
            one_query=False):
    """Logits [n, n_vocab] for `tokens` at positions 0..n-1. masks[il]: bool [n, n] (query, key);
    kv_types[il]: how layer il stores K and V ("f16", "q8_0", "q4_0"); layers in `gathered` are read through
    an f16 copy of their cells (simkv's lazy rings), so their K and V are rounded to f16 after the store's
    type and their Q is not rounded to a quantized K's dot type (ggml's batched kernel keeps Q in f32; its
    single-query kernel rounds Q to f16 and accumulates V in f16: one_query=True rounds their Q to f16 too,
    for ubatches of one token; the f16 accumulation is left out).

    residual=R, or (R, rows): gathered layers of a quantized type also keep their latest keys in f16: a query
    at q reads a key at k in f16 iff q - k < R (and every key, for the rows selected by the bool tensor
    `rows`: exact prefill's prompt, evaluated with full f16 stores), older ones quantized.

    probe=(rows, n_sink, n_window): also return per-layer (mass, change) for those query rows: the attention
    weight on the first n_sink keys + the n_window most recent, and ||o - o_trimmed|| / ||o||, averaged
    over rows and heads (SimLayerKV's lazy score and the effect of trimming)."""
    scores = []
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    n = tokens.shape[0]
    pos = torch.arange(n)
    neox = w.arch in ("qwen2", "qwen3", "gemma3")
    gemma = w.arch == "gemma3"
    H, Hkv, D = w.n_head, w.n_head_kv, w.head_dim
    x = w.t["token_embd.weight"][tokens]
    if gemma:
        x = x * np.sqrt(w.n_embd)
    for il in range(w.n_layer):
        p = lambda s: w.t[f"blk.{il}.{s}"]  # noqa: E731
        h = _rms(x, p("attn_norm.weight"), w.eps)
        q, k, v = h @ p("attn_q.weight").T, h @ p("attn_k.weight").T, h @ p("attn_v.weight").T
        if f"blk.{il}.attn_q.bias" in w.t:
            q, k, v = q + p("attn_q.bias"), k + p("attn_k.bias"), v + p("attn_v.bias")
        q, k, v = q.view(n, H, D), k.view(n, Hkv, D), v.view(n, Hkv, D)
        if f"blk.{il}.attn_q_norm.weight" in w.t:
            q = _rms(q, p("attn_q_norm.weight"), w.eps)
            k = _rms(k, p("attn_k_norm.weight"), w.eps)
        base = w.freq_base_swa if w.is_swa(il) else w.freq_base
        q = _rope(q, pos, w.n_rot, base, neox)
        k = _rope(k, pos, w.n_rot, base, neox)
        kind = kv_types[il]
        rot = rotation_sizes(kind, D) if rotate else None
        if rot:
            q, k, v = _rotate(q, rot[0]), _rotate(k, rot[0]), _rotate(v, rot[1])
        exact = None  # [n, n]: where a query reads a key from the f16 residual
        if residual and il in gathered and kind not in ("f16", "f32"):
            n_res, rows = residual if isinstance(residual, tuple) else (residual, None)
            exact = (pos[:, None] - pos[None, :]) < n_res
            if rows is not None:
                exact = exact | rows[:, None]
            k_res, v_res = k.half().float(), v.half().float()
        k = _round_rows(k.reshape(n, Hkv * D), kind).view(n, Hkv, D)
        v = _round_rows(v.reshape(n, Hkv * D), kind).view(n, Hkv, D)
        if il in gathered:
            k, v = _round_rows(k, "f16"), _round_rows(v, "f16")
        q = _round_rows(q, ("f16" if one_query else "f32") if il in gathered else _Q_TYPE_FOR_K[kind])
        rep = H // Hkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / np.sqrt(D)
        if exact is not None:
            k_res, v_res = k_res.repeat_interleave(rep, dim=1), v_res.repeat_interleave(rep, dim=1)
            s = torch.where(exact[None], torch.einsum("qhd,khd->hqk", q.double(), k_res.double()) / np.sqrt(D), s)
        s = s.masked_fill(~masks[il][None], float("-inf"))
        a = torch.softmax(s, dim=-1)
        if probe is not None:
            rows, n_sink, n_window = probe
            rows = torch.as_tensor(rows)
            window = sink_window_mask(n, n_sink, n_window)[rows]  # [r, n]
            ar = a[:, rows, :]  # [H, r, n]
            mass = (ar * window[None]).sum(-1).mean().item()
            o_all = torch.einsum("hqk,khd->hqd", ar, v.double())
            aw = torch.softmax(s[:, rows, :].masked_fill(~window[None], float("-inf")), dim=-1)
            o_win = torch.einsum("hqk,khd->hqd", aw, v.double())
            change = ((o_all - o_win).norm(dim=-1) / o_all.norm(dim=-1)).mean().item()
            scores.append((mass, change))
        if exact is not None:
            sel = exact[None].double()
            o = (torch.einsum("hqk,khd->qhd", a * (1 - sel), v.double()) +
                 torch.einsum("hqk,khd->qhd", a * sel, v_res.double())).float()
        else:
            o = torch.einsum("hqk,khd->qhd", a, v.double()).float()
        if rot:
            o = _rotate(o, rot[1])
        o = o.reshape(n, H * D)
        a_out = o @ p("attn_output.weight").T
        x = x + (_rms(a_out, p("post_attention_norm.weight"), w.eps) if gemma else a_out)
        h = _rms(x, p("ffn_norm.weight"), w.eps)
        g, u = h @ p("ffn_gate.weight").T, h @ p("ffn_up.weight").T
        act = torch.nn.functional.gelu(g, approximate="tanh") if gemma else torch.nn.functional.silu(g)
        f_out = (act * u) @ p("ffn_down.weight").T
        x = x + (_rms(f_out, p("post_ffw_norm.weight"), w.eps) if gemma else f_out)
    x = _rms(x, w.t["output_norm.weight"], w.eps)
    logits = x @ w.t["output.weight"].T
    return (logits, scores) if probe is not None else logits
