#!/usr/bin/env bash
# On the GPU machine, from the project root, with .gpu/ carried (benchmarks/gpu_prepare.sh): build
# llama-cpp-python with CUDA and this project against it, run the GPU tests, run the GPU benchmark.
# Everything it prints also lands in $OUT. Knobs: DEPTHS (default "0 8192 32768"), RUNS (3),
# SKIP_BUILD=1 (machine still warm from a previous call), SKIP_TESTS=1, BENCH_TIMEOUT (seconds, 300),
# PROFILE="CONFIG LABEL" (where a target is missed: per-kernel GPU time of that configuration at the last
# depth, with nsys when the machine has it).
set -uo pipefail
T0=$SECONDS
root=$PWD
OUT=${OUT:-/tmp/simkv-gpu-out}
mkdir -p "$OUT"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  bash .gpu/device_build.sh 2>&1 | tail -5 | tee "$OUT/build.txt" || exit 1
fi
export SIMKV_TOKENIZER_GGUF=$root/.gpu/tokenizer.gguf
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import py_simkv; print('simkv devices:', py_simkv.gpu_devices())" | tee -a "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # From /tmp: pytest then writes no cache into the carried tree.
  (cd /tmp && SIMKV_ALLOW_NO_RPC=1 timeout 240 python3 -m pytest -q -rs -p no:cacheprovider "$root/tests/test_offload.py" "$root/tests/test_devices.py") \
    2>&1 | tail -25 | tee "$OUT/test_cuda.txt"
  echo "gpu_check: tests done after $((SECONDS - T0)) s" | tee -a "$OUT/test_cuda.txt"
fi
(cd benchmarks && timeout "${BENCH_TIMEOUT:-300}" python3 bench_gpu.py --depths ${DEPTHS:-0 8192 32768} --runs "${RUNS:-3}") \
  2>&1 | tee "$OUT/bench_gpu.txt"
if [ -n "${PROFILE:-}" ] && command -v nsys >/dev/null; then
  last=$(echo ${DEPTHS:-0 8192 32768} | awk '{print $NF}')
  (cd benchmarks && timeout 200 nsys profile -t cuda -o /tmp/simkv-prof --force-overwrite true \
     python3 bench_gpu.py --depths "$last" --runs 1 --configs "$PROFILE" >/dev/null 2>&1;
   nsys stats -r cuda_gpu_kern_sum -f csv /tmp/simkv-prof.nsys-rep 2>/dev/null | head -25) | tee "$OUT/profile.txt"
fi
echo "gpu_check: done after $((SECONDS - T0)) s"
