"""Fit the whole-GPU kernels' time models to bench_gpu.py's CUDA-graph replays.

    python benchmarks/fit_grid_model.py benchmarks/gpu_runs/2026-11-27_run5_graphs.json

The op chooses conv_grid.cu / linear_grid.cu for eager calls where
``max(host, model)`` beats the other paths (grid_conv_chosen, grid_linear_chosen).
The model is a fixed cost plus multiply-adds and bytes at fitted rates:

    seconds = fixed + macs / macs_per_second + bytes / bytes_per_second

with the same counts as grid_conv_seconds / grid_linear_seconds in C++. The
fixed cost is held at the value the C++ uses; the two rates are fitted by
non-negative least squares to the "grid ms" column of a --graphs run (GPU time,
no host overhead). Prints the fitted rates, the C++ constants, and how far the
C++ model's predictions lie from the measured times.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import CASES, Case, chain_macs, out_size  # noqa: E402

ELEMENT_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
# (kind, dtype group) -> (fixed seconds, macs/s, bytes/s) as in csrc/cuda/conv_grid.cu
# and linear_grid.cu; float32 convs with TF32 (torch's default for convolutions).
CPP_MODEL = {
    ("conv", "float32"): (24e-6, 10.5e12, 1.42e12),
    ("conv", "16-bit"): (24e-6, 15e12, 0.7e12),
    ("linear", "float32"): (12e-6, 3.6e12, 16e12),
    ("linear", "16-bit"): (12e-6, 21.6e12, 0.76e12),
}


def elements(c: Case, batch: int) -> float:
    """Elements the kernel moves: grid_conv_seconds / grid_linear_seconds's count."""
    r_in, r_out = c.ranks[0] or c.c_in, c.ranks[1] or c.c_out
    first = c.c_in * r_in if c.ranks[0] else 0
    last = r_out * c.c_out if c.ranks[1] else 0
    if c.kind == "linear":
        return batch * (c.c_in + c.c_out) + first + r_in * r_out + last
    k = c.kernel
    pin, pout = batch * c.size * c.size, batch * out_size(c) ** 2
    return (2 * pin * c.c_in + pout * c.c_out + (2 * pin * r_in + first if c.ranks[0] else 0)
            + (2 * pout * r_out + last if c.ranks[1] else 0) + r_out * r_in * k * k)


def nonnegative_fit(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares over the non-negative coefficients (two unknowns: try each support)."""
    best, best_err = np.zeros(a.shape[1]), float(np.sum(y * y))
    for support in ([0, 1], [0], [1]):
        coef = np.zeros(a.shape[1])
        sol, *_ = np.linalg.lstsq(a[:, support], y, rcond=None)
        if np.any(sol < 0):
            continue
        coef[support] = sol
        err = float(np.sum((a @ coef - y) ** 2))
        if err < best_err:
            best, best_err = coef, err
    return best


def fit(rows: list[dict]) -> dict[tuple[str, str], tuple[float, float, float, float]]:
    """Per (kind, dtype group): fitted multiply-adds/s and bytes/s (inf where a term drops
    out), and the range of the C++ model's predicted / measured times."""
    cases = {c.name: c for c in CASES}
    groups: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for r in rows:
        t = r.get("grid_ms", float("nan"))
        if not math.isfinite(t) or r["dtype"] not in ELEMENT_SIZE:
            continue
        c = cases[r["case"]]
        group = (c.kind, "float32" if r["dtype"] == "float32" else "16-bit")
        macs = float(chain_macs(c, r["batch"])[0])
        nbytes = elements(c, r["batch"]) * ELEMENT_SIZE[r["dtype"]]
        groups.setdefault(group, []).append((macs, nbytes, t * 1e-3))
    result = {}
    for group, data in sorted(groups.items()):
        fixed, cpp_macs, cpp_bytes = CPP_MODEL[group]
        a = np.array([[m, b] for m, b, _ in data])
        y = np.array([t for *_, t in data])
        coef = nonnegative_fit(a, y - fixed)
        ratio = (fixed + a[:, 0] / cpp_macs + a[:, 1] / cpp_bytes) / y
        rates = [1 / x if x > 0 else math.inf for x in coef]
        result[group] = (rates[0], rates[1], float(ratio.min()), float(ratio.max()))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graphs_json", help="the .json next to a bench_gpu.py --graphs results file")
    args = parser.parse_args(argv)
    for group, (macs, nbytes, lo, hi) in fit(json.loads(Path(args.graphs_json).read_text(encoding="utf-8"))).items():
        _, cpp_macs, cpp_bytes = CPP_MODEL[group]
        print(f"{group[0]:6s} {group[1]:8s} fitted: {macs / 1e12:.2f} Tmac/s, {nbytes / 1e12:.2f} TB/s  |  "
              f"C++: {cpp_macs / 1e12:.2f} Tmac/s, {cpp_bytes / 1e12:.2f} TB/s, fixed {CPP_MODEL[group][0] * 1e6:.0f} us; "
              f"predicted / measured {lo:.2f}-{hi:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
