"""benchmarks/bench_gpu.py's report, on made-up rows: it runs only on a GPU, so its
arithmetic (targets, the fastest-path reading) is checked here on every machine."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def _bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def _row(case, batch, fused, seq, dense, chain, kernel, grid=None, dtype="bfloat16", flop_ratio=0.2):
    r = {
        "case": case, "dtype": dtype, "batch": batch, "fused_ms": fused, "sequential_ms": seq, "dense_ms": dense,
        "chain_ms": chain, "kernel_ms": kernel, "block_ms": 9.0, "flop_ratio": flop_ratio,
        "vs_seq": seq / fused, "vs_dense": dense / fused, "bw_frac": 0.0, "flop_frac": 0.0, "err": 0.0,
    }
    if grid is not None:
        r["grid_ms"] = grid
    return r


def test_best_path_skips_failed_columns() -> None:
    bench = _bench_gpu()
    r = _row("a", 1, fused=1.0, seq=2.0, dense=1.5, chain=1.2, kernel=0.8, grid=float("nan"))
    assert bench.best_path(r) == ("kernel", 0.8)
    r["grid_ms"] = 0.5
    assert bench.best_path(r) == ("grid", 0.5)


def test_report_targets_for_the_op_and_for_the_fastest_paths() -> None:
    bench = _bench_gpu()
    rows = [
        # The op ties the chain here; the grid column would beat Sequential and dense.
        _row("lin", 1, fused=1.0, seq=0.9, dense=0.5, chain=1.0, kernel=2.0, grid=0.4),
        _row("conv", 8, fused=0.5, seq=1.0, dense=0.6, chain=1.1, kernel=0.5),
        _row("conv", 32, fused=1.0, seq=1.2, dense=2.0, chain=1.0, kernel=3.0, flop_ratio=0.7),
    ]
    report = bench.render(rows, "card", 1e12, {}, "cmd")
    shipped, ideal = report.split("## Targets with the fastest forced path per row")
    ideal, misses = ideal.split("## Rows where a forced path beats")
    # Shipped: geomean of 0.9 and 2.0; the worst row is lin@1; lin@1 loses to dense (conv@32 has flop_ratio > 1/2).
    assert f"geomean vs seq at batch <= 8: {math.sqrt(0.9 * 2.0):.2f}x (target >= 1.5x: NOT met)" in shipped
    assert "min vs seq at batch <= 32: 0.90x at lin@1 (target >= 1.0x: NOT met)" in shipped
    assert "slower than dense where chain FLOPs <= 1/2 dense: lin@1" in shipped
    # Ideal: lin@1 runs in 0.4 ms (grid): 2.25x; every target met.
    assert f"geomean vs seq at batch <= 8: {math.sqrt(2.25 * 2.0):.2f}x (target >= 1.5x: met)" in ideal
    assert "min vs seq at batch <= 32: 1.20x at conv@32 (target >= 1.0x: met)" in ideal
    assert "none (target met)" in ideal
    assert "| lin | bfloat16 | 1 | 1.0000 | grid | 0.4000 | 2.50x |" in misses
    assert "| conv |" not in misses
