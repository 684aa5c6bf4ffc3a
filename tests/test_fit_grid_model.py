"""benchmarks/fit_grid_model.py recovers the rates that generated its rows."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
fit_grid_model = pytest.importorskip("fit_grid_model")


def _rows(rates: dict[tuple[str, str], tuple[float, float, float]]) -> list[dict]:
    rows = []
    for c in fit_grid_model.CASES:
        for dtype in ("float32", "bfloat16"):
            fixed, macs, nbytes = rates[(c.kind, "float32" if dtype == "float32" else "16-bit")]
            for batch in (1, 8, 32, 128):
                seconds = (fixed + fit_grid_model.chain_macs(c, batch)[0] / macs
                           + fit_grid_model.elements(c, batch) * fit_grid_model.ELEMENT_SIZE[dtype] / nbytes)
                rows.append({"case": c.name, "dtype": dtype, "batch": batch, "grid_ms": seconds * 1e3})
    rows.append({"case": "resnet50_3x3", "dtype": "float32", "batch": 2, "grid_ms": math.nan})  # not applicable
    return rows


def test_fit_recovers_the_cpp_model_from_its_own_predictions() -> None:
    result = fit_grid_model.fit(_rows(fit_grid_model.CPP_MODEL))
    assert set(result) == set(fit_grid_model.CPP_MODEL)
    for group, (macs, nbytes, lo, hi) in result.items():
        _, cpp_macs, cpp_bytes = fit_grid_model.CPP_MODEL[group]
        assert macs == pytest.approx(cpp_macs, rel=1e-6) and nbytes == pytest.approx(cpp_bytes, rel=1e-6)
        assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)


def test_fit_reports_how_far_the_cpp_model_is_from_other_rates() -> None:
    slower = {g: (f, m / 2, b / 2) for g, (f, m, b) in fit_grid_model.CPP_MODEL.items()}
    for group, (macs, _, lo, hi) in fit_grid_model.fit(_rows(slower)).items():
        assert macs == pytest.approx(fit_grid_model.CPP_MODEL[group][1] / 2, rel=1e-6)
        assert hi < 1.0 and lo >= 0.5 - 1e-9  # the C++ model predicts up to 2x too fast
