"""The benchmark scripts' restatements of the CUDA path rule's constants match csrc/.

fit_tc_model.py, fit_grid_model.py and fit_chain_model.py replay and refit the
op's time models offline, so they restate the constants compiled into
csrc/cuda. A constant refitted on one side only would make every replay
describe a rule the op does not run; these tests read the numbers out of the
sources. No GPU needed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA = ROOT / "csrc" / "cuda"
sys.path.insert(0, str(ROOT / "benchmarks"))

fit_chain_model = pytest.importorskip("fit_chain_model")
fit_grid_model = pytest.importorskip("fit_grid_model")
fit_tc_model = pytest.importorskip("fit_tc_model")

NUMBER = r"([0-9.]+(?:e-?[0-9]+)?)"


def constant(source: str, name: str) -> float:
    """The value of `constexpr double name = value` (alone or in a list) in csrc/cuda/source."""
    text = (CUDA / source).read_text()
    found = re.findall(rf"\b{name}\s*=\s*{NUMBER}\s*[,;]", text)
    assert len(found) == 1, f"{source}: expected one definition of {name}, found {found}"
    return float(found[0])


def rates(source: str, condition: str) -> tuple[float, float]:
    """(macs_per_second, bytes_per_second) assigned in the branch of `condition` in source."""
    text = (CUDA / source).read_text()
    pattern = (re.escape(condition) + r"\)\s*\{\s*macs_per_second\s*=\s*" + NUMBER +
               r",\s*bytes_per_second\s*=\s*" + NUMBER + ";")
    found = re.findall(pattern, text)
    assert len(found) == 1, f"{source}: no single rate branch for {condition!r}"
    return float(found[0][0]), float(found[0][1])


def test_chain_and_host_prices() -> None:
    assert fit_chain_model.CPP_CALL_SECONDS == constant("common.cuh", "kChainCallSeconds")
    assert fit_chain_model.CPP_REPLAY_CALL_SECONDS == constant("common.cuh", "kChainReplayCallSeconds")
    assert fit_chain_model.FUSED_HOST_SECONDS == constant("common.cuh", "kFusedHostSeconds")
    assert fit_chain_model.GRID_HOST_SECONDS == constant("common.cuh", "kGridHostSeconds")


def test_tile_kernel_model() -> None:
    cpp = fit_tc_model.CPP
    assert cpp["pack_seconds"] == constant("conv_fused_tc.cu", "kPackSeconds")
    assert cpp["pack_bytes_per_second"] == constant("conv_fused_tc.cu", "kPackBytesPerSecond")
    assert cpp["round_seconds"] == constant("conv_fused_tc.cu", "kRoundSeconds")
    assert cpp["macs_per_second_per_block"] == constant("conv_fused_tc.cu", "kMacsPerSecondPerBlock")
    slowdown = re.findall(r"at::kFloat \? kMacsPerSecondPerBlock / ([0-9.]+) :",
                          (CUDA / "conv_fused_tc.cu").read_text())
    assert [float(s) for s in slowdown] == [fit_tc_model.TF32_SLOWDOWN]


@pytest.mark.parametrize("kind, source, branches", [
    ("conv", "conv_grid.cu", {"16-bit": "dtype == at::kHalf || dtype == at::kBFloat16",
                              "float32": "dtype == at::kFloat && at::globalContext().allowTF32CuDNN()"}),
    ("linear", "linear_grid.cu", {"16-bit": "dtype == at::kHalf || dtype == at::kBFloat16",
                                  "float32": "dtype == at::kFloat"}),
])
def test_whole_gpu_kernel_models(kind: str, source: str, branches: dict[str, str]) -> None:
    fixed = constant(source, "kFixedSeconds")
    for group, condition in branches.items():
        assert fit_grid_model.CPP_MODEL[(kind, group)] == (fixed, *rates(source, condition)), (kind, group)


def test_linear_fused_limits() -> None:
    text = (CUDA / "linear_fused.cu").read_text()

    def shifted(name: str) -> int:
        found = re.findall(rf"\b{name}\s*=\s*int64_t\{{1\}}\s*<<\s*(\d+);", text)
        assert len(found) == 1, name
        return 1 << int(found[0])

    assert fit_chain_model.LINEAR_MAX_FACTOR_ELEMS == shifted("kMaxFactorElems")
    assert fit_chain_model.LINEAR_MAX_FACTOR_ELEMS_CAPTURED == shifted("kMaxFactorElemsCaptured")
    assert [int(v) for v in re.findall(r"\bkMaxRows\s*=\s*(\d+);", text)] == [fit_chain_model.LINEAR_MAX_ROWS]
