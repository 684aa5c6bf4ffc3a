"""ThesisNet forward latency: dense against compressed-Sequential against compressed-fused.

    make bench          # or: .venv/bin/python -m pytest benchmarks -q --benchmark-only

One pytest-benchmark group per batch size, implementations side by side in it, so the
ratios within a group come from one run on one machine.
"""

from __future__ import annotations

import pytest
import torch

import tucker_ops
from tucker_ops.compress import to_sequential_model

BATCHES = (1, 64)


@pytest.fixture(scope="module")
def thesis_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    dense = tucker_ops.ThesisNet().eval()
    fused, _ = tucker_ops.compress(dense, ranks=tucker_ops.thesis_ranks())
    fused.eval()
    reference = to_sequential_model(fused).eval()
    return {"dense": dense, "sequential": reference, "fused": fused}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", ["dense", "sequential", "fused"])
def test_thesisnet_forward(benchmark, thesis_models, impl: str, batch: int) -> None:
    benchmark.group = f"ThesisNet forward, batch {batch}"
    model = thesis_models[impl]
    x = torch.randn(batch, 1, 28, 28)
    with torch.inference_mode():
        benchmark(model, x)
