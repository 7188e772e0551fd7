"""The engine's settings and their defaults, as the native side defines them (native/engine_config.h is their one
home: `Llama`, the CLI and `memory.py` read defaults from here and never restate them)."""
from __future__ import annotations

from . import _native

DEFAULTS = _native.EngineConfig()


def engine_config(**settings) -> "_native.EngineConfig":
    """An EngineConfig with these settings; the rest keep their defaults. Values are checked natively (once,
    with one message per rule) when an Engine is built from it; cache types and modes on assignment."""
    cfg = _native.EngineConfig()
    for name, value in settings.items():
        if not hasattr(cfg, name):
            raise TypeError(f"unknown engine setting {name!r}")
        setattr(cfg, name, value)
    return cfg
