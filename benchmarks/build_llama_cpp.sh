#!/usr/bin/env bash
# Builds llama.cpp's llama-server, llama-batched-bench, llama-bench and ggml-rpc-server (with ggml's RPC backend)
# from the source of the pinned llama-cpp-python (its sdist vendors llama.cpp), for bench_serve.py's
# llama-server baseline, the batched-decode anchor and bench_rpc.py's llama.cpp RPC baseline.
# Output: ../llamacpp-build/bin (outside the repository). About 10 minutes on 2 cores.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../../llamacpp-build}"
src="$out/src"
mkdir -p "$src"
if [ ! -d "$src/llama_cpp_python-0.3.36" ]; then
  # the sdist only (--no-binary :all: would also build pip's build backends, cmake among them, from source)
  pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==0.3.36" -d "$src"
  tar -xzf "$src"/llama_cpp_python-0.3.36.tar.gz -C "$src"
fi
cmake -S "$src/llama_cpp_python-0.3.36/vendor/llama.cpp" -B "$out" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DGGML_RPC=ON
ninja -C "$out" -j"$(nproc)" llama-server llama-batched-bench llama-bench ggml-rpc-server
echo "built: $out/bin/llama-server $out/bin/llama-batched-bench $out/bin/llama-bench $out/bin/ggml-rpc-server"
