"""benchmarks/fit_chain_model.py: the fits of the chain's eager cost and the replay of the
op's path rule on recorded rows (no GPU needed)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
fit_chain_model = pytest.importorskip("fit_chain_model")
CASES = {c.name: c for c in fit_chain_model.CASES}


def _row(case: str, dtype: str, batch: int, **ms: float) -> dict:
    c = CASES[case]
    row = {"case": case, "dtype": dtype, "batch": batch, "flop_ratio": 0.1, "run": "synthetic"}
    for column in ("fused", "sequential", "dense", "chain", "kernel", "block", "grid"):
        row[f"{column}_ms"] = ms.get(column, math.nan)
    if fit_chain_model.group(c, dtype) == ("conv", "float32"):
        row["sequential_ms"] = ms.get("chain", math.nan)  # the float32 chain is timed by this column
    return row


def test_fit_recovers_the_constants_that_generated_the_rows() -> None:
    call, rate = 20e-6, 10e12
    rows = []
    for c in fit_chain_model.CASES:
        for dtype in ("float32", "bfloat16"):
            for batch in (1, 8, 32, 128):
                seconds = fit_chain_model.chain_seconds(c, batch, call, rate)
                rows.append(_row(c.name, dtype, batch, chain=seconds * 1e3))
    fitted = fit_chain_model.fit(rows)
    assert set(fitted) == {("conv", "float32"), ("conv", "16-bit"), ("linear", "float32"), ("linear", "16-bit")}
    for group, f in fitted.items():
        assert f["call"] == pytest.approx(call, rel=1e-6), group
        assert f["rate"] == pytest.approx(rate, rel=1e-6), group
        assert f["flat"] > call  # the flat fit takes the multiply-adds into its price
        # The C++ price (24 us per call) against these times: from its ratio at the
        # smallest rows down to far below them at the largest.
        assert f["lo"] < 1.0 < f["hi"] <= fit_chain_model.CPP_CALL_SECONDS / call


def test_the_rule_picks_a_path_by_the_chain_cost() -> None:
    r50 = CASES["r50_256@14"]
    # Batch 32 in float32: the whole-GPU kernel's model (about 84 us) lies between the
    # C++ chain price (3 x 24 us) and 3 x 30 us; the tile kernel's model is above both.
    assert fit_chain_model.chosen_path(r50, "float32", 32, 3 * 24e-6, math.inf) == "chain"
    assert fit_chain_model.chosen_path(r50, "float32", 32, 3 * 30e-6, math.inf) == "grid"
    # bfloat16 at batch 8: the tile kernel's model (about 35 us) beats the whole-GPU one.
    assert fit_chain_model.chosen_path(r50, "bfloat16", 8, 3 * 24e-6, math.inf) == "kernel"
    # Without `first` the tensor-core kernel does not apply: the CUDA-core stand-in decides.
    conv1 = CASES["thesis_conv1"]
    assert fit_chain_model.chosen_path(conv1, "float32", 1, 2 * 24e-6, 10e-6) == "kernel"
    assert fit_chain_model.chosen_path(conv1, "float32", 1, 2 * 24e-6, 60e-6) == "chain"
    # linear_fused.cu takes small factor sets whatever the chain costs; linear_4096's
    # factors are too large for it.
    assert fit_chain_model.chosen_path(CASES["thesis_l2"], "float32", 1, 0.0, math.inf) == "kernel"
    assert fit_chain_model.chosen_path(CASES["linear_4096"], "float32", 1, 3 * 24e-6, math.inf) == "grid"
    assert fit_chain_model.chosen_path(CASES["linear_4096"], "float32", 128, 3 * 24e-6, math.inf) == "chain"


def test_replay_times_each_row_by_its_chosen_path(tmp_path: Path) -> None:
    rows = [
        _row("r50_256@14", "float32", 32, chain=0.11, kernel=0.12, grid=0.08, dense=0.05),
        _row("r50_256@14", "bfloat16", 8, chain=0.10, kernel=0.04, grid=0.03, dense=0.06),
    ]
    graphs = [{"case": r["case"], "dtype": r["dtype"], "batch": r["batch"], "kernel_ms": 1.0} for r in rows]
    flat = fit_chain_model.replay(rows, graphs, fit_chain_model.flat_cost(24e-6))
    assert [r["path"] for r in flat] == ["chain", "kernel"]
    assert [r["fused_ms"] for r in flat] == [0.11, 0.04]  # float32's chain: the Sequential column
    dearer = fit_chain_model.replay(rows, graphs, fit_chain_model.flat_cost(30e-6))
    assert [r["path"] for r in dearer] == ["grid", "kernel"] and dearer[0]["fused_ms"] == 0.08
    # The command line: fits and replays the rows of the given files.
    path = tmp_path / "run_eager.json"
    path.write_text(json.dumps([{k: v for k, v in r.items() if k != "run"} for r in rows]), encoding="utf-8")
    graphs_path = tmp_path / "graphs.json"
    graphs_path.write_text(json.dumps(graphs), encoding="utf-8")
    assert fit_chain_model.main([str(path), "--replay", "--prices", "24,30", "--graphs", str(graphs_path)]) == 0


def test_capture_replay_takes_the_kernel_only_below_the_floor() -> None:
    # Synthetic rows: thesis_conv1 (two chain calls, no tensor-core kernel: the CUDA-core
    # stand-in decides) with the stand-in under and over the 2 x 6 us floor.
    row = {"case": "thesis_conv1", "dtype": "float32", "batch": 1, "chain_ms": 0.010, "kernel_ms": 0.005,
           "sequential_ms": 0.010}
    fast = [{"case": "thesis_conv1", "dtype": "float32", "batch": 1, "kernel_ms": 0.011}]
    slow = [{**fast[0], "kernel_ms": 0.013}]
    took = fit_chain_model.replay_capture([row], fast, 6e-6)
    assert took["picks"] == 1 and took["gain"] == pytest.approx(2.0) and took["vs_seq"] == pytest.approx(2.0)
    kept = fit_chain_model.replay_capture([row], slow, 6e-6)
    assert kept["picks"] == 0 and kept["vs_seq"] == pytest.approx(1.0)


def test_capture_floor_gains_on_the_recorded_graph_runs() -> None:
    # The C++ floor (kChainReplayCallSeconds) on runs 8-9's CUDA-graph tables: the
    # rows it moves to the kernel are faster there than the chain's replay, on
    # geometric mean (RESULTS_GPU.md, "Since run 10").
    run6 = json.loads(fit_chain_model.DEFAULT_GRAPHS.read_text(encoding="utf-8"))
    for name in ("2026-11-28_run8_graphs.json", "2026-11-28_run9_graphs.json"):
        rows = json.loads((fit_chain_model.RUNS / name).read_text(encoding="utf-8"))
        r = fit_chain_model.replay_capture(rows, run6, fit_chain_model.CPP_REPLAY_CALL_SECONDS)
        assert r["picks"] > 0 and r["gain"] > 1.1 and r["worst"] > 0.85, (name, r)


def test_capture_replay_of_the_linear_rule_keeps_16_bit_on_the_chain() -> None:
    # thesis_l2's factors (6 K elements) are under the captured limit: its fused kernel
    # in float32, the chain in bfloat16 (the kernel lost every bfloat16 graph row).
    rows = [{"case": "thesis_l2", "dtype": dtype, "batch": 8, "chain_ms": 0.006, "kernel_ms": 0.012,
             "sequential_ms": 0.006} for dtype in ("float32", "bfloat16")]
    fp32 = fit_chain_model.replay_capture(rows[:1], [], 6e-6, "linear")
    bf16 = fit_chain_model.replay_capture(rows[1:], [], 6e-6, "linear")
    assert fp32["picks"] == 1 and fp32["vs_seq"] == pytest.approx(0.5)
    assert bf16["picks"] == 0 and bf16["vs_seq"] == pytest.approx(1.0)
    # thesis_l1 (64 K elements) stays on the chain in both.
    l1 = [{**rows[0], "case": "thesis_l1"}]
    assert fit_chain_model.replay_capture(l1, [], 6e-6, "linear")["picks"] == 0
