"""Per-call overhead of the fused ops: layers too small for their arithmetic to register.

A 1x1 conv of 2 -> 2 -> 2 -> 2 channels on a 2x2 image, the same conv with its ReLU and 2x2
average pool fused (on a 4x4 image), and a linear layer of 4 -> 2 -> 2 -> 4 features, at batch 1: a few dozen multiply-adds, nanoseconds of arithmetic, so the
call's time is its overhead (dispatch, argument checks, output allocation, the kernel's
setup). Timed as an inference call and as a forward that records the autograd graph, with
``nn.Sequential``'s three layers alongside for scale, and ("fused_boxed") the inference call
through ``torch.ops.tucker_ops``, whose Python layer boxes every argument, where the public
functions take their direct call route (csrc/python/fast_calls.cpp).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tucker_ops import _ops
from tucker_ops._epilogue_op import tucker_conv2d_relu_pool

OPS = ("fused", "fused_grad", "fused_boxed", "sequential")


def _conv(epilogue: bool = False):
    # epilogue: the fused-epilogue op (fuse_epilogues) on a 4x4 image: conv, ReLU, 2x2 average pool.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, *((4, 4) if epilogue else (2, 2)), generator=g)
    first, core = torch.randn(2, 2, generator=g), torch.randn(2, 2, 1, 1, generator=g)
    last = torch.randn(2, 2, generator=g)
    bias = torch.randn(2, generator=g)
    chain = [nn.Conv2d(2, 2, 1, bias=False), nn.Conv2d(2, 2, 1, bias=False), nn.Conv2d(2, 2, 1)]
    seq = nn.Sequential(*chain, *((nn.ReLU(), nn.AvgPool2d(2)) if epilogue else ()))

    def fused(x, first=first, core=core, last=last, bias=bias):
        if epilogue:
            return tucker_conv2d_relu_pool(x, first, core, last, bias, 1, 0, 1, 2, backend="fused")
        return _ops.tucker_conv2d(x, first, core, last, bias, 1, 0, 1, backend="fused")

    def boxed(x):
        if epilogue:
            return torch.ops.tucker_ops.tucker_conv2d_relu_pool(x, first, core, last, bias, [1, 1], [0, 0], [1, 1], 2)
        return torch.ops.tucker_ops.tucker_conv2d(x, first, core, last, bias, [1, 1], [0, 0], [1, 1])

    return x, (first, core, last, bias), fused, boxed, seq


def _linear():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, generator=g)
    first, core, last = torch.randn(2, 4, generator=g), torch.randn(2, 2, generator=g), torch.randn(4, 2, generator=g)
    bias = torch.randn(4, generator=g)
    seq = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 2, bias=False), nn.Linear(2, 4))

    def fused(x, first=first, core=core, last=last, bias=bias):
        return _ops.tucker_linear(x, first, core, last, bias, backend="fused")

    def boxed(x):
        return torch.ops.tucker_ops.tucker_linear(x, first, core, last, bias)

    return x, (first, core, last, bias), fused, boxed, seq


@pytest.mark.parametrize("impl", OPS)
@pytest.mark.parametrize("kind", ["conv", "conv_relu_pool", "linear"])
def test_overhead(benchmark, kind: str, impl: str) -> None:
    benchmark.group = f"overhead: tiny {kind} / batch 1 / forward"
    x, params, fused, boxed, seq = _linear() if kind == "linear" else _conv(epilogue=kind == "conv_relu_pool")
    if impl == "fused_grad":
        for p in params:
            p.requires_grad_()
        benchmark(fused, x)
        return
    fn = {"sequential": seq, "fused_boxed": boxed}.get(impl, fused)
    with torch.inference_mode():
        benchmark(fn, x)
