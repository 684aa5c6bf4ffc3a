"""torch.func support for the fused ops.

The ops' autograd kernels are C++ (csrc/autograd.cpp): they keep a training step's
per-call overhead low, but functorch's transforms (``torch.func.grad``, ``vjp``,
``jacrev``, ``jvp``, ``jacfwd``, ``hessian``, and ``vmap`` around them) refuse a C++
``torch::autograd::Function``, and the ``*_backward`` ops' double-backward
registration (``torch.library.register_autograd``) too; so does forward-mode AD
(``torch.autograd.forward_ad``). While a transform or a dual level is active, the
entry points (``tucker_conv2d``, ``tucker_linear``, ``tucker_conv2d_relu_pool``)
route through the ``torch.autograd.Function`` classes here instead:

- forward: the same op, called below the autograd dispatch key;
- backward: the ``*_backward`` op, as the C++ kernels call it, itself wrapped in a
  Function whose derivatives (second order: ``hessian``, ``jacrev`` of ``jacrev``)
  go through ``torch.func`` on the reference chain, as the double-backward formulas
  of ``_ops.py`` do outside the transforms;
- forward mode (``jvp``): the chain is linear in each of input, first, core and last
  separately, so its tangent is one call per tangent of those (through these
  Functions again, so that transforms nest) plus the bias tangent;
- vmap: where only the input is batched, the batch folds into the op's own batch
  (one call); otherwise (batched factors, and the backward of per-sample gradients,
  whose factor gradients are per sample) one op call per sample, stacked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import reference
from ._ops import _OPS, _conv_memory_format

_FACTORS = 4  # input, first, core, last: the arguments the chain is linear in


def _below_autograd():
    return torch._C._AutoDispatchBelowAutograd()


class _Static:
    """Non-tensor arguments in one opaque object: functorch flattens a Function's
    arguments as a pytree and expects a gradient per leaf, so tuples of ints and
    bools must not be leaves."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value


def _per_sample(fn: Callable, batch_size: int, in_dims: Sequence[int | None], args: Sequence):
    """vmap by a loop: fn on each sample of the batched arguments, outputs stacked on dim 0.
    fn is a Function's ``apply``, so transforms outside this vmap still see the Function."""
    moved = [a.movedim(d, 0) if d is not None else a for a, d in zip(args, in_dims)]
    outs = [fn(*[a[b] if d is not None else a for a, d in zip(moved, in_dims)]) for b in range(batch_size)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0


def _only_input_batched(in_dims: Sequence[int | None]) -> bool:
    return in_dims[0] is not None and all(d is None for d in in_dims[1:])


def _mask(ctx, first: Tensor | None, last: Tensor | None, has_bias: bool) -> list[bool]:
    present = (True, first is not None, True, last is not None, has_bias)
    return [bool(ctx.needs_input_grad[i]) and present[i] for i in range(5)]


def _tensor_positions(values: Sequence[Tensor | None]) -> list[int]:
    return [i for i, v in enumerate(values) if v is not None]


def _with_tensors(fn: Callable, values: Sequence[Tensor | None], positions: list[int]) -> Callable:
    """fn as a function of the tensors at `positions` only (the Nones stay fixed)."""

    def call(*tensors: Tensor):
        args = list(values)
        for i, t in zip(positions, tensors):
            args[i] = t
        return fn(*args)

    return call


def _vjp(fn: Callable, values: Sequence[Tensor | None], cotangents) -> list[Tensor | None]:
    positions = _tensor_positions(values)
    _, pullback = torch.func.vjp(_with_tensors(fn, values, positions), *[values[i] for i in positions])
    grads: list[Tensor | None] = [None] * len(values)
    for i, g in zip(positions, pullback(cotangents)):
        grads[i] = g
    return grads


def _jvp(fn: Callable, values: Sequence[Tensor | None], tangents: Sequence[Tensor | None]):
    positions = _tensor_positions(values)
    primals = tuple(values[i] for i in positions)
    tangents = tuple(tangents[i] if tangents[i] is not None else torch.zeros_like(values[i]) for i in positions)
    return torch.func.jvp(_with_tensors(fn, values, positions), primals, tangents)[1]


def _reference_grads(chain: Callable[..., Tensor], mask: Sequence[bool], out_features: int) -> Callable:
    """(grad_output, input, first, core, last) -> the gradients the backward op returns
    where mask asks (a tuple, in argument order), through torch.func on ``chain``."""

    def grads(grad_output, input, first, core, last) -> tuple[Tensor, ...]:
        bias = grad_output.new_zeros((out_features,)) if mask[4] else None
        operands = [input, first, core, last, bias]
        wanted = [v if mask[i] else None for i, v in enumerate(operands)]
        positions = _tensor_positions(wanted)
        if not positions:
            return ()
        _, pullback = torch.func.vjp(_with_tensors(chain, operands, positions), *[operands[i] for i in positions])
        return tuple(pullback(grad_output))

    return grads


def _selected(grads: Sequence[Tensor | None], mask: Sequence[bool]) -> tuple[Tensor, ...]:
    return tuple(g for g, wanted in zip(grads, mask) if wanted)


def _spread(selected: Sequence[Tensor], mask: Sequence[bool]) -> list[Tensor | None]:
    it = iter(selected)
    return [next(it) if wanted else None for wanted in mask]


class _BackwardFunction(torch.autograd.Function):
    """A ``*_backward`` op (forward), with its own derivatives through the reference chain.

    ``apply(grad_output, input, first, core, last, _Static((kind, extra, mask)))``: kind
    ``"conv"`` (extra: stride, padding, dilation) or ``"linear"`` (extra: ``()``). Returns
    only the gradients the mask asks for, in argument order.
    """

    @staticmethod
    def forward(grad_output, input, first, core, last, static):
        kind, extra, mask = static.value
        with _below_autograd():
            if kind == "conv":
                grads = _OPS.tucker_conv2d_backward(grad_output, input, first, core, last, *extra, list(mask))
            else:
                grads = _OPS.tucker_linear_backward(grad_output, input, first, core, last, list(mask))
        return _selected(grads, mask)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        grad_output, input, first, core, last, static = inputs
        ctx.save_for_backward(grad_output, input, first, core, last)
        ctx.save_for_forward(grad_output, input, first, core, last)
        ctx.kind, ctx.extra, ctx.mask = static.value
        ctx.outputs_like = [(g.shape, g.dtype, g.device) for g in output]

    @staticmethod
    def _reference(ctx) -> Callable:
        grad_output = ctx.saved_tensors[0]
        if ctx.kind == "conv":
            extra = ctx.extra
            return _reference_grads(lambda *ops: reference.tucker_conv2d(*ops, *extra), ctx.mask, grad_output.shape[1])
        return _reference_grads(reference.tucker_linear, ctx.mask, grad_output.shape[-1])

    @staticmethod
    def backward(ctx, *cotangents):
        cotangents = tuple(
            c if c is not None else torch.zeros(shape, dtype=dtype, device=device)
            for c, (shape, dtype, device) in zip(cotangents, ctx.outputs_like)
        )
        return (*_vjp(_BackwardFunction._reference(ctx), ctx.saved_tensors, cotangents), None)

    @staticmethod
    def jvp(ctx, *tangents):
        return _jvp(_BackwardFunction._reference(ctx), ctx.saved_tensors, tangents[:5])

    @staticmethod
    def vmap(info, in_dims, *args):
        return _per_sample(_BackwardFunction.apply, info.batch_size, in_dims, args)


def _tangent(apply: Callable[..., Tensor], primals: Sequence, tangents: Sequence, bias_tangent, zeros: Tensor):
    """The chain's tangent: one bias-free call per factor tangent (that factor replaced
    by its tangent), plus the bias tangent broadcast like the bias."""
    out = zeros
    for i in range(_FACTORS):
        if tangents[i] is not None and primals[i] is not None:
            args = list(primals)
            args[i] = tangents[i]
            out = out + apply(*args)
    return out if bias_tangent is None else out + bias_tangent


class TuckerConv2dFunction(torch.autograd.Function):
    """``tucker_conv2d`` under torch.func transforms: ``apply(input, first, core, last, bias,
    _Static((stride, padding, dilation)))``."""

    @staticmethod
    def forward(input, first, core, last, bias, conv_args: _Static):
        with _below_autograd():
            return _OPS.tucker_conv2d(input, first, core, last, bias, *conv_args.value)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        input, first, core, last, bias, conv_args = inputs
        ctx.save_for_backward(input, first, core, last)
        ctx.save_for_forward(input, first, core, last)
        ctx.conv_args = conv_args
        ctx.has_bias = bias is not None
        ctx.output_like = (output.shape, output.dtype, output.device, _conv_memory_format(input))

    @staticmethod
    def backward(ctx, grad: Tensor):
        input, first, core, last = ctx.saved_tensors
        mask = _mask(ctx, first, last, ctx.has_bias)
        static = _Static(("conv", ctx.conv_args.value, tuple(mask)))
        grads = _BackwardFunction.apply(grad, input, first, core, last, static)
        return (*_spread(grads, mask), None)

    @staticmethod
    def vmap(info, in_dims, *args):
        if _only_input_batched(in_dims):  # the batch folds into the images
            x = args[0].movedim(in_dims[0], 0)
            y = TuckerConv2dFunction.apply(x.reshape(-1, *x.shape[2:]), *args[1:])
            return y.reshape(x.shape[0], x.shape[1], *y.shape[1:]), 0
        return _per_sample(TuckerConv2dFunction.apply, info.batch_size, in_dims, args)

    @staticmethod
    def jvp(ctx, input_t, first_t, core_t, last_t, bias_t, _):
        args = ctx.conv_args
        shape, dtype, device, memory_format = ctx.output_like
        zeros = torch.zeros(shape, dtype=dtype, device=device).contiguous(memory_format=memory_format)
        return _tangent(
            lambda x, f, c, l: TuckerConv2dFunction.apply(x, f, c, l, None, args),
            ctx.saved_tensors,
            (input_t, first_t, core_t, last_t),
            None if bias_t is None else bias_t.reshape(1, -1, 1, 1),
            zeros,
        )


class TuckerLinearFunction(torch.autograd.Function):
    """``tucker_linear`` under torch.func transforms; arguments as the op's."""

    @staticmethod
    def forward(input, first, core, last, bias):
        with _below_autograd():
            return _OPS.tucker_linear(input, first, core, last, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        input, first, core, last, bias = inputs
        ctx.save_for_backward(input, first, core, last)
        ctx.save_for_forward(input, first, core, last)
        ctx.has_bias = bias is not None
        ctx.output_like = (output.shape, output.dtype, output.device)

    @staticmethod
    def backward(ctx, grad: Tensor):
        input, first, core, last = ctx.saved_tensors
        mask = _mask(ctx, first, last, ctx.has_bias)
        grads = _BackwardFunction.apply(grad, input, first, core, last, _Static(("linear", (), tuple(mask))))
        return tuple(_spread(grads, mask))

    @staticmethod
    def vmap(info, in_dims, *args):
        if _only_input_batched(in_dims):  # one more leading dimension of rows
            return TuckerLinearFunction.apply(args[0].movedim(in_dims[0], 0), *args[1:]), 0
        return _per_sample(TuckerLinearFunction.apply, info.batch_size, in_dims, args)

    @staticmethod
    def jvp(ctx, input_t, first_t, core_t, last_t, bias_t):
        shape, dtype, device = ctx.output_like
        return _tangent(
            lambda x, f, c, l: TuckerLinearFunction.apply(x, f, c, l, None),
            ctx.saved_tensors,
            (input_t, first_t, core_t, last_t),
            bias_t,
            torch.zeros(shape, dtype=dtype, device=device),
        )


def tucker_conv2d(input, first, core, last, bias, stride, padding, dilation) -> Tensor:
    """The conv op for the entry points while a torch.func transform is active."""
    return TuckerConv2dFunction.apply(input, first, core, last, bias, _Static((stride, padding, dilation)))


def tucker_linear(input, first, core, last, bias) -> Tensor:
    """The linear op for the entry points while a torch.func transform is active."""
    return TuckerLinearFunction.apply(input, first, core, last, bias)
