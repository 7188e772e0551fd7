"""KV-cache sizes by configuration, computed without allocating anything (`simkv info`). The sizes come
from the native policies themselves (`_native.store_capacity`, `_native.row_bytes`), so this table and
the engine's stores cannot disagree; tests check it against kv_cache_stats()."""
from __future__ import annotations

from typing import Iterable, List

from . import _native
from .engine_config import DEFAULTS


def layers_that_can_be_lazy(hparams: dict) -> List[int]:
    """All layers but a model's own sliding-window layers (gemma3), which already keep only a window."""
    swa = set(hparams.get("swa_layers", ()))
    return [il for il in range(hparams["n_layer"]) if il not in swa]


def kv_bytes(hparams: dict, n_ctx: int, type_kv: str = DEFAULTS.type_k, lazy_layers: Iterable[int] = (),
             lazy_type: str = DEFAULTS.lazy_type, n_sink: int = DEFAULTS.n_sink, n_window: int = DEFAULTS.n_window,
             n_ubatch: int = DEFAULTS.n_ubatch, n_seq_max: int = DEFAULTS.n_seq_max,
             lazy_residual: int = DEFAULTS.lazy_residual) -> int:
    """Bytes of the KV stores an engine allocates: full layers hold a pool of n_ctx cells shared by the
    sequences, ring layers (lazy, and a model's own sliding windows) one ring per sequence, and a quantized
    lazy ring an f16 residual of its latest positions per sequence."""
    n_kv = hparams["head_dim"] * hparams["n_head_kv"]
    # The engine clamps windows to the context (native/engine.cpp `validated`).
    n_sink, n_window, n_ubatch = min(n_sink, n_ctx), min(n_window, n_ctx), min(n_ubatch, n_ctx)
    lazy = set(lazy_layers)
    swa = set(hparams.get("swa_layers", ()))
    total = 0
    for il in range(hparams["n_layer"]):
        if il in lazy:
            kind, type_, window = "lazy", lazy_type, n_window
        elif il in swa:  # the model's own sliding-window layers: a ring without sinks, of the full type
            kind, type_, window = "swa", type_kv, hparams["n_swa"]
        else:
            kind, type_, window = "full", type_kv, n_window
        cells = _native.store_capacity(kind, n_ctx=n_ctx, n_sink=n_sink, n_window=window, n_ubatch=n_ubatch)
        if kind != "full":
            cells *= n_seq_max
        total += 2 * cells * _native.row_bytes(type_, n_kv)
        if kind == "lazy":
            residual = _native.residual_cells(lazy_type, lazy_residual, n_window) * n_seq_max
            total += 2 * residual * _native.row_bytes("f16", n_kv)
    return total


def n_ctx_for_budget(hparams: dict, budget_bytes: int, **config) -> int:
    """The largest pool (n_ctx, a multiple of 256 cells) whose KV stores fit in budget_bytes with this
    configuration (kv_bytes' keywords); 0 if not even the rings fit."""
    if kv_bytes(hparams, 256, **config) > budget_bytes:
        return 0
    lo, hi = 1, 1
    while kv_bytes(hparams, (hi * 2) * 256, **config) <= budget_bytes and hi < (1 << 18):
        hi *= 2
    hi *= 2
    while hi - lo > 1:  # kv_bytes grows with n_ctx: the last multiple of 256 that fits
        mid = (lo + hi) // 2
        if kv_bytes(hparams, mid * 256, **config) <= budget_bytes:
            lo = mid
        else:
            hi = mid
    return lo * 256
