"""``tucker_ops::tucker_conv2d_relu_pool``: the conv op with a ReLU + average-pool epilogue.

``avg_pool2d(relu(tucker_conv2d(...)), pool, pool)`` in one op. The CPU kernel applies
the epilogue to each output tile while it is still in cache, so the full-size conv
output is never written (ThesisNet's conv1 at batch 10,000: 500 MB that an eager
ReLU and AvgPool2d would write and read again). Elsewhere (CUDA, the reference
backend) the same result comes from the composite.

The schema lives in csrc/ops.cpp with the others, and its autograd kernel in
csrc/autograd.cpp: the backward recomputes the conv output (the forward never
stored it; on the CPU with its intermediates, in the same pass), takes the pool's
and the ReLU's backward and hands the rest to ``tucker_conv2d_backward``. This
module registers its fake kernel and the CUDA composite, and holds the Python entry
point.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from ._ops import (
    _FAST,
    _OPS,
    _conv2d_output_shape,
    _conv_memory_format,
    _fast_calls_apply,
    _needs_python_autograd,
    _pair,
    _runs_reference,
)

__all__ = ["tucker_conv2d_relu_pool"]

_OP = "tucker_conv2d_relu_pool"


def _check_pool(pool: int) -> None:
    # A plain check: through torch._check_value it was the slowest step of the entry point
    # (benchmarks/notes.md, the 13:25 run).
    if not (isinstance(pool, int) and not isinstance(pool, bool) and pool >= 1):
        raise ValueError(
            f"{_OP}: expected pool to be an int >= 1 (the average pool's window and stride; "
            f"1 means ReLU only), but got {pool!r}"
        )


def _check_output_size(h: int, w: int, pool: int) -> None:
    torch._check_value(
        h >= pool and w >= pool,
        lambda: f"{_OP}: expected the conv output (H_out, W_out) = ({h}, {w}) to be at least pool x pool = "
        f"{pool} x {pool} (the pooled output would be empty)",
    )


def _relu_pool(y: Tensor, pool: int) -> Tensor:
    _check_output_size(y.shape[-2], y.shape[-1], pool)
    y = torch.relu(y)
    return F.avg_pool2d(y, pool, pool) if pool > 1 else y


def tucker_conv2d_relu_pool(
    input: Tensor,
    first: Tensor | None,
    core: Tensor,
    last: Tensor | None,
    bias: Tensor | None,
    stride: int | Sequence[int] = (1, 1),
    padding: int | Sequence[int] = (0, 0),
    dilation: int | Sequence[int] = (1, 1),
    pool: int = 2,
    *,
    backend: str | None = None,
) -> Tensor:
    """``avg_pool2d(relu(tucker_conv2d(...)), pool, pool)`` in one op.

    Shapes: as :func:`tucker_ops.tucker_conv2d`; returns ``(N, C_out, H_out // pool,
    W_out // pool)`` in the output layout :func:`tucker_ops.tucker_conv2d` uses (floor
    mode: a last odd row or column is dropped, as ``nn.AvgPool2d(pool)`` does).
    pool: window and stride of the average pooling; 1 means ReLU only.
    backend: None follows :func:`tucker_ops.use_reference`; ``"fused"`` or ``"reference"``.
    """
    _check_pool(pool)
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if _runs_reference(backend):
        return _relu_pool(reference.tucker_conv2d(input, first, core, last, bias, stride, padding, dilation), pool)
    if _needs_python_autograd():  # torch.func, forward AD: the composite, through _functorch.py's conv Function
        from . import _functorch

        y = _relu_pool(_functorch.tucker_conv2d(input, first, core, last, bias, stride, padding, dilation), pool)
        return y.contiguous(memory_format=_conv_memory_format(input))
    if _fast_calls_apply((input, first, core, last, bias)):
        try:
            return _FAST.tucker_conv2d_relu_pool(input, first, core, last, bias, stride, padding, dilation, pool)
        except TypeError:
            pass  # arguments pybind11 does not convert, or the op's own TypeError: torch.ops decides
    return _OPS.tucker_conv2d_relu_pool(input, first, core, last, bias, stride, padding, dilation, pool)


@torch.library.register_fake("tucker_ops::tucker_conv2d_relu_pool")
def _fake(input, first, core, last, bias, stride, padding, dilation, pool):
    _check_pool(pool)
    n, c, h, w = _conv2d_output_shape(_OP, input, first, core, last, bias, stride, padding, dilation)
    _check_output_size(h, w, pool)
    return input.new_empty((n, c, h // pool, w // pool)).contiguous(memory_format=_conv_memory_format(input))


@torch.library.register_kernel("tucker_ops::tucker_conv2d_relu_pool", "cuda")
def _cuda_composite(input, first, core, last, bias, stride, padding, dilation, pool):
    # The CUDA conv kernel has no epilogue yet: its output is pooled by ATen.
    _check_pool(pool)
    y = _relu_pool(_OPS.tucker_conv2d(input, first, core, last, bias, stride, padding, dilation), pool)
    return y.contiguous(memory_format=_conv_memory_format(input))


