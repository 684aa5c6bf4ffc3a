"""Pure-PyTorch Tucker chains with the op signatures: the oracle for every test.

These functions compute exactly what ``tucker_ops::tucker_conv2d`` and
``tucker_ops::tucker_linear`` promise (see ARCHITECTURE.md, "The op contract"),
as the unfused chain of ``F.conv2d`` / ``matmul`` calls. They are differentiable
through PyTorch's own autograd and run on any device and dtype torch supports.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def tucker_conv2d(
    input: Tensor,
    first: Tensor | None,
    core: Tensor,
    last: Tensor | None,
    bias: Tensor | None,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
) -> Tensor:
    """Unfused Tucker conv chain.

    Shapes:
        input ``(N, C_in, H, W)``; first ``(R_in, C_in)`` or None;
        core ``(R_out, R_in | C_in, kh, kw)``; last ``(C_out, R_out)`` or None;
        bias ``(C_out,)`` or None (``C_out = R_out`` when last is None).
        Returns ``(N, C_out, H_out, W_out)``.
    """
    x = input
    if first is not None:
        x = F.conv2d(x, first[:, :, None, None])
    if last is None:
        return F.conv2d(x, core, bias, tuple(stride), tuple(padding), tuple(dilation))
    x = F.conv2d(x, core, None, tuple(stride), tuple(padding), tuple(dilation))
    return F.conv2d(x, last[:, :, None, None], bias)


def tucker_linear(
    input: Tensor,
    first: Tensor | None,
    core: Tensor,
    last: Tensor | None,
    bias: Tensor | None,
) -> Tensor:
    """Unfused Tucker linear chain ``((x @ first.T) @ core.T) @ last.T + bias``.

    Shapes:
        input ``(..., in)``; first ``(R_in, in)`` or None; core ``(R_out, R_in | in)``;
        last ``(out, R_out)`` or None; bias ``(out,)`` or None. Returns ``(..., out)``.
    """
    x = input
    if first is not None:
        x = F.linear(x, first)
    if last is None:
        return F.linear(x, core, bias)
    x = F.linear(x, core)
    return F.linear(x, last, bias)
