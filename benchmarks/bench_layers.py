"""One Tucker layer at a time: dense, Sequential chain, fused op, reference and ONNX Runtime.

One pytest-benchmark group per ``layer / batch / mode`` (mode ``forward`` or
``train`` = forward + backward of ``output.sum()``), implementations side by
side in it, so ratios within a group come from one run on one machine.
``benchmarks/summarize.py`` turns the JSON into ratios. Shapes: ``cases.py``.
"""

from __future__ import annotations

import pytest
import torch

from cases import CASES, build
from conftest import bench_threads
from onnx_runtime import Unavailable, session

BATCHES = (1, 32)
FORWARD_IMPLS = ("dense", "sequential", "fused", "reference", "onnxruntime")
TRAIN_IMPLS = ("dense", "sequential", "fused")

_layers: dict[str, object] = {}


def _layer(name: str):
    if name not in _layers:
        _layers[name] = build(name)
    return _layers[name]


@pytest.mark.parametrize("impl", FORWARD_IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("case", list(CASES))
def test_forward(benchmark, case: str, batch: int, impl: str) -> None:
    benchmark.group = f"{case} / batch {batch} / forward"
    layer = _layer(case)
    x = layer.input(batch)
    if impl == "onnxruntime":
        try:
            fn = session(layer.sequential, x, bench_threads())
        except Unavailable as e:
            pytest.skip(str(e))
        benchmark(fn, x)
        return
    fn = layer.impls()[impl]
    with torch.inference_mode():
        benchmark(fn, x)


@pytest.mark.parametrize("impl", TRAIN_IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("case", list(CASES))
def test_train(benchmark, case: str, batch: int, impl: str) -> None:
    """Forward + backward into the input and every parameter (a training step without the optimizer)."""
    benchmark.group = f"{case} / batch {batch} / train"
    layer = _layer(case)
    fn = layer.impls()[impl]
    x = layer.input(batch).requires_grad_()
    module = layer.dense if impl == "dense" else layer.sequential if impl == "sequential" else None
    params = list(module.parameters()) if module is not None else layer.params()

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        fn(x).sum().backward()

    benchmark(step)
