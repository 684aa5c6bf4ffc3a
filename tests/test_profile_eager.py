"""benchmarks/profile_eager.py's summary of profiler activities, on made-up events (the
script itself needs a GPU)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _profile_eager():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("profile_eager", BENCH / "profile_eager.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_activities_per_call_and_their_names() -> None:
    pe = _profile_eager()
    conv = "void cudnn::ops::nchwToNhwcKernel<float, float, float, false, true>(cudnn::ops::nchw2nhwc_params_t<float>)"
    gemm = "sm90_xmma_fprop_implicit_gemm_tf32f32_tf32f32_f32_nhwckrsc_nchw_tilesize128x128x32(params)"
    events = [(conv, 2.0), (gemm, 10.0), (conv, 2.0)] * 3 + [("Memset (Device)", 1.0)] * 3
    per_call, us, names = pe.summarize_activities(events, calls=3)
    assert per_call == 4.0
    assert us == (3 * 14.0 + 3 * 1.0) / 3
    # Most frequent first, counts per call, template arguments and parameters dropped.
    assert names.startswith("cudnn::ops::nchwToNhwcKernel x2, ")
    assert "sm90_xmma_fprop_implicit_gemm_tf32f32_tf32f32... x1" in names  # 48 characters
    assert "Memset x1" in names


def test_shorten_keeps_short_names() -> None:
    pe = _profile_eager()
    assert pe.shorten("void k<int>(int*)") == "k"
    assert pe.shorten("a" * 60, width=10) == "aaaaaaa..."
