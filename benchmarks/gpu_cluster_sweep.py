"""GPU time of the fused conv kernel at every thread-block cluster size (sm_90+).

    python benchmarks/gpu_cluster_sweep.py [--out sweep.md] [--cases resnet50_3x3,vgg_128]

For each conv case of bench_gpu.py, dtype and batch, the op is run with its
fused kernel forced (TUCKER_OPS_CUDA_FUSED=1): the CUDA-core kernels with
TUCKER_OPS_CUDA_CLUSTER set to 0 (one block per tile), 2, 4 and 8, then the
tensor-core kernel, streaming (TUCKER_OPS_CUDA_TC_RESIDENT=0: the variant its
time model describes; bfloat16, and float32 through TF32 under torch's default
cuDNN flags), resident (=1, the default: the factors kept in shared memory by
persistent blocks, where they fit with the streaming plan's chunks; elsewhere
the column times the streaming kernel again), and resident with each trial
switch on (opt-in until timed): NCHW input packed through shared-memory tiles
(TUCKER_OPS_CUDA_TC_TILED_PACK=1) and step 3's narrow output runs where W_out
is not a multiple of 8 (TUCKER_OPS_CUDA_TC_NARROW_RUNS=1), each call a CUDA-graph replay,
so the table is GPU time alone:
the data behind the op's choice of kernel and cluster size and its
fused-or-chain time models (csrc/cuda/conv_fused*.cu).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from bench_gpu import CASES, Layer, graphed, time_ms

SIZES = ("0", "2", "4", "8")  # TUCKER_OPS_CUDA_CLUSTER, with TUCKER_OPS_CUDA_TC=0
COLUMNS = (*SIZES, "tc", "tc_resident", "tc_tiled_pack", "tc_narrow_runs")
TITLES = {"tc": "tensor cores", "tc_resident": "tensor cores, resident",
          "tc_tiled_pack": "tensor cores, resident, tiled packing",
          "tc_narrow_runs": "tensor cores, resident, narrow output runs"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/gpu_cluster_sweep.md.draft")
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--cases", default="", help="comma-separated conv case names (default: all)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--columns", default=",".join(COLUMNS),
                        help="comma-separated subset of " + ",".join(COLUMNS)
                        + " (cluster sizes, tc, tc_resident, tc_tiled_pack, tc_narrow_runs)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_cluster_sweep.py: no CUDA GPU; nothing to measure", file=sys.stderr)
        return 2
    columns = [c for c in COLUMNS if c in args.columns.split(",")]
    cases = [c for c in CASES if c.kind == "conv" and (not args.cases or c.name in args.cases.split(","))]
    rows = []
    with torch.inference_mode():
        for c in cases:
            for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
                layer = Layer(c, dtype)
                op = layer.impls()["fused"]
                for batch in (int(b) for b in args.batches.split(",")):
                    x = layer.input(batch)
                    times = {}
                    for column in columns:
                        env = {"TUCKER_OPS_CUDA_FUSED": "1", "TUCKER_OPS_CUDA_TC": "1",
                               "TUCKER_OPS_CUDA_TC_RESIDENT": "0" if column == "tc" else "1",
                               "TUCKER_OPS_CUDA_TC_TILED_PACK": "1" if column == "tc_tiled_pack" else "0",
                               "TUCKER_OPS_CUDA_TC_NARROW_RUNS": "1" if column == "tc_narrow_runs" else "0"}
                        if column in SIZES:
                            env.update(TUCKER_OPS_CUDA_CLUSTER=column, TUCKER_OPS_CUDA_TC="0")
                        os.environ.update(env)
                        try:
                            times[column] = time_ms(graphed(op, x), args.reps, 3)
                        finally:
                            for key in env:
                                del os.environ[key]
                    row = {"case": c.name, "dtype": str(dtype).removeprefix("torch."), "batch": batch, **times}
                    rows.append(row)
                    print(f"{c.name:14s} {row['dtype']:8s} b={batch:<4d} "
                          + "  ".join(f"{c} {t:.4f}" for c, t in times.items()), flush=True)
    lines = [
        f"# Fused conv kernel GPU time (ms, CUDA-graph replay) per cluster size: {torch.cuda.get_device_name()}",
        "",
        "| case | dtype | batch | " + " | ".join(TITLES.get(c, f"cluster {c}") for c in columns) + " |",
        "|---|---|---:|" + "---:|" * len(columns),
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['dtype']} | {r['batch']} | " + " | ".join(f"{r[c]:.4f}" for c in columns) + " |")
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
