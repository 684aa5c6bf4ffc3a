"""FLOP formulas for the ``tucker_ops`` ops, registered with ``torch.utils.flop_counter``.

Importing this module (``import tucker_ops`` does) makes
``torch.utils.flop_counter.FlopCounterMode`` count the ops, forward (the
``*_with_intermediates`` variants as their forward) and backward. The
convention is the one PyTorch uses for ``aten.convolution`` and ``aten.mm``:
2 FLOPs per multiply-accumulate, bias additions and reductions not
counted. The forward counts the chain as the contract writes it, evaluated
right to left, so it equals ``2 * TuckerConv2d.macs`` / ``2 * TuckerLinear.macs``
and the MACs of ``compress``'s report:

    conv:   first  N·H·W·C_in·R_in          (at the input resolution)
            core   N·H_out·W_out·R_out·R_in·kh·kw
            last   N·H_out·W_out·R_out·C_out
    linear: first  M·in·R_in,  core M·R_in·R_out,  last M·R_out·out   (M = rows)

Without saved intermediates (``projection``, ``core_output``: see
csrc/ops.cpp) a backward op recomputes the forward stages it needs; that work
is counted too, as FlopCounterMode counts recomputation under activation
checkpointing. Per requested gradient, in MACs (``first``/``core``/``last`` are
the forward terms):

    grad through last (needed for core, first, input; only with last)   last
    grad_last                                       last, and recompute core unless core_output is given
    grad_core                                       core
    grad through core (needed for first, input)     core
    grad_first                                      first
    grad_input (only with first; else it is the grad through core)   first
    the projection, once, where grad_core or a recomputed core output needs it
    and it is not given                             first
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.flop_counter import register_flop_formula

from . import _ops  # noqa: F401  (loads the library that defines the ops)

__all__ = [
    "conv2d_backward_flops",
    "conv2d_flops",
    "linear_backward_flops",
    "linear_flops",
]

Shape = Sequence[int]


def _conv_terms(
    input_shape: Shape, first_shape: Shape | None, core_shape: Shape, last_shape: Shape | None, out_hw: Shape
) -> tuple[int, int, int]:
    """MACs of the three stages ``(first, core, last)``; 0 for an absent side."""
    n, c_in, h, w = input_shape
    r_out, r_in, kh, kw = core_shape
    pixels_out = n * out_hw[0] * out_hw[1]
    first = n * h * w * c_in * first_shape[0] if first_shape is not None else 0
    last = pixels_out * r_out * last_shape[0] if last_shape is not None else 0
    return first, pixels_out * r_out * r_in * kh * kw, last


def _linear_terms(
    input_shape: Shape, first_shape: Shape | None, core_shape: Shape, last_shape: Shape | None
) -> tuple[int, int, int]:
    rows = math.prod(input_shape[:-1])
    r_out, r_in = core_shape
    first = rows * input_shape[-1] * first_shape[0] if first_shape is not None else 0
    last = rows * r_out * last_shape[0] if last_shape is not None else 0
    return first, rows * r_out * r_in, last


def _backward_macs(
    terms: tuple[int, int, int],
    has_first: bool,
    has_last: bool,
    mask: Sequence[bool],
    kept_projection: bool = False,
    kept_core_output: bool = False,
) -> int:
    first, core, last = terms
    need_input, need_first, need_core, need_last = mask[0], mask[1] and has_first, mask[2], mask[3] and has_last
    through_core = need_input or need_first  # gradient w.r.t. the projection P = first · input
    recompute_core_output = need_last and not kept_core_output
    recompute_projection = has_first and not kept_projection and (need_core or recompute_core_output)
    macs = first if recompute_projection else 0
    if has_last and (need_core or through_core):
        macs += last  # gradient w.r.t. the core's output: lastᵀ · grad_output
    if need_last:
        macs += last + (core if recompute_core_output else 0)
    if need_core:
        macs += core
    if through_core:
        macs += core
    if need_first:
        macs += first
    if need_input and has_first:
        macs += first
    return macs


def conv2d_flops(
    input_shape: Shape, first_shape: Shape | None, core_shape: Shape, last_shape: Shape | None, out_shape: Shape
) -> int:
    """FLOPs of one ``tucker_conv2d`` forward (2 per MAC, bias not counted)."""
    return 2 * sum(_conv_terms(input_shape, first_shape, core_shape, last_shape, out_shape[2:]))


def conv2d_backward_flops(
    grad_output_shape: Shape,
    input_shape: Shape,
    first_shape: Shape | None,
    core_shape: Shape,
    last_shape: Shape | None,
    output_mask: Sequence[bool],
    kept_projection: bool = False,
    kept_core_output: bool = False,
) -> int:
    """FLOPs of one ``tucker_conv2d_backward`` for the gradients in ``output_mask``.

    ``kept_*``: the call was given that saved intermediate (no recomputation).
    """
    terms = _conv_terms(input_shape, first_shape, core_shape, last_shape, grad_output_shape[2:])
    return 2 * _backward_macs(
        terms, first_shape is not None, last_shape is not None, output_mask, kept_projection, kept_core_output
    )


def linear_flops(input_shape: Shape, first_shape: Shape | None, core_shape: Shape, last_shape: Shape | None) -> int:
    """FLOPs of one ``tucker_linear`` forward (2 per MAC, bias not counted)."""
    return 2 * sum(_linear_terms(input_shape, first_shape, core_shape, last_shape))


def linear_backward_flops(
    input_shape: Shape,
    first_shape: Shape | None,
    core_shape: Shape,
    last_shape: Shape | None,
    output_mask: Sequence[bool],
    kept_projection: bool = False,
    kept_core_output: bool = False,
) -> int:
    """FLOPs of one ``tucker_linear_backward`` for the gradients in ``output_mask`` (``kept_*`` as for conv)."""
    terms = _linear_terms(input_shape, first_shape, core_shape, last_shape)
    return 2 * _backward_macs(
        terms, first_shape is not None, last_shape is not None, output_mask, kept_projection, kept_core_output
    )


# The registered formulas get shapes (tensors replaced by their .shape, None kept)
# in the schema's argument order, and the output's shape as out_shape.
_OPS = torch.ops.tucker_ops


@register_flop_formula(_OPS.tucker_conv2d)
def _conv2d_formula(input, first, core, last, bias, stride, padding, dilation, *, out_shape, **kwargs) -> int:
    return conv2d_flops(input, first, core, last, out_shape)


@register_flop_formula(_OPS.tucker_conv2d_with_intermediates)
def _conv2d_kept_formula(input, first, core, last, bias, stride, padding, dilation, *, out_shape, **kwargs) -> int:
    return conv2d_flops(input, first, core, last, out_shape[0])


@register_flop_formula(_OPS.tucker_conv2d_backward)
def _conv2d_backward_formula(
    grad_output,
    input,
    first,
    core,
    last,
    stride,
    padding,
    dilation,
    output_mask,
    projection=None,
    core_output=None,
    *,
    out_shape,
    **kwargs,
) -> int:
    return conv2d_backward_flops(
        grad_output, input, first, core, last, output_mask, projection is not None, core_output is not None
    )


@register_flop_formula(_OPS.tucker_linear)
def _linear_formula(input, first, core, last, bias, *, out_shape, **kwargs) -> int:
    return linear_flops(input, first, core, last)


@register_flop_formula(_OPS.tucker_linear_with_intermediates)
def _linear_kept_formula(input, first, core, last, bias, *, out_shape, **kwargs) -> int:
    return linear_flops(input, first, core, last)


@register_flop_formula(_OPS.tucker_linear_backward)
def _linear_backward_formula(
    grad_output, input, first, core, last, output_mask, projection=None, core_output=None, *, out_shape, **kwargs
) -> int:
    return linear_backward_flops(
        input, first, core, last, output_mask, projection is not None, core_output is not None
    )
