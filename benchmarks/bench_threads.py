"""Thread scaling of the fused ops: the same call with 1 thread and with 2.

One group per layer and batch; the ratio 1-thread time / 2-thread time is the speed-up.
"""

from __future__ import annotations

import pytest
import torch

from cases import build

CASES = (("resnet50_3x3", 8), ("vgg_128", 8), ("thesis_conv2", 64), ("linear_4096", 32))


@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("case,batch", CASES)
def test_fused_threads(benchmark, case: str, batch: int, threads: int) -> None:
    benchmark.group = f"threads: {case} / batch {batch} / forward"
    layer = build(case)
    fn = layer.impls()["fused"]
    x = layer.input(batch)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            benchmark(fn, x)
    finally:
        torch.set_num_threads(previous)
