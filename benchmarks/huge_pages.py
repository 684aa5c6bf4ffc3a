"""What asking for transparent huge pages (csrc/cpu/fresh_tensors.h) is worth: the fused op
with TUCKER_OPS_HUGE_PAGES=1 (the default) against =0, per ``case:batch``, forward (inference)
and a training step (forward + backward of ``output.sum()``).

    python benchmarks/huge_pages.py vgg_128:32 resnet50_3x3:32 linear_4096:32

The setting is read when the extension loads, so each variant runs in its own interpreter;
the two alternate for --repeats rounds (contention on the shared machine hits both alike),
each reporting its minimum over --calls calls, and the table shows each variant's best.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import sys, time, torch
sys.path.insert(0, {here!r})
from cases import build
layer = build({name!r})
fused, params = layer.impls()["fused"], layer.params()
x = layer.input({batch})
def best(fn):
    fn()
    times = []
    for _ in range({calls}):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return min(times)
with torch.inference_mode():
    forward = best(lambda: fused(x))
xg = x.clone().requires_grad_()
def step():
    xg.grad = None
    for p in params:
        p.grad = None
    fused(xg).sum().backward()
print(forward, best(step))
"""


def run(name: str, batch: int, calls: int, huge: str) -> tuple[float, float]:
    code = CHILD.format(here=HERE, name=name, batch=batch, calls=calls)
    env = {**os.environ, "TUCKER_OPS_HUGE_PAGES": huge}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    forward, step = (float(v) for v in out.stdout.split())
    return forward, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", metavar="CASE:BATCH")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("| case | forward, huge pages | forward, 4 KiB pages | ratio | step, huge pages | step, 4 KiB pages | ratio |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.cases:
        name, batch = spec.split(":")
        best = {"1": [float("inf")] * 2, "0": [float("inf")] * 2}
        for _ in range(args.repeats):
            for huge in ("1", "0"):
                best[huge] = [min(a, b) for a, b in zip(best[huge], run(name, int(batch), args.calls, huge))]
        (f1, s1), (f0, s0) = best["1"], best["0"]
        print(f"| {spec} | {f1 * 1e3:.2f} ms | {f0 * 1e3:.2f} ms | {f0 / f1:.2f}x "
              f"| {s1 * 1e3:.2f} ms | {s0 * 1e3:.2f} ms | {s0 / s1:.2f}x |")


if __name__ == "__main__":
    main()
