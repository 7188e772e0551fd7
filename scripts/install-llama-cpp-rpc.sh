#!/usr/bin/env bash
# Installs llama-cpp-python 0.3.36 built with ggml's RPC backend (CMAKE_ARGS="-DGGML_RPC=on"), which simkv's
# remote devices (`rpc_servers`, `--rpc`, `simkv rpc-server`) and their tests need. simkv itself needs no
# rebuild: it finds the backend at run time.
#
# The wheel is built once (about 4 minutes on 2 cores) and kept in $SIMKV_WHEEL_CACHE (default
# ~/.cache/simkv/llama-cpp-python-rpc); an installed llama-cpp-python that already has the backend is left as
# it is. pip's own wheel cache is not used for the build: it would hand back a build without RPC.
set -euo pipefail
version=0.3.36
if python3 - "$version" <<'PY'; then
import importlib.metadata, importlib.util, os, sys
try:
    ok = importlib.metadata.version("llama_cpp_python") == sys.argv[1]
    lib = os.path.join(os.path.dirname(importlib.util.find_spec("llama_cpp").origin), "lib")
    ok = ok and any(f.startswith("libggml-rpc.so") for f in os.listdir(lib))
except Exception:
    ok = False
sys.exit(0 if ok else 1)
PY
  echo "llama-cpp-python $version with ggml RPC is installed"
  exit 0
fi
cache="${SIMKV_WHEEL_CACHE:-$HOME/.cache/simkv/llama-cpp-python-rpc}"
mkdir -p "$cache"
wheel=$(ls "$cache"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $version with -DGGML_RPC=on (once; about 4 minutes on 2 cores)"
  start=$SECONDS
  CMAKE_ARGS="-DGGML_RPC=on" python3 -m pip wheel --no-deps --no-cache-dir "llama-cpp-python==$version" -w "$cache"
  echo "built in $((SECONDS - start)) s"
  wheel=$(ls "$cache"/llama_cpp_python-"$version"-*.whl | head -n 1)
fi
python3 -m pip install --force-reinstall --no-deps "$wheel"
