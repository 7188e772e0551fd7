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
             n_ubatch: int = DEFAULTS.n_ubatch) -> int:
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
        total += 2 * cells * _native.row_bytes(type_, n_kv)
    return total
