#!/usr/bin/env bash
# Runs ON the GPU machine, from the project root, with .gpu/ carried (benchmarks/gpu_prepare.sh copies this
# file there). Builds llama-cpp-python with CUDA for this card (about 5.5 minutes on 16 cores), installs it
# into the machine's python3, then builds and installs simkv against it.
set -euo pipefail
T0=$SECONDS
arch=${CUDA_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}
python3 -m pip install -q --no-index --no-deps .gpu/whl/*.whl
export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$arch -DLLAVA_BUILD=OFF ${SIMKV_EXTRA_CMAKE_ARGS:-}"
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
python3 -m pip install -q --no-build-isolation --no-deps --no-index ./.gpu/llama-cpp-python
echo "device_build: llama-cpp-python with CUDA (sm_$arch) installed after $((SECONDS - T0)) s"
python3 -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'gpu offload:', llama_cpp.llama_supports_gpu_offload())"
python3 -m pip install -q --no-build-isolation --no-deps --no-index .
echo "device_build: simkv installed after $((SECONDS - T0)) s"
