"""KV-cache sizes by configuration, computed without allocating anything (`simkv info`, `--kv-budget`). The
sizes are the cache's own planned ones (`_native.planned_kv_layers`), so this table and the engine's stores
cannot disagree; tests check it against kv_cache_stats()."""
from __future__ import annotations

from typing import Iterable, List, Optional

from . import _native
from .engine_config import DEFAULTS, engine_config
from .kv_types import parse_kv_types


def layers_that_can_be_lazy(hparams: dict) -> List[int]:
    """All layers but a model's own sliding-window layers (gemma3), which already keep only a window."""
    swa = set(hparams.get("swa_layers", ()))
    return [il for il in range(hparams["n_layer"]) if il not in swa]


def kv_layers(model, n_ctx: int, type_k: str = DEFAULTS.type_k, type_v: Optional[str] = None,
              lazy_layers: Iterable[int] = (), lazy_type: str = DEFAULTS.lazy_type, kv_types=None,
              n_sink: int = DEFAULTS.n_sink, n_window: int = DEFAULTS.n_window, n_ubatch: int = DEFAULTS.n_ubatch,
              n_seq_max: int = DEFAULTS.n_seq_max, lazy_residual: int = DEFAULTS.lazy_residual,
              full_residual: int = DEFAULTS.full_residual) -> List[dict]:
    """Each layer's KV store an engine with these settings allocates for `model` (a Llama, or a native model
    from `_native.load_model`): {layer, kind, type_k, type_v, bytes}. Full layers hold a pool of n_ctx cells
    shared by the sequences, ring layers (lazy, and a model's own sliding windows) one ring per sequence, and a
    quantized lazy ring (and, with full_residual, a quantized full store) an f16 residual of its latest positions
    per sequence; type_v defaults to type_k, and
    kv_types (kv_types.py) gives layers their own types. The engine's own plan: nothing is allocated."""
    native = getattr(model, "_model", model)
    cfg = engine_config(n_ctx=n_ctx, type_k=type_k, type_v=type_v or type_k, lazy_layers=list(lazy_layers),
                        lazy_type=lazy_type, layer_types=parse_kv_types(kv_types), n_sink=n_sink, n_window=n_window,
                        n_batch=max(n_ubatch, 1), n_ubatch=n_ubatch, n_seq_max=n_seq_max, lazy_residual=lazy_residual,
                        full_residual=full_residual)
    return list(_native.planned_kv_layers(native, cfg))


def kv_bytes(model, n_ctx: int, **config) -> int:
    """Bytes of the KV stores an engine with these settings (kv_layers' keywords) allocates for `model`."""
    return sum(int(layer["bytes"]) for layer in kv_layers(model, n_ctx, **config))


def n_ctx_for_budget(model, budget_bytes: int, **config) -> int:
    """The largest pool (n_ctx, a multiple of 256 cells) whose KV stores fit in budget_bytes with this
    configuration (kv_bytes' keywords); 0 if not even the rings fit."""
    if kv_bytes(model, 256, **config) > budget_bytes:
        return 0
    lo, hi = 1, 1
    while kv_bytes(model, (hi * 2) * 256, **config) <= budget_bytes and hi < (1 << 18):
        hi *= 2
    hi *= 2
    while hi - lo > 1:  # kv_bytes grows with n_ctx: the last multiple of 256 that fits
        mid = (lo + hi) // 2
        if kv_bytes(model, mid * 256, **config) <= budget_bytes:
            lo = mid
        else:
            hi = mid
    return lo * 256
