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
# Compile with the system toolchain, whose libstdc++ is the one torch loads.
# Seen on the lent H200 image: its default /opt/gcc/bin/g++ left a second copy
# of libstdc++'s stream code in _C.so, and every error message that formats an
# integer crashed the process (two libstdc++ copies disagreeing on the locale).
if [ -z "${CXX:-}" ] || [ "${GPU_CHECK_SYSTEM_CXX:-1}" = 1 ]; then
  if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
    export CC=/usr/bin/gcc CXX=/usr/bin/g++
  fi
fi
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=$CUDA_HOME CXX=${CXX:-(default)}"

stage "build (pip install --no-build-isolation --no-deps -e .)"
# ptxas -v: registers, shared memory and spills of every kernel, in the build log.
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }-Xptxas=-v"
if ! TUCKER_OPS_CUDA=1 timeout 240 "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e . >"$LOGS/gpu_check_build.log" 2>&1; then
  tail -n 30 "$LOGS/gpu_check_build.log"
  # An older setuptools may reject pyproject.toml's metadata (PEP 639 license);
  # build_ext needs none of it, so build in place with pyproject.toml set aside.
  echo "pip install failed; falling back to an in-place build (setup.py build_ext --inplace)"
  mv pyproject.toml pyproject.toml.aside
  TUCKER_OPS_CUDA=1 timeout 200 "$PY" setup.py build_ext --inplace >>"$LOGS/gpu_check_build.log" 2>&1
  built=$?
  mv pyproject.toml.aside pyproject.toml
  if [ $built -ne 0 ]; then
    grep -n -B2 -A12 "error" "$LOGS/gpu_check_build.log" | head -n 120
    echo "BUILD FAILED (log: $LOGS/gpu_check_build.log)"
    exit 1
  fi
fi
tail -n 3 "$LOGS/gpu_check_build.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build is importable too
"$PY" -c 'import tucker_ops._build_info as b, torch, tucker_ops._ops; print("WITH_CUDA =", b.WITH_CUDA, "| CUDA kernel registered:", torch._C._dispatch_has_kernel_for_dispatch_key("tucker_ops::tucker_conv2d", "CUDA"))' || status=1
# The error path in a child process: a toolchain problem like the one above
# shows as a crash here, with a clear line, rather than as a dead test worker.
if "$PY" - <<'EOF'
import torch, tucker_ops._ops
for dev in ("cpu", "cuda"):
    try:
        torch.ops.tucker_ops.tucker_linear(torch.randn(3, 4, device=dev), torch.randn(2, 5, device=dev),
                                           torch.randn(2, 2, device=dev), None, None)
    except ValueError as e:
        print(f"error path on {dev}: ok ({str(e).splitlines()[0][:60]}...)")
EOF
then :; else echo "ERROR PATH CRASHED (rc $?): error messages with integers kill the process with this build"; status=1; fi

# The whole-GPU kernels first, alone and bounded, in a child process: a kernel
# that faults poisons its process's CUDA context and one that hangs would spend
# the check's time, so where this fails their tests and benchmark column are
# left out and the rest of the check still reports.
stage "whole-GPU kernels smoke (bounded 60 s)"
GRID_DESELECT=()
BENCH_GRID=()
if TUCKER_OPS_CUDA_CONV_GRID=1 TUCKER_OPS_CUDA_LINEAR_GRID=1 timeout 60 "$PY" - <<'EOF'
import torch, tucker_ops._ops
from tucker_ops import reference
ops = torch.ops.tucker_ops
g = torch.Generator(device="cuda").manual_seed(0)
def r(*s): return torch.randn(*s, device="cuda", generator=g) / s[-1] ** 0.5
def rel(a, b): return ((a.double() - b.double()).norm() / b.double().norm()).item()
x, first, core, last, bias = r(2, 32, 9, 9), r(16, 32), r(24, 16, 3, 3), r(40, 24), r(40)
for fmt in (torch.contiguous_format, torch.channels_last):
    xi = x.contiguous(memory_format=fmt)
    e = rel(ops.tucker_conv2d(xi, first, core, last, bias, (1, 1), (1, 1), (1, 1)),
            reference.tucker_conv2d(xi, first, core, last, bias, (1, 1), (1, 1), (1, 1)))
    print(f"conv grid {fmt}: rel err {e:.1e}"); assert e < 1e-2, e  # TF32 allowed by default
x, first, core, last, bias = r(5, 96), r(16, 96), r(24, 16), r(48, 24), r(48)
e = rel(ops.tucker_linear(x, first, core, last, bias), reference.tucker_linear(x, first, core, last, bias))
print(f"linear grid: rel err {e:.1e}"); assert e < 1e-4, e
torch.cuda.synchronize()
EOF
then echo "whole-GPU kernels: ok"
else
  echo "WHOLE-GPU KERNELS FAILED (rc $?): their tests, the sweep and the benchmark's grid column are left out"
  status=1
  GRID_DESELECT=(-k "not whole_gpu and not grid and not random_configurations")
  BENCH_GRID=(--no-grid)
fi

stage "CUDA tests"
# Spread over worker processes when pytest-xdist is there (one GPU, many CPU
# cores: the tests are small), and bound each test when pytest-timeout is.
PARALLEL=()
"$PY" -c 'import xdist' 2>/dev/null && PARALLEL+=(-n 8)
"$PY" -c 'import pytest_timeout' 2>/dev/null && PARALLEL+=(--timeout 150)
if TUCKER_OPS_TEST_DEVICES=cuda timeout 200 "$PY" -m pytest -q -p no:cacheprovider "${PARALLEL[@]}" "${GRID_DESELECT[@]}" \
    tests/test_cuda_build.py tests/test_cuda.py >"$LOGS/gpu_check_tests.log" 2>&1; then
  tail -n 5 "$LOGS/gpu_check_tests.log"
  echo "CUDA tests passed"
else
  grep -E "^(FAILED|ERROR)|Error|error:|assert" "$LOGS/gpu_check_tests.log" | head -n 60
  tail -n 25 "$LOGS/gpu_check_tests.log"
  echo "CUDA TESTS FAILED (log: $LOGS/gpu_check_tests.log)"
  status=1
fi

stage "GPU benchmark"
if ! timeout 240 "$PY" benchmarks/bench_gpu.py "${BENCH_GRID[@]}" --out "$RESULTS" 2>&1 | tee "$LOGS/gpu_check_bench.log"; then
  echo "BENCHMARK FAILED OR TIMED OUT (log: $LOGS/gpu_check_bench.log)"
  status=1
fi

# Out-of-bounds reads and writes on a few small random configurations, both
# paths, every cluster size, the tensor-core kernel (and its trial variants) and both whole-GPU kernels
# (compute-sanitizer is slow: bounded, and reported, not fatal on timeout).
if command -v compute-sanitizer >/dev/null && [ "${GPU_CHECK_SANITIZER:-1}" = 1 ]; then
  stage "compute-sanitizer memcheck (bounded to 60 s)"
  TUCKER_OPS_TEST_DEVICES=cuda timeout 60 compute-sanitizer --tool memcheck --error-exitcode 3 \
    "$PY" -m pytest -q -p no:cacheprovider -x tests/test_cuda.py \
    -k "random_configurations and (cuda-0] or cuda-1] or cuda-2] or cuda-3] or cuda-4] or cuda-5] or cuda-8]) or row_blocks_and_output_splits and tucker2 and cuda-9- or every_cluster_size and float32 and (resnet or dilated) or tensor_core_kernel and contiguous and (odd_sizes or ranks_128 or dilated) or linear_whole_gpu_kernel and cuda-torch.float32 and tucker2 or linear_whole_gpu_kernel and cuda-torch.bfloat16 and wide and tucker2 or conv_whole_gpu_kernel and cuda-torch.float32-resnet-tucker2-contiguous or conv_whole_gpu_kernel and cuda-torch.bfloat16-strided and channels_last or trial_switches and (bfloat16 and (odd_sizes or dilated or many_tiles) or float32 and odd_sizes)" \
    >"$LOGS/gpu_check_sanitizer.log" 2>&1
  rc=$?
  grep -E "Invalid|ERROR SUMMARY|passed|failed" "$LOGS/gpu_check_sanitizer.log" | tail -n 15
  case $rc in
    0) echo "memcheck: clean" ;;
    124) echo "memcheck: timed out (partial log: $LOGS/gpu_check_sanitizer.log)" ;;
    *) echo "MEMCHECK FOUND ERRORS OR FAILED (rc $rc, log: $LOGS/gpu_check_sanitizer.log)"; status=1 ;;
  esac
fi
echo "gpu_check: exit status $status"
exit $status
