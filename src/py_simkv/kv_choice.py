"""Choosing every layer's kind and K/V types from a profile's per-layer measurements (lazy_profile.py's
"types"): the smallest predicted divergence within a byte budget (`kv_fraction`: a fraction of the f16
cache's bytes), or the fewest bytes within a divergence budget (`kv_kld`).

Each lazy-able layer takes one option: q8_0 K and V (the profile's base: nearly free), K q8_0 / V q4_0,
q4_0 K and V, or lazy (sinks + ring). An option's cost is what the profile measured changing that one layer
to it raised the all-q8_0 cache's divergence from the f16 model by; costs are taken to add up (checked on
held-out text by benchmarks/kv_frontier.py), so the choice is a multiple-choice knapsack, solved exactly
over bytes counted in 1/BYTE_STEPS of the f16 cache. A model's own sliding-window layers keep their ring and
the types the caller gives."""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Tuple

import numpy as np

from .memory import kv_layers, layers_that_can_be_lazy

BYTE_STEPS = 4000
BASE = ("q8_0", "q8_0")


@dataclasses.dataclass
class KvChoice:
    lazy_layers: List[int]
    kv_types: Dict[int, Tuple[str, str]]  # every chosen full layer's (K, V)
    bytes: int                            # KV bytes of the whole cache with this choice
    f16_bytes: int                        # the same cache with every layer full and f16
    predicted_kld: float                  # the profile's all-q8_0 divergence plus the chosen options' costs

    @property
    def fraction(self) -> float:
        return self.bytes / self.f16_bytes


def _option_pair(name: str) -> Tuple[str, str]:
    k, _, v = name.partition("/")
    return k, v or k


def choose_kv(profile, model, n_ctx: int, fraction: Optional[float] = None, kld: Optional[float] = None,
              **config) -> KvChoice:
    """Every lazy-able layer's option for a cache of n_ctx cells (`config`: memory.kv_layers' keywords:
    n_window, n_sink, lazy_type, n_seq_max... as the engine will run). Exactly one of fraction (bytes at
    most that share of the all-f16 cache's, the least divergence) or kld (predicted divergence at most
    that, the fewest bytes). Raises ValueError if nothing fits."""
    if (fraction is None) == (kld is None):
        raise ValueError("give one of kv_fraction (a share of the f16 cache's bytes) or kv_kld (a divergence budget)")
    for name, value in (("kv_fraction", fraction), ("kv_kld", kld)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise ValueError(f"{name} must be a number > 0, got {value!r}")
    costs = profile.type_costs()
    base_kld = float(np.mean([s["types"]["base"] for s in profile.samples if "types" in s]))
    native = getattr(model, "_model", model)
    hparams = native.hparams
    candidates = [il for il in layers_that_can_be_lazy(hparams)
                  if all(not np.isnan(c[il]) for c in costs.values())]
    common = {k: v for k, v in config.items() if k not in ("type_k", "type_v", "kv_types", "lazy_layers")}
    f16 = [int(x["bytes"]) for x in kv_layers(native, n_ctx, **common)]
    fixed = kv_layers(native, n_ctx, **{k: v for k, v in config.items() if k not in ("kv_types", "lazy_layers")})
    options = ["/".join(BASE), *costs]
    per_option_bytes = {}
    for o in options:
        if o == "lazy":
            rows = kv_layers(native, n_ctx, **common, lazy_layers=candidates)
        else:
            rows = kv_layers(native, n_ctx, **common, kv_types={il: _option_pair(o) for il in candidates})
        per_option_bytes[o] = [int(x["bytes"]) for x in rows]
    cost_of = {o: (np.zeros(len(f16)) if o == "/".join(BASE) else costs[o]) for o in options}
    fixed_bytes = sum(int(x["bytes"]) for il, x in enumerate(fixed) if il not in candidates)
    total_f16 = sum(f16)
    step = total_f16 / BYTE_STEPS
    # best[c]: the least summed cost of the layers so far within c steps; pick[i][c]: layer i's option there.
    n_steps = BYTE_STEPS + 1
    best = np.zeros(n_steps)
    picks = []
    for il in candidates:
        new = np.full(n_steps, np.inf)
        pick = np.zeros(n_steps, dtype=np.int16)
        for j, o in enumerate(options):
            units = int(math.ceil(per_option_bytes[o][il] / step))
            if units >= n_steps:
                continue
            shifted = np.full(n_steps, np.inf)
            shifted[units:] = best[:n_steps - units] + float(cost_of[o][il])
            better = shifted < new
            new[better] = shifted[better]
            pick[better] = j
        best = new
        picks.append(pick)
    room = int(math.floor(((fraction * total_f16 if fraction is not None else total_f16 * 4) - fixed_bytes) / step))
    room = min(room, n_steps - 1)
    if room < 0 or not np.isfinite(best[max(room, 0)]):
        raise ValueError(f"kv_fraction {fraction} is too small: even with every lazy-able layer lazy the cache "
                         f"takes more than that share of the f16 cache's bytes at n_ctx {n_ctx}")
    if kld is not None:
        within = np.flatnonzero(base_kld + best[:room + 1] <= kld)
        if within.size == 0:
            raise ValueError(f"kv_kld {kld} is below what the profile measured for the all-q8_0 cache "
                             f"({base_kld:.4f}): no choice is predicted to be within it")
        room = int(within[0])
    chosen, c = {}, room
    for il, pick in zip(reversed(candidates), reversed(picks)):
        o = options[int(pick[c])]
        chosen[il] = o
        c -= int(math.ceil(per_option_bytes[o][il] / step))
    lazy = sorted(il for il, o in chosen.items() if o == "lazy")
    types = {il: _option_pair(o) for il, o in sorted(chosen.items()) if o != "lazy"}
    used = fixed_bytes + sum(per_option_bytes[o][il] for il, o in chosen.items())
    return KvChoice(lazy_layers=lazy, kv_types=types, bytes=used, f16_bytes=total_f16,
                    predicted_kld=base_kld + float(sum(cost_of[o][il] for il, o in chosen.items())))
