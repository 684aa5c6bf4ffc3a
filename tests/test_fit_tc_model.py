"""benchmarks/fit_tc_model.py: the tensor-core kernel's plan restated, and the fit of its
time model (no GPU needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
fit_tc_model = pytest.importorskip("fit_tc_model")
CASES = {c.name: c for c in fit_tc_model.CASES}


def _rows(round_seconds: float, rate: float) -> list[dict]:
    rows = []
    for c in fit_tc_model.CASES:
        for dtype in ("float32", "bfloat16"):
            for batch in (1, 8, 32, 128):
                t = fit_tc_model.tc_terms(c, dtype, batch)
                seconds = fit_tc_model.predict(t, round_seconds, rate) if t is not None else 1.0
                rows.append({"case": c.name, "dtype": dtype, "batch": batch, "seconds": seconds})
    return rows


def test_fit_recovers_the_constants_that_generated_the_rows() -> None:
    round_seconds, rate, used = fit_tc_model.fit(_rows(2e-6, 900e9))
    assert round_seconds == pytest.approx(2e-6, rel=1e-6) and rate == pytest.approx(900e9, rel=1e-6)
    # Rows where the kernel does not apply (timed 1 s above) are left out.
    assert all(r["seconds"] < 1.0 for r, _ in used)
    assert fit_tc_model.ratio_range(used, round_seconds, rate) == pytest.approx((1.0, 1.0))


def test_the_plan_applies_where_the_kernel_does() -> None:
    # Tucker-2 only, ranks <= 128, and the stages must fit in shared memory: r50_512@7's
    # ranks of 128 leave no room in float32 (4-byte elements), as RESULTS_GPU.md records.
    assert fit_tc_model.tc_terms(CASES["thesis_conv1"], "bfloat16", 1) is None  # no `first`
    assert fit_tc_model.tc_terms(CASES["r50_512@7"], "float32", 1) is None
    assert fit_tc_model.tc_terms(CASES["r50_512@7"], "bfloat16", 1) is not None
    assert fit_tc_model.tc_terms(CASES["linear_4096"], "bfloat16", 1) is None
    # More images: more waves of blocks, never fewer rounds or multiply-adds.
    small, big = (fit_tc_model.tc_terms(CASES["resnet50_3x3"], "bfloat16", b) for b in (8, 128))
    assert big.round_terms > small.round_terms and big.mac_terms > small.mac_terms and big.pack > small.pack


def test_rows_from_a_results_table(tmp_path) -> None:
    results = tmp_path / "results.md"
    results.write_text(
        "text\n\n| case | dtype | batch | old | new |\n|---|---|---:|---:|---:|\n"
        "| resnet50_3x3 | bfloat16 | 8 | 0.1 | 0.0371 |\n| vgg_128 | float32 | 32 | 0.5 | 0.3681 |\n\nmore\n",
        encoding="utf-8")
    rows = fit_tc_model.rows_from_results(results, "new")
    assert rows == [{"case": "resnet50_3x3", "dtype": "bfloat16", "batch": 8, "seconds": pytest.approx(3.71e-5)},
                    {"case": "vgg_128", "dtype": "float32", "batch": 32, "seconds": pytest.approx(3.681e-4)}]
    with pytest.raises(SystemExit):
        fit_tc_model.rows_from_results(results, "missing")
