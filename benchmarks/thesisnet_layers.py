"""Per-layer wall time of the whole ThesisNet forward, dense against compressed-fused.

    python benchmarks/thesisnet_layers.py [--batch 10000] [--threads 2]

Each layer (and each ReLU / pool between them) is timed on the activation the
previous one produced (best of 5 loops of about 20 ms, after one warm-up call),
in inference mode.
It shows where a whole-network time goes; it is not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

import tucker_ops

STEPS = ("conv1", "relu", "pool", "conv2", "relu", "pool", "flatten", "l1", "relu", "l2", "relu", "l_out")


def _best_ms(fn, repeats: int = 5) -> float:
    """Best over `repeats` of the mean time of a loop of calls lasting about 20 ms."""
    start = time.perf_counter()
    fn()
    calls = max(1, int(0.02 / max(time.perf_counter() - start, 1e-7)))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = tucker_ops.ThesisNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # l1's rank 200 > 120 outputs: zero padding, as in the thesis
        fused, _ = tucker_ops.compress(dense, ranks=tucker_ops.thesis_ranks())
    fused.eval()
    x = torch.randn(args.batch, 1, 28, 28)
    with torch.inference_mode():
        for name, model in (("dense", dense), ("compressed-fused", fused)):
            print(f"{name}: whole forward {_best_ms(lambda: model(x)):.4f} ms (batch {args.batch}, {args.threads} threads)")
            h = x
            for step in STEPS:
                if step == "relu":
                    fn = lambda h=h: F.relu(h)  # noqa: E731
                elif step == "pool":
                    fn = lambda h=h: model.pool(h)  # noqa: E731
                elif step == "flatten":
                    fn = lambda h=h: h.flatten(1)  # noqa: E731
                else:
                    fn = lambda h=h, layer=getattr(model, step): layer(h)  # noqa: E731
                print(f"  {step:8s} {_best_ms(fn):9.4f} ms  input {tuple(h.shape)}")
                h = fn()


if __name__ == "__main__":
    main()
