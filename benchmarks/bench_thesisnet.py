"""Whole ThesisNet forward: dense against compressed-Sequential against compressed-fused.

Batches 1, 64 and 10,000 (the thesis timed 10,000 MNIST images); ONNX Runtime
runs the dense and the Sequential model too when it is installed. One group per
batch, implementations side by side. "fused" is the compressed model after
``tucker_ops.fuse_epilogues`` (conv -> ReLU -> pool in one op, as a user runs it);
"fused_no_epilogue" is the compressed model alone.
"""

from __future__ import annotations

import pytest
import torch

import tucker_ops
from conftest import bench_threads
from onnx_runtime import Unavailable, session
from tucker_ops.compress import to_sequential_model

BATCHES = (1, 64, 10_000)
IMPLS = ("dense", "sequential", "fused", "fused_no_epilogue", "onnxruntime_dense", "onnxruntime_sequential")

_models: dict[str, torch.nn.Module] = {}


def _thesis_models() -> dict[str, torch.nn.Module]:
    if not _models:
        torch.manual_seed(0)
        dense = tucker_ops.ThesisNet().eval()
        compressed, _ = tucker_ops.compress(dense, ranks=tucker_ops.thesis_ranks())
        _models.update(
            dense=dense,
            fused=tucker_ops.fuse_epilogues(compressed).eval(),
            fused_no_epilogue=compressed.eval(),
            sequential=to_sequential_model(compressed).eval(),
        )
    return _models


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
def test_thesisnet_forward(benchmark, impl: str, batch: int) -> None:
    benchmark.group = f"ThesisNet / batch {batch} / forward"
    models = _thesis_models()
    x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    if impl.startswith("onnxruntime_"):
        try:
            fn = session(models[impl.removeprefix("onnxruntime_")], x[:1], bench_threads())
        except Unavailable as e:
            pytest.skip(str(e))
        benchmark(fn, x)
        return
    with torch.inference_mode():
        benchmark(models[impl], x)
