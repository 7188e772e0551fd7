"""Per-layer K and V cache types: what `Llama(kv_types=...)` takes, and the compact form of the command line
(`--kv-types 0-3=q8_0,7=q8_0/q4_0`).

A listed layer's store takes its own K and V types whatever its kind (full, lazy ring, or the model's own
sliding window); the others keep `type_k`/`type_v` (full) or `lazy_type` (lazy). The names are checked
natively (f16, bf16, q8_0, q4_0), with the model's head size and, for an offloaded layer, against what its
device's flash attention reads."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

Pair = Tuple[str, str]
Entry = Union[str, Sequence[str], None]


def parse_pair(entry: Entry, where: str) -> Optional[Pair]:
    """'q8_0' (K and V), 'q8_0/q4_0' or ('q8_0', 'q4_0'); None: the layer keeps the defaults."""
    if entry is None:
        return None
    if isinstance(entry, str):
        parts = entry.split("/")
    elif isinstance(entry, (tuple, list)):
        parts = list(entry)
    else:
        raise TypeError(f"kv_types: {where} must be a type name, 'K/V' or a (K, V) pair, got {entry!r}")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(isinstance(p, str) and p.strip() for p in parts):
        raise ValueError(f"kv_types: {where} must be a type name, 'K/V' or a (K, V) pair, got {entry!r}")
    return parts[0].strip(), parts[1].strip()


def _layer(x, where: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"kv_types: {where} must be a layer index, got {x!r}")
    return x


def _parse_compact(spec: str) -> Dict[int, Pair]:
    out: Dict[int, Pair] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        layers, sep, types = item.partition("=")
        if not sep:
            raise ValueError(f"kv_types: {item!r} is not LAYERS=TYPE[/VTYPE] (e.g. 0-3=q8_0 or 7=q8_0/q4_0)")
        first, dash, last = layers.strip().partition("-")
        try:
            lo, hi = int(first), int(last) if dash else int(first)
        except ValueError:
            raise ValueError(f"kv_types: {layers.strip()!r} is not a layer or a range of layers (e.g. 4 or 0-3)") from None
        if hi < lo:
            raise ValueError(f"kv_types: the range {layers.strip()!r} is empty")
        for il in range(lo, hi + 1):
            if il in out:
                raise ValueError(f"kv_types: layer {il} is given twice")
            out[il] = parse_pair(types, f"layer {il}")
    return out


def parse_kv_types(spec: Union[str, Mapping[int, Entry], Sequence[Entry], None]) -> Dict[int, Pair]:
    """{layer: (K type, V type)} from the compact form ('0-3=q8_0,7=q8_0/q4_0'), a mapping {layer: entry}, or a
    list with one entry per layer from layer 0 (None: that layer keeps the defaults)."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        return _parse_compact(spec)
    if isinstance(spec, Mapping):
        items = [(_layer(k, "a key"), v) for k, v in spec.items()]
    elif isinstance(spec, (list, tuple)):
        items = list(enumerate(spec))
    else:
        raise TypeError(f"kv_types must be a string, a mapping or a list, got {type(spec).__name__}")
    out = {il: parse_pair(entry, f"layer {il}") for il, entry in items}
    return {il: p for il, p in out.items() if p is not None}


def layer_runs(items) -> List[Tuple[str, object]]:
    """(span, value) for each run of consecutive layers with equal values, from (layer, value) pairs in layer
    order: span '4' or '0-7'. (The compact form here, and `simkv info`'s per-layer lines.)"""
    runs: List[list] = []
    for il, value in items:
        if runs and runs[-1][1] == il - 1 and runs[-1][2] == value:
            runs[-1][1] = il
        else:
            runs.append([il, il, value])
    return [(f"{lo}" if lo == hi else f"{lo}-{hi}", value) for lo, hi, value in runs]


def format_kv_types(types: Mapping[int, Pair]) -> str:
    """The compact form of {layer: (K, V)}: runs of consecutive layers with the same types, 'K' where K = V."""
    runs = layer_runs((il, tuple(types[il])) for il in sorted(types))
    return ",".join(f"{span}={k if k == v else f'{k}/{v}'}" for span, (k, v) in runs)
