"""benchmarks/bench_gpu.py's report, on made-up rows: it runs only on a GPU, so its
arithmetic (targets, the fastest-path reading) is checked here on every machine."""

from __future__ import annotations

import importlib.util
import math
import os
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


def test_time_interleaved_samples_columns_in_rotating_turn_under_their_switches(monkeypatch) -> None:
    bench = _bench_gpu()
    monkeypatch.delenv("TUCKER_OPS_TEST_SWITCH", raising=False)
    log = []
    # Per-call times each column's samples report, in order: "a" warms up, sizes its loop
    # (1 ms per call: 2 calls per 2 ms sample), then is sampled 3 times.
    per_call = {"a": iter([1.0, 1.0, 5.0, 2.0]), "b": iter([0.5, 4.0, 3.0, 1.0])}

    def make(name):
        def run():
            log.append(("call", name, os.environ.get("TUCKER_OPS_TEST_SWITCH")))
        return run

    def measure(run, calls):
        run()  # one call tells the fake which column it measures
        name = log[-1][1]
        log.append(("sample", name, calls))
        return next(per_call[name]) * calls

    columns = {"a": (make("a"), {}), "b": (make("b"), {"TUCKER_OPS_TEST_SWITCH": "1"})}
    times = bench.time_interleaved(columns, reps=3, warmup=2, target_ms=2.0, measure=measure)
    samples = [(name, calls) for kind, name, calls in log if kind == "sample"]
    # Warm-up and sizing per column, then one sample of each column per repetition, in turn,
    # repetition i starting at column i (mod 2): a b, then b a, then a b.
    assert samples == [("a", 1), ("b", 1), ("a", 2), ("b", 4), ("b", 4), ("a", 2), ("a", 2), ("b", 4)]
    assert times == {"a": 2.0, "b": 3.0}  # medians of (1, 5, 2) and (4, 3, 1)
    # Each column ran under its own switches only, and the environment is restored.
    assert {switch for kind, name, switch in log if kind == "call" and name == "a"} == {None}
    assert {switch for kind, name, switch in log if kind == "call" and name == "b"} == {"1"}
    assert "TUCKER_OPS_TEST_SWITCH" not in os.environ
