"""How far the CPU conv's float32 results are from float64, per core algorithm.

    python benchmarks/winograd_accuracy.py [--batch 4]

For each 3x3 or 5x5 stride-1 benchmark conv (cases.py, and layer_sweep.py's 5x5 layer),
runs the fused op in float32 with the core forced direct, Winograd F(2x2, 3x3) and F(4x4,
3x3), or for 5x5 F(2x2, 5x5) (TUCKER_OPS_CONV_CORE), forward and
backward of a fixed output gradient, and prints each result's largest error against the same
op in float64 (direct core), relative to that tensor's largest value. The batch must give at
least two images per thread for the backward to run Winograd.
"""

from __future__ import annotations

import argparse
import os

import torch

import tucker_ops  # noqa: F401  (registers the ops)
import layer_sweep
from cases import CASES, build

ALGOS = {3: ("direct", "winograd2", "winograd4"), 5: ("direct", "winograd2")}
NAMES = ("output", "input", "first", "core", "last", "bias")


def _run(layer, case, x, dtype):
    # absent factors stay None: the op's arguments in order (a Tucker-1 side has none)
    inputs = [t.detach().to(dtype).requires_grad_() if t is not None else None
              for t in (x, layer.first, layer.core, layer.last, layer.bias)]
    pad = [case.padding] * 2
    y = torch.ops.tucker_ops.tucker_conv2d(*inputs, [1, 1], pad, [1, 1])
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    y.backward(gy)
    return [y.detach()] + [t.grad if t is not None else None for t in inputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    print(f"batch {args.batch}, {torch.get_num_threads()} threads; max |float32 - float64| / max |float64|\n")
    print("| case | core | " + " | ".join(NAMES) + " |\n|---|---|" + "---|" * len(NAMES))
    previous = os.environ.get("TUCKER_OPS_CONV_CORE")
    try:
        for case in layer_sweep.LAYERS:
            if case.kernel == 5:
                CASES[case.name] = case
        for name, case in CASES.items():
            if case.kind != "conv" or case.kernel not in ALGOS or case.stride != 1:
                continue
            layer = build(name)
            x = layer.input(args.batch)
            os.environ["TUCKER_OPS_CONV_CORE"] = "direct"
            want = _run(layer, case, x, torch.float64)
            for algo in ALGOS[case.kernel]:
                os.environ["TUCKER_OPS_CONV_CORE"] = algo
                got = _run(layer, case, x, torch.float32)
                errors = [
                    f"{((g.double() - w).abs().max() / w.abs().max()).item():.1e}" if w is not None else "-"
                    for g, w in zip(got, want)
                ]
                print(f"| {name} | {algo} | " + " | ".join(errors) + " |")
    finally:
        if previous is None:
            os.environ.pop("TUCKER_OPS_CONV_CORE", None)
        else:
            os.environ["TUCKER_OPS_CONV_CORE"] = previous


if __name__ == "__main__":
    main()
