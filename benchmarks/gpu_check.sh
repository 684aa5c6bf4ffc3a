#!/usr/bin/env bash
# The one GPU check: build with CUDA, run the CUDA tests, run the GPU benchmark.
# Meant for a fresh GPU machine without network, against its preinstalled torch
# (no dependency is installed; tensorly / hypothesis / pytest-benchmark may be
# missing: the tests that need them skip). Target: under 6 minutes.
#
#   benchmarks/gpu_check.sh [RESULTS_FILE]
#
# RESULTS_FILE defaults to $OUT/RESULTS_GPU.md.draft when $OUT is set, else
# benchmarks/RESULTS_GPU.md.draft. Logs of every stage go next to it. The exit
# status is non-zero when the build or any test failed; the benchmark runs
# whenever the build succeeded, and its summary table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
RESULTS="${1:-${OUT:+$OUT/RESULTS_GPU.md.draft}}"
RESULTS="${RESULTS:-benchmarks/RESULTS_GPU.md.draft}"
LOGS="$(dirname "$RESULTS")"
mkdir -p "$LOGS"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
status=0

stage() { printf '\n=== %s (%s)\n' "$1" "$(date +%T)"; }

stage "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'EOF' || { echo "torch with CUDA is required"; exit 2; }
import sys, torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU available:", torch.cuda.is_available())
for mod in ("pytest", "numpy", "tqdm", "hypothesis", "tensorly", "pytest_benchmark", "expecttest", "setuptools", "ninja"):
    try:
        __import__(mod)
        print(f"  {mod}: present")
    except ImportError:
        print(f"  {mod}: missing")
sys.exit(0 if torch.cuda.is_available() and torch.version.cuda else 1)
EOF
# Compile for this GPU only: half the nvcc time of the default "8.0;9.0".
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  export TORCH_CUDA_ARCH_LIST
fi
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=$CUDA_HOME"

stage "build (pip install --no-build-isolation --no-deps -e .)"
if ! TUCKER_OPS_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >"$LOGS/gpu_check_build.log" 2>&1; then
  tail -n 30 "$LOGS/gpu_check_build.log"
  echo "pip install failed; falling back to an in-place build (setup.py build_ext --inplace)"
  if ! TUCKER_OPS_CUDA=1 "$PY" setup.py build_ext --inplace >>"$LOGS/gpu_check_build.log" 2>&1; then
    tail -n 60 "$LOGS/gpu_check_build.log"
    echo "BUILD FAILED (log: $LOGS/gpu_check_build.log)"
    exit 1
  fi
fi
tail -n 3 "$LOGS/gpu_check_build.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build is importable too
"$PY" -c 'import tucker_ops._build_info as b, torch, tucker_ops._ops; print("WITH_CUDA =", b.WITH_CUDA, "| CUDA kernel registered:", torch._C._dispatch_has_kernel_for_dispatch_key("tucker_ops::tucker_conv2d", "CUDA"))' || status=1

stage "CUDA tests"
if TUCKER_OPS_TEST_DEVICES=cuda timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_build.py tests/test_cuda.py \
    2>&1 | tee "$LOGS/gpu_check_tests.log" | tail -n 40; then
  echo "CUDA tests passed"
else
  echo "CUDA TESTS FAILED (log: $LOGS/gpu_check_tests.log)"
  status=1
fi

stage "GPU benchmark"
if ! timeout 200 "$PY" benchmarks/bench_gpu.py --out "$RESULTS" 2>&1 | tee "$LOGS/gpu_check_bench.log"; then
  echo "BENCHMARK FAILED OR TIMED OUT (log: $LOGS/gpu_check_bench.log)"
  status=1
fi
echo "gpu_check: exit status $status"
exit $status
