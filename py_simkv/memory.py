"""KV-cache sizes by configuration, computed from hyperparameters without allocating anything
(`simkv info`). The same rule the native stores follow; tests check it against kv_cache_stats()."""
from __future__ import annotations

from typing import Iterable, List

CELL_PAD = 256  # stores are padded to multiples of 256 cells (stable shapes, fast CUDA kernels)
BYTES_PER_VALUE = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def pad_cells(n: int) -> int:
    return (n + CELL_PAD - 1) // CELL_PAD * CELL_PAD


def lazy_capacity(n_sink: int, n_window: int, n_ubatch: int) -> int:
    """Cells of a lazy store: sinks + a ring with room for one ubatch beyond the window."""
    return pad_cells(n_sink + n_window + n_ubatch - 1)


def layers_that_can_be_lazy(hparams: dict) -> List[int]:
    """All layers but a model's own sliding-window layers (gemma3), which already keep only a window."""
    swa = set(hparams.get("swa_layers", ()))
    return [il for il in range(hparams["n_layer"]) if il not in swa]


def kv_bytes(hparams: dict, n_ctx: int, type_kv: str = "f16", lazy_layers: Iterable[int] = (),
             lazy_type: str = "q4_0", n_sink: int = 4, n_window: int = 1024, n_ubatch: int = 512) -> int:
    n_kv = hparams["head_dim"] * hparams["n_head_kv"]
    lazy = set(lazy_layers)
    swa = set(hparams.get("swa_layers", ()))
    total = 0
    for il in range(hparams["n_layer"]):
        if il in lazy:
            total += int(2 * lazy_capacity(n_sink, n_window, n_ubatch) * n_kv * BYTES_PER_VALUE[lazy_type])
        elif il in swa:  # the model's own sliding-window layers: a ring without sinks, of the full type
            total += int(2 * lazy_capacity(0, hparams["n_swa"], n_ubatch) * n_kv * BYTES_PER_VALUE[type_kv])
        else:
            total += int(2 * pad_cells(n_ctx) * n_kv * BYTES_PER_VALUE[type_kv])
    return total
