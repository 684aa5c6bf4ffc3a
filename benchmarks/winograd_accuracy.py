"""How far the CPU conv's float32 results are from float64, per core algorithm.

    python benchmarks/winograd_accuracy.py [--batch 4]

For each 3x3 stride-1 benchmark conv (cases.py), runs the fused op in float32 with the core
forced direct, Winograd F(2x2, 3x3) and F(4x4, 3x3) (TUCKER_OPS_CONV_CORE), forward and
backward of a fixed output gradient, and prints each result's largest error against the same
op in float64 (direct core), relative to that tensor's largest value. The batch must give at
least two images per thread for the backward to run Winograd.
"""

from __future__ import annotations

import argparse
import os

import torch

import tucker_ops  # noqa: F401  (registers the ops)
from cases import CASES, build

ALGOS = ("direct", "winograd2", "winograd4")
NAMES = ("output", "input", "first", "core", "last", "bias")


def _run(layer, case, x, dtype):
    inputs = [t.detach().to(dtype).requires_grad_() for t in (x, *layer.params())]
    pad = [case.padding] * 2
    y = torch.ops.tucker_ops.tucker_conv2d(*inputs, [1, 1], pad, [1, 1])
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    y.backward(gy)
    return [y.detach()] + [t.grad for t in inputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    print(f"batch {args.batch}, {torch.get_num_threads()} threads; max |float32 - float64| / max |float64|\n")
    print("| case | core | " + " | ".join(NAMES) + " |\n|---|---|" + "---|" * len(NAMES))
    previous = os.environ.get("TUCKER_OPS_CONV_CORE")
    try:
        for name, case in CASES.items():
            if case.kind != "conv" or case.kernel != 3 or case.stride != 1:
                continue
            layer = build(name)
            x = layer.input(args.batch)
            os.environ["TUCKER_OPS_CONV_CORE"] = "direct"
            want = _run(layer, case, x, torch.float64)
            for algo in ALGOS:
                os.environ["TUCKER_OPS_CONV_CORE"] = algo
                got = _run(layer, case, x, torch.float32)
                errors = [((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want)]
                print(f"| {name} | {algo} | " + " | ".join(f"{e:.1e}" for e in errors) + " |")
    finally:
        if previous is None:
            os.environ.pop("TUCKER_OPS_CONV_CORE", None)
        else:
            os.environ["TUCKER_OPS_CONV_CORE"] = previous


if __name__ == "__main__":
    main()
