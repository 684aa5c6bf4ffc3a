#!/usr/bin/env bash
# Everything a lent GPU is for, in one call (device time is scarce: one call,
# then the machine goes back). About 5-6 minutes on an H200, at most 580 s
# (the device tool allows 600 s a call):
#   1. benchmarks/gpu_check.sh: build, smoke, CUDA tests, eager benchmark, memcheck;
#   2. bench_gpu.py --graphs: GPU time alone (CUDA-graph replays);
#   3. gpu_cluster_sweep.py --columns tc,tc_resident,tc_tiled_pack,tc_narrow_runs:
#      the tensor-core kernel, its resident variant, and that with each trial
#      switch on, for fit_tc_model.py --sweep;
#   4. profile_eager.py: host time and kernels per eager call.
# Each later stage is bounded and runs whatever an earlier one did (a failed
# test run still leaves the build for the benchmarks).
#
#   benchmarks/gpu_session.sh OUT_DIR
#
# OUT_DIR gets every result, its .json, and each stage's log; with the device
# tool, pass a folder and tar it into $OUT (at most 8 files come back):
#   bash benchmarks/gpu_session.sh /tmp/w; tar czf "$OUT/gpu_run.tgz" -C /tmp/w .
# Then, here: fit_grid_model.py on graphs.md.json, fit_tc_model.py --sweep on
# sweep.md.json, fit_chain_model.py --replay on RESULTS_GPU.md.draft.json with
# --graphs graphs.md.json (benchmarks/RESULTS_GPU.md, "Changes since run 7").
set -uo pipefail
cd "$(dirname "$0")/.."
W="${1:?usage: benchmarks/gpu_session.sh OUT_DIR}"
mkdir -p "$W"
W="$(cd "$W" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
status=0

run() {  # run NAME SECONDS COMMAND...: bounded, logged to $W/NAME.log, status kept
  local name=$1 seconds=$2
  shift 2
  printf '\n=== %s (%s)\n' "$name" "$(date +%T)"
  timeout "$seconds" "$@" >"$W/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$W/$name.log"
  echo "--- $name: exit $rc"
  [ "$rc" = 0 ] || status=1
}

run gpu_check 300 bash benchmarks/gpu_check.sh "$W/RESULTS_GPU.md.draft"
run graphs 110 "$PY" benchmarks/bench_gpu.py --graphs --reps 3 --out "$W/graphs.md"
run sweep 130 "$PY" benchmarks/gpu_cluster_sweep.py --reps 3 --columns tc,tc_resident,tc_tiled_pack,tc_narrow_runs --out "$W/sweep.md"
run profile 40 "$PY" benchmarks/profile_eager.py --out "$W/profile.md"
printf '\n=== done (%s), status %s; files in %s:\n' "$(date +%T)" "$status" "$W"
ls -la "$W"
exit "$status"
