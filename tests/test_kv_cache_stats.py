"""kv_cache_stats() reports what is allocated, and that follows the per-layer configuration."""
import pytest

from py_simkv import Llama

ROW_BYTES = {  # bytes of one cache row of n values
    "f16": lambda n: 2 * n,
    "bf16": lambda n: 2 * n,
    "q8_0": lambda n: n // 32 * 34,
    "q4_0": lambda n: n // 32 * 18,
}


def pad256(n):
    return (n + 255) // 256 * 256


def expected(hp, n_ctx, n_batch, n_ubatch, kv_type, lazy_layers, lazy_type, n_sink, n_window, lazy_residual=32,
             full_residual=32):
    n_kv = hp["head_dim"] * hp["n_head_kv"]
    layers = []
    for il in range(hp["n_layer"]):
        lazy = il in lazy_layers
        cap = pad256(n_sink + n_window + min(n_ubatch, n_batch) - 1) if lazy else pad256(n_ctx)
        t = lazy_type if lazy else kv_type
        # a quantized ring also reads its last lazy_residual positions (at most the window) in f16, from a
        # residual of twice as many cells (the rest for rewinds); a quantized full layer its last full_residual
        residual = (min(lazy_residual, n_window) if lazy else min(full_residual, n_ctx)) if t.startswith("q") else 0
        layers.append({"layer": il, "kind": "lazy" if lazy else "full", "type_k": t, "type_v": t,
                       "capacity": cap, "residual": residual,
                       "bytes": 2 * cap * ROW_BYTES[t](n_kv) + 2 * 2 * residual * ROW_BYTES["f16"](n_kv),
                       "device": "CPU"})
    total = sum(x["bytes"] for x in layers)
    return {"total_bytes": total, "peak_bytes": total, "lazy_layers": sorted(lazy_layers), "layers": layers}


CONFIGS = [
    dict(n_ctx=1000, n_batch=512, n_ubatch=512, kv_type="f16", lazy_layers=[], lazy_type="q4_0", n_sink=4, n_window=1024),
    dict(n_ctx=4096, n_batch=512, n_ubatch=64, kv_type="q8_0", lazy_layers=[0, 2], lazy_type="q4_0", n_sink=4, n_window=100),
    dict(n_ctx=3000, n_batch=128, n_ubatch=512, kv_type="q4_0", lazy_layers=[3], lazy_type="f16", n_sink=0, n_window=7),
    dict(n_ctx=1, n_batch=1, n_ubatch=1, kv_type="bf16", lazy_layers=[0, 1, 2, 3], lazy_type="q8_0", n_sink=16, n_window=1),
    dict(n_ctx=4096, n_batch=512, n_ubatch=512, kv_type="f16", lazy_layers=[1, 2], lazy_type="q4_0", n_sink=4,
         n_window=256, lazy_residual=0),
    dict(n_ctx=4096, n_batch=512, n_ubatch=512, kv_type="f16", lazy_layers=[1, 2], lazy_type="q4_0", n_sink=4,
         n_window=256, lazy_residual=100),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_stats_follow_the_formula(tiny_model, cfg):
    llm = Llama(tiny_model("llama"), n_ctx=cfg["n_ctx"], n_batch=cfg["n_batch"], n_ubatch=cfg["n_ubatch"],
                type_k=cfg["kv_type"], type_v=cfg["kv_type"], lazy_layers=cfg["lazy_layers"],
                lazy_type=cfg["lazy_type"], n_sink=cfg["n_sink"], n_window=cfg["n_window"], n_threads=1,
                lazy_residual=cfg.get("lazy_residual", 32))
    assert llm.kv_cache_stats() == expected(llm.hparams, **cfg)


def test_smollm_half_lazy_at_8k(smollm_path):
    """The benchmark configuration: 15 of 30 layers lazy, window 1024, 8K context."""
    lazy = list(range(15, 30))
    llm = Llama(smollm_path, n_ctx=8192, lazy_layers=lazy, n_threads=1)
    stats = llm.kv_cache_stats()
    want = expected(llm.hparams, 8192, 512, 512, "f16", lazy, "q4_0", 4, 1024)
    assert stats == want
    full = Llama(smollm_path, n_ctx=8192, n_threads=1).kv_cache_stats()["total_bytes"]
    assert full == 30 * 2 * 8192 * 192 * 2  # 30 layers, K+V, 8192 cells, 3 heads x 64, f16
    assert stats["total_bytes"] / full < 0.55
