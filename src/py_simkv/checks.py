"""Argument type checks at the Python boundary, with messages that name the argument.

Types are checked here; values are checked once, natively (native/engine.cpp `validated`), so a rule and its
message live in one place. A value that only Python uses (a seed, a sampling option) is checked where it is
used.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional

import numpy as np

INT64_MAX = 2**63 - 1


def check_int(name: str, value, minimum: Optional[int] = None) -> int:
    """An int (bool refused); with `minimum`, also its lower bound (for values only Python uses)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not -INT64_MAX <= value <= INT64_MAX:
        raise ValueError(f"{name} is out of range: {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_float(name: str, value) -> float:
    """A finite real number (bool refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def check_str(name: str, value, example: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string such as {example!r}, got {type(value).__name__}")
    return value


def check_layer_list(name: str, layers) -> List[int]:
    """A sequence of layer indices (ints); their range is checked natively against the model."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"{name} must be a sequence of layer indices (ints) or None")
    out = []
    for il in layers:
        if isinstance(il, bool) or not isinstance(il, (int, np.integer)):
            raise TypeError(f"{name} indices must be ints, got {il!r}")
        out.append(check_int(name, il))
    return out


def check_model_file(model_path) -> str:
    """An existing GGUF file (by its magic), as a str path."""
    if not isinstance(model_path, (str, os.PathLike)):
        raise TypeError(f"model_path must be a path, got {type(model_path).__name__}")
    path = os.fspath(model_path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"model path is not a file: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"not a GGUF file: {path}")
    return path


def check_rpc_servers(servers) -> str:
    """None or llama-cpp-python's "host:port,host:port" string ("" = none); each endpoint is checked natively."""
    if servers is None:
        return ""
    if not isinstance(servers, str):
        raise TypeError(f"rpc_servers must be a string such as '127.0.0.1:50052,127.0.0.1:50053', "
                        f"got {type(servers).__name__}")
    return servers.strip()


def check_tensor_split(split) -> List[float]:
    """None or a sequence of numbers: each offload device's share of the offloaded layers (checked natively)."""
    if split is None:
        return []
    if isinstance(split, (str, bytes)) or not hasattr(split, "__iter__"):
        raise TypeError("tensor_split must be a sequence of numbers (one per offload device) or None")
    return [check_float("tensor_split", x) for x in split]
