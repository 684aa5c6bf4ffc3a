"""The registered ``tucker_ops`` torch ops, seen from Python.

Loads the compiled library (``tucker_ops._C``, which defines the schemas, the
backend kernels and the autograd kernels of the forward ops), registers the fake
(meta) kernels and the double-backward formulas of the ``*_backward`` ops, and
exposes the entry points that pick the fused op or ``reference.py``. In eager mode
the entry points call the fused op through the compiled module's typed handles
(csrc/python/fast_calls.cpp), the same dispatcher call as ``torch.ops`` without its
boxed argument conversion; ``__torch_function__`` overrides and modes, and Dynamo,
keep ``torch.ops``.

The fake kernels repeat the C++ shape checks (csrc/checks.cpp) with
``torch._check_*`` so that meta tensors, fake tensors and symbolic shapes raise
the same errors eager mode does, and never return a wrong output shape.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import pathlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from . import reference

__all__ = ["tucker_conv2d", "tucker_linear", "use_reference"]

_BACKENDS = ("fused", "reference")


# -- loading ------------------------------------------------------------------------


def _library_loaded() -> bool:
    # Another copy (for example a CMake build loaded with torch.ops.load_library)
    # may already have defined the ops; defining them twice is an error.
    return hasattr(torch.ops.tucker_ops, "tucker_conv2d")


def _load_library() -> str | None:
    """Loads ``_C`` next to this file; returns its path, or None when another copy had loaded."""
    if _library_loaded():
        return None
    # Look next to this file only: an import-system search could find the _C of
    # another copy of the package (an editable install's finder, say).
    here = pathlib.Path(__file__).resolve().parent
    candidates = [here / f"_C{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    origin = next((str(path) for path in candidates if path.is_file()), None)
    if origin is None:
        raise ImportError(
            "tucker_ops._C, the compiled extension with the tucker_ops kernels, was not found. "
            "Build it from the repository root with `pip install --no-build-isolation -e .` "
            "(or `python setup.py build_ext --inplace`), or install a built wheel."
        )
    try:
        torch.ops.load_library(origin)
    except OSError as e:
        raise ImportError(
            f"tucker_ops._C at {origin} could not be loaded ({e}). It was probably built against "
            f"another torch than the installed {torch.__version__}; rebuild it with "
            "`pip install --no-build-isolation -e .`."
        ) from e
    return origin


def _load_fast_calls(origin: str | None):
    """The Python module of the same ``_C`` (csrc/python/fast_calls.cpp), or None.

    Its ``tucker_conv2d`` / ``tucker_linear`` call the ops through a typed dispatcher handle,
    without the boxed ``torch.ops`` route's per-argument conversion (several µs a call).
    A library built without it (the CMake build) or a copy loaded elsewhere leaves None,
    and the entry points below keep ``torch.ops``.
    """
    if origin is None:
        return None
    try:
        spec = importlib.util.spec_from_file_location("tucker_ops._C", origin)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError:
        return None
    calls = ("tucker_conv2d", "tucker_linear", "tucker_conv2d_relu_pool")
    return module if all(hasattr(module, name) for name in calls) else None


_FAST = _load_fast_calls(_load_library())
_OPS = torch.ops.tucker_ops
_has_torch_function = torch._C._has_torch_function
_is_compiling = torch.compiler.is_compiling
_transforms_active = torch._C._are_functorch_transforms_active


def _needs_python_autograd() -> bool:
    """torch.func transforms and forward-mode AD (dual tensors inside ``dual_level``)
    refuse the ops' C++ autograd kernels; the entry points then take the
    autograd.Function classes of _functorch.py."""
    return _transforms_active() or _forward_ad._current_level >= 0


def _fast_calls_apply(tensors: tuple) -> bool:
    # The direct calls skip only torch.ops' Python layer: __torch_function__ overrides
    # and modes, and Dynamo's tracing, need that layer, so they keep torch.ops.
    return _FAST is not None and not _has_torch_function(tensors) and not _is_compiling()


# -- shape checks for the fake kernels (mirror csrc/checks.cpp) -----------------------

# Dtypes the compiled backends implement, per device type. Devices not listed
# (meta) accept every floating dtype, since no real kernel will run.
_BACKEND_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}


def _check_tensors(op: str, input: Tensor, named: Sequence[tuple[str, Tensor | None]]) -> None:
    supported = _BACKEND_DTYPES.get(input.device.type)
    if supported is None:
        torch._check_type(
            input.dtype.is_floating_point,
            lambda: f"{op}: expected input to have a floating dtype, but got {input.dtype}",
        )
    else:
        torch._check_type(
            input.dtype in supported,
            lambda: f"{op}: expected input to have one of the dtypes {', '.join(map(str, supported))} "
            f"(supported on {input.device.type}), but got {input.dtype}",
        )
    for name, t in named:
        if t is None:
            continue
        torch._check_type(
            t.dtype == input.dtype,
            lambda: f"{op}: expected {name} to have the same dtype as input ({input.dtype}), but got {t.dtype}",
        )
        torch._check(
            t.device == input.device,
            lambda: f"{op}: expected {name} to be on the same device as input ({input.device}), but got {t.device}",
        )


def _check_dim(op: str, t: Tensor | None, name: str, dim: int, layout: str) -> None:
    if t is not None:
        torch._check_value(
            t.dim() == dim,
            lambda: f"{op}: expected {name} to be {dim}-D {layout}, but got a {t.dim()}-D tensor "
            f"of shape {list(t.shape)}",
        )


def _check_no_zero_dims(op: str, t: Tensor | None, name: str, layout: str) -> None:
    if t is None:
        return
    for size in t.shape:
        torch._check_value(
            size > 0,
            lambda: f"{op}: expected {name} {layout} to have no zero-size dimension, but got shape {list(t.shape)}",
        )


def _check_factors(
    op: str,
    channels_in,
    first: Tensor | None,
    core: Tensor,
    last: Tensor | None,
    bias: Tensor | None,
    channels: str,
    channels_src: str,
    out_channels: str,
):
    """Rank/channel consistency; returns the output feature count (C_out / out)."""
    if first is not None:
        torch._check_value(
            first.shape[1] == channels_in,
            lambda: f"{op}: expected first to have shape (R_in, {channels}) with {channels} = {channels_in} "
            f"({channels_src}), but got first of shape {list(first.shape)}",
        )
        torch._check_value(
            core.shape[1] == first.shape[0],
            lambda: f"{op}: expected core.size(1) to equal R_in = {first.shape[0]} (first.size(0)), "
            f"but got core of shape {list(core.shape)}",
        )
    else:
        torch._check_value(
            core.shape[1] == channels_in,
            lambda: f"{op}: expected core.size(1) to equal {channels} = {channels_in} ({channels_src}; "
            f"first is None), but got core of shape {list(core.shape)}",
        )
    out_features = core.shape[0]
    if last is not None:
        torch._check_value(
            last.shape[1] == core.shape[0],
            lambda: f"{op}: expected last to have shape ({out_channels}, R_out) with R_out = {core.shape[0]} "
            f"(core.size(0)), but got last of shape {list(last.shape)}",
        )
        out_features = last.shape[0]
    if bias is not None:
        source = "last.size(0)" if last is not None else "core.size(0); last is None"
        torch._check_value(
            bias.shape[0] == out_features,
            lambda: f"{op}: expected bias to have shape ({out_features},) ({source}), "
            f"but got bias of shape {list(bias.shape)}",
        )
    return out_features


def _check_pair(op: str, value: Sequence, name: str, minimum: int, bound: str) -> None:
    torch._check_value(
        len(value) == 2,
        lambda: f"{op}: expected {name} to have 2 elements (h, w), but got a list of length {len(value)}: "
        f"{list(value)}",
    )
    torch._check_value(
        value[0] >= minimum and value[1] >= minimum,
        lambda: f"{op}: expected every element of {name} to be {bound}, but got {name} = {list(value)}",
    )


def _conv2d_output_shape(
    op: str,
    input: Tensor,
    first: Tensor | None,
    core: Tensor,
    last: Tensor | None,
    bias: Tensor | None,
    stride: Sequence,
    padding: Sequence,
    dilation: Sequence,
) -> tuple:
    """Validates conv arguments like ``check_tucker_conv2d_args``; returns ``(N, C_out, H_out, W_out)``."""
    _check_tensors(op, input, (("first", first), ("core", core), ("last", last), ("bias", bias)))
    _check_dim(op, input, "input", 4, "(N, C_in, H, W)")
    _check_dim(op, first, "first", 2, "(R_in, C_in)")
    _check_dim(op, core, "core", 4, "(R_out, R_in, kh, kw)")
    _check_dim(op, last, "last", 2, "(C_out, R_out)")
    _check_dim(op, bias, "bias", 1, "(C_out,)")
    n, c_in, h, w = input.shape
    torch._check_value(
        c_in > 0 and h > 0 and w > 0,
        lambda: f"{op}: expected input (N, C_in, H, W) to have non-zero C_in, H and W (only N may be 0), "
        f"but got shape {list(input.shape)}",
    )
    _check_no_zero_dims(op, first, "first", "(R_in, C_in)")
    _check_no_zero_dims(op, core, "core", "(R_out, R_in, kh, kw)")
    _check_no_zero_dims(op, last, "last", "(C_out, R_out)")
    c_out = _check_factors(op, c_in, first, core, last, bias, "C_in", "input.size(1)", "C_out")
    _check_pair(op, stride, "stride", 1, ">= 1")
    _check_pair(op, padding, "padding", 0, ">= 0")
    _check_pair(op, dilation, "dilation", 1, ">= 1")
    kh, kw = core.shape[2], core.shape[3]
    for dim, size, k, pad, dil in (("H", h, kh, padding[0], dilation[0]), ("W", w, kw, padding[1], dilation[1])):
        # The kernels index with int64; plain-int arguments that would overflow it are rejected there too.
        if all(type(v) is int for v in (size, k, pad, dil)):
            torch._check_value(
                size + 2 * pad < 2**63 and dil * (k - 1) < 2**63,
                lambda: f"{op}: padding or dilation along {dim} is too large: input size {size}, kernel size {k}, "
                f"padding {pad}, dilation {dil} overflow 64-bit index arithmetic",
            )
    # numerator + 1 is the number of valid kernel positions; < 0 means none.
    num_h = h + 2 * padding[0] - dilation[0] * (kh - 1) - 1
    num_w = w + 2 * padding[1] - dilation[1] * (kw - 1) - 1
    torch._check_value(
        num_h >= 0 and num_w >= 0,
        lambda: f"{op}: kernel (kh, kw) = ({kh}, {kw}) with dilation {list(dilation)} does not fit the padded "
        f"input (H + 2*pad_h, W + 2*pad_w) = ({h + 2 * padding[0]}, {w + 2 * padding[1]}); expected an output "
        f"size (H_out, W_out) of at least (1, 1), but got "
        f"({max(num_h // stride[0] + 1, 0)}, {max(num_w // stride[1] + 1, 0)})",
    )
    for dim, k, pad, dil in (("H", kh, padding[0], dilation[0]), ("W", kw, padding[1], dilation[1])):
        torch._check_value(
            pad <= dil * (k - 1) + 1,
            lambda: f"{op}: expected padding along {dim} to be at most the dilated kernel extent "
            f"dilation * (k - 1) + 1 = {dil * (k - 1) + 1} (more padding only adds outputs that see nothing but "
            f"zeros), but got padding {pad} with kernel size {k} and dilation {dil}",
        )
    shape = (n, c_out, num_h // stride[0] + 1, num_w // stride[1] + 1)
    _check_numel(op, "output", "(N, C_out, H_out, W_out)", shape)
    return shape


def _check_numel(op: str, name: str, layout: str, sizes: Sequence) -> None:
    """Mirror of ``checked_numel``: the kernels index with int64, so every tensor must fit it."""
    if all(type(s) is int for s in sizes):  # symbolic sizes are bounded by the real tensors later
        numel = 1
        for s in sizes:
            numel *= s
        torch._check_value(
            numel < 2**63,
            lambda: f"{op}: expected {name} {layout} to have fewer than 2^63 elements (64-bit indexing), "
            f"but got sizes {list(sizes)}",
        )


def _linear_output_shape(
    op: str, input: Tensor, first: Tensor | None, core: Tensor, last: Tensor | None, bias: Tensor | None
) -> tuple:
    """Validates linear arguments like ``check_tucker_linear_args``; returns ``(..., out)``."""
    _check_tensors(op, input, (("first", first), ("core", core), ("last", last), ("bias", bias)))
    torch._check_value(
        input.dim() >= 1,
        lambda: f"{op}: expected input to be at least 1-D (..., in), but got a 0-D tensor (a scalar)",
    )
    _check_dim(op, first, "first", 2, "(R_in, in)")
    _check_dim(op, core, "core", 2, "(R_out, R_in)")
    _check_dim(op, last, "last", 2, "(out, R_out)")
    _check_dim(op, bias, "bias", 1, "(out,)")
    torch._check_value(
        input.shape[-1] > 0,
        lambda: f"{op}: expected input (..., in) to have non-zero in (only leading dimensions may be 0), "
        f"but got shape {list(input.shape)}",
    )
    _check_no_zero_dims(op, first, "first", "(R_in, in)")
    _check_no_zero_dims(op, core, "core", "(R_out, R_in)")
    _check_no_zero_dims(op, last, "last", "(out, R_out)")
    out_features = _check_factors(op, input.shape[-1], first, core, last, bias, "in", "input.size(-1)", "out")
    rows = 1
    for size in input.shape[:-1]:
        rows = rows * size
    _check_numel(op, "output", "(..., out)", (rows, out_features))
    return (*input.shape[:-1], out_features)


def _check_grad_output(op: str, grad_output: Tensor, input: Tensor, expected: tuple) -> None:
    _check_tensors(op, input, (("grad_output", grad_output),))
    torch._check_value(
        grad_output.dim() == len(expected),
        lambda: f"{op}: expected grad_output to have the forward output's shape {list(expected)}, "
        f"but got grad_output of shape {list(grad_output.shape)}",
    )
    for got, want in zip(grad_output.shape, expected):
        torch._check_value(
            got == want,
            lambda: f"{op}: expected grad_output to have the forward output's shape {list(expected)}, "
            f"but got grad_output of shape {list(grad_output.shape)}",
        )


# -- fake kernels ---------------------------------------------------------------------


def _backward_outputs(
    op: str,
    output_mask: Sequence[bool],
    input: Tensor,
    first: Tensor | None,
    core: Tensor,
    last: Tensor | None,
    out_features,
    input_format: torch.memory_format = torch.contiguous_format,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    torch._check_value(
        len(output_mask) == 5,
        lambda: f"{op}: expected output_mask to have 5 elements (input, first, core, last, bias), "
        f"but got a list of length {len(output_mask)}: {list(output_mask)}",
    )

    # Same layout as the kernels: every gradient contiguous, skipped ones (0,), but the
    # input's in input_format (a conv's: the layout the kernels read the input in).
    def grad_like(wanted: bool, t: Tensor | None) -> Tensor:
        return input.new_empty(t.shape) if wanted and t is not None else input.new_empty((0,))

    grad_input = grad_like(output_mask[0], input)
    if output_mask[0]:
        grad_input = grad_input.contiguous(memory_format=input_format)
    return (
        grad_input,
        grad_like(output_mask[1], first),
        grad_like(output_mask[2], core),
        grad_like(output_mask[3], last),
        input.new_empty((out_features,)) if output_mask[4] else input.new_empty((0,)),
    )


@torch.library.register_fake("tucker_ops::tucker_conv2d")
def _tucker_conv2d_fake(input, first, core, last, bias, stride, padding, dilation):
    shape = _conv2d_output_shape("tucker_conv2d", input, first, core, last, bias, stride, padding, dilation)
    return input.new_empty(shape).contiguous(memory_format=_conv_memory_format(input))


@torch.library.register_fake("tucker_ops::tucker_linear")
def _tucker_linear_fake(input, first, core, last, bias):
    return input.new_empty(_linear_output_shape("tucker_linear", input, first, core, last, bias))


def _conv_memory_format(input: Tensor) -> torch.memory_format:
    """Mirror of layout.h's ``conv_memory_format``: the kernels read the input, and write the
    output, the kept projection and the input's gradient, in the input's layout: NCHW unless
    the input is channels_last only."""
    if input.is_contiguous() or not input.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


@torch.library.register_fake("tucker_ops::tucker_conv2d_with_intermediates")
def _tucker_conv2d_with_intermediates_fake(input, first, core, last, bias, stride, padding, dilation):
    n, c_out, h_out, w_out = _conv2d_output_shape(
        "tucker_conv2d", input, first, core, last, bias, stride, padding, dilation
    )
    projection = input.new_empty((0,))  # each output its own tensor: outputs must not alias
    if first is not None:
        projection = input.new_empty((n, first.shape[0], *input.shape[2:]))
        projection = projection.contiguous(memory_format=_conv_memory_format(input))
    core_output = input.new_empty((n, core.shape[0], h_out, w_out)) if last is not None else input.new_empty((0,))
    output = input.new_empty((n, c_out, h_out, w_out)).contiguous(memory_format=_conv_memory_format(input))
    return output, projection, core_output


@torch.library.register_fake("tucker_ops::tucker_linear_with_intermediates")
def _tucker_linear_with_intermediates_fake(input, first, core, last, bias):
    shape = _linear_output_shape("tucker_linear", input, first, core, last, bias)
    rows = tuple(input.shape[:-1])
    projection = input.new_empty((*rows, first.shape[0])) if first is not None else input.new_empty((0,))
    core_output = input.new_empty((*rows, core.shape[0])) if last is not None else input.new_empty((0,))
    return input.new_empty(shape), projection, core_output


def _check_intermediate(
    op: str, input: Tensor, t: Tensor | None, name: str, factor: Tensor | None, factor_name: str, expected
) -> None:
    """Like checks.cpp's check_intermediate: only with its factor, like input, the kept shape."""
    if t is None:
        return
    torch._check_value(
        factor is not None,
        lambda: f"{op}: expected {name} to be None when {factor_name} is None (there is no {name} to save "
        f"then), but got a tensor of shape {list(t.shape)}",
    )
    _check_tensors(op, input, ((name, t),))
    torch._check_value(
        t.dim() == len(expected) and all(got == want for got, want in zip(t.shape, expected)),
        lambda: f"{op}: expected {name} to have the shape {list(expected)} that the forward's "
        f"with_intermediates call returns, but got {name} of shape {list(t.shape)}",
    )


@torch.library.register_fake("tucker_ops::tucker_conv2d_backward")
def _tucker_conv2d_backward_fake(
    grad_output, input, first, core, last, stride, padding, dilation, output_mask, projection=None, core_output=None
):
    op = "tucker_conv2d_backward"
    shape = _conv2d_output_shape(op, input, first, core, last, None, stride, padding, dilation)
    _check_grad_output(op, grad_output, input, shape)
    n, _, h_out, w_out = shape
    r_in = first.shape[0] if first is not None else None
    _check_intermediate(op, input, projection, "projection", first, "first", (n, r_in, *input.shape[2:]))
    _check_intermediate(op, input, core_output, "core_output", last, "last", (n, core.shape[0], h_out, w_out))
    return _backward_outputs(op, output_mask, input, first, core, last, shape[1], _conv_memory_format(input))


@torch.library.register_fake("tucker_ops::tucker_linear_backward")
def _tucker_linear_backward_fake(
    grad_output, input, first, core, last, output_mask, projection=None, core_output=None
):
    op = "tucker_linear_backward"
    shape = _linear_output_shape(op, input, first, core, last, None)
    _check_grad_output(op, grad_output, input, shape)
    rows = tuple(input.shape[:-1])
    r_in = first.shape[0] if first is not None else None
    _check_intermediate(op, input, projection, "projection", first, "first", (*rows, r_in))
    _check_intermediate(op, input, core_output, "core_output", last, "last", (*rows, core.shape[0]))
    return _backward_outputs(op, output_mask, input, first, core, last, shape[-1])


# -- autograd -------------------------------------------------------------------------

# The forward ops' autograd is C++ (csrc/autograd.cpp): a torch::autograd::Function
# per op, whose backward calls the *_backward op below autograd, so a training step
# runs no Python. Only with create_graph=True does it call the *_backward op through
# autograd, and then the formulas registered here record the double backward.

# Double backward. The backward ops are linear in grad_output and multilinear
# in the factors; rather than a second set of kernels, their derivative is
# taken through the reference chain (slower, exact), so create_graph=True,
# gradgradcheck and Hessian-vector products give correct results.


def _double_backward(
    ctx, chain: Callable[..., Tensor], grads_of_grads: Sequence[Tensor], out_features
) -> list[Tensor | None]:
    saved = ctx.saved_tensors  # grad_output, input, first, core, last
    mask = ctx.output_mask
    result: list[Tensor | None] = [None] * 5
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() if t is not None else None for t in saved]
        bias = saved[0].new_zeros((out_features,)).requires_grad_() if mask[4] else None
        operands = [*leaves[1:], bias]  # the forward's inputs, in backward-output order
        produced = [i for i in range(5) if mask[i] and operands[i] is not None]
        targets = [j for j in range(5) if ctx.needs_input_grad[j] and leaves[j] is not None]
        if not produced or not targets:
            return result
        y = chain(*operands)
        first_order = torch.autograd.grad(y, [operands[i] for i in produced], leaves[0], create_graph=True)
        second = torch.autograd.grad(
            first_order,
            [leaves[j] for j in targets],
            [grads_of_grads[i] for i in produced],
            allow_unused=True,
        )
    for j, g in zip(targets, second):
        result[j] = g
    return result


# The saved intermediates (the last two inputs of each backward op) are
# functions of input and the factors: the formulas differentiate through those,
# and the intermediates get no gradient of their own.


def _conv2d_backward_setup_context(ctx, inputs, output) -> None:
    grad_output, input, first, core, last, stride, padding, dilation, output_mask = inputs[:9]
    ctx.save_for_backward(grad_output, input, first, core, last)
    ctx.conv_args = (stride, padding, dilation)
    ctx.output_mask = tuple(output_mask)


def _conv2d_double_backward(ctx, *grads_of_grads: Tensor):
    def chain(input, first, core, last, bias):
        return reference.tucker_conv2d(input, first, core, last, bias, *ctx.conv_args)

    out_features = ctx.saved_tensors[0].shape[1]
    return (*_double_backward(ctx, chain, grads_of_grads, out_features), None, None, None, None, None, None)


def _linear_backward_setup_context(ctx, inputs, output) -> None:
    grad_output, input, first, core, last, output_mask = inputs[:6]
    ctx.save_for_backward(grad_output, input, first, core, last)
    ctx.output_mask = tuple(output_mask)


def _linear_double_backward(ctx, *grads_of_grads: Tensor):
    out_features = ctx.saved_tensors[0].shape[-1]
    return (*_double_backward(ctx, reference.tucker_linear, grads_of_grads, out_features), None, None, None)


torch.library.register_autograd(
    "tucker_ops::tucker_conv2d_backward", _conv2d_double_backward, setup_context=_conv2d_backward_setup_context
)
torch.library.register_autograd(
    "tucker_ops::tucker_linear_backward", _linear_double_backward, setup_context=_linear_backward_setup_context
)


# -- entry points ---------------------------------------------------------------------

# Module-level flag read on every call. torch.compile guards on it, so toggling
# it recompiles rather than running a stale graph.
_use_reference_flag = False


@contextlib.contextmanager
def use_reference(enabled: bool = True) -> Iterator[None]:
    """While active, entry points called with ``backend=None`` run ``reference.py``.

    Nests: the previous setting is restored on exit, so ``use_reference(False)``
    inside ``use_reference()`` re-enables the fused ops for its block.
    """
    global _use_reference_flag
    previous = _use_reference_flag
    _use_reference_flag = bool(enabled)
    try:
        yield
    finally:
        _use_reference_flag = previous


@contextlib.contextmanager
def keep_intermediates(enabled: bool | None = True) -> Iterator[None]:
    """While active, CPU training steps keep (``True``) or recompute (``False``) the chain's intermediates.

    In a forward that records the autograd graph on the CPU, the ops normally keep
    the projection and the core output (conv ``(N, R_in, H, W)`` and ``(N, R_out,
    H_out, W_out)``; linear ``(..., R_in)`` and ``(..., R_out)``, what an
    ``nn.Sequential`` chain keeps) so the backward need not recompute them. Keeping
    is faster; ``keep_intermediates(False)`` trades that speed for the activation
    memory, the way activation checkpointing does. ``None`` restores the automatic
    choice (``TUCKER_OPS_KEEP_INTERMEDIATES=1`` / ``0`` when set, else per-layer
    rules). The choice is made in the forward, so wrap the forward pass. The
    setting is process-wide (not per thread), overrides the environment variable,
    and nests: the previous setting is restored on exit. Use it outside compiled
    regions (``torch.compile`` bakes the choice in when it traces). The CUDA backward
    always recomputes.

    Example::

        with tucker_ops.keep_intermediates(False):
            loss = criterion(model(x), y)
        loss.backward()
    """
    mode = -1 if enabled is None else int(bool(enabled))
    previous = _OPS._set_keep_intermediates(mode)
    try:
        yield
    finally:
        _OPS._set_keep_intermediates(previous)


def _runs_reference(backend: str | None) -> bool:
    if backend is None:
        return _use_reference_flag
    if isinstance(backend, str) and backend in _BACKENDS:
        return backend == "reference"
    raise ValueError(f"backend must be None, 'fused' or 'reference', but got {backend!r}")


def _pair(value: int | Sequence[int], name: str) -> tuple:
    # Modules pass ready-made tuples on every call: skip the ABC isinstance
    # checks below (about 1 us each time, several per conv call). Their lengths
    # and elements are checked by the op itself, like every other value.
    if type(value) is tuple:
        return value
    if isinstance(value, (bool, str)):
        raise TypeError(f"{name} must be an int or a sequence of 2 ints, but got {value!r}")
    if isinstance(value, (int, torch.SymInt)):
        return (value, value)
    if isinstance(value, Sequence):
        return tuple(value)
    raise TypeError(f"{name} must be an int or a sequence of 2 ints, but got {type(value).__name__} {value!r}")


def tucker_conv2d(
    input: Tensor,
    first: Tensor | None,
    core: Tensor,
    last: Tensor | None,
    bias: Tensor | None,
    stride: int | Sequence[int] = (1, 1),
    padding: int | Sequence[int] = (0, 0),
    dilation: int | Sequence[int] = (1, 1),
    *,
    backend: str | None = None,
) -> Tensor:
    """Tucker conv chain ``1x1 (first) -> kh x kw (core) -> 1x1 (last) + bias`` in one op.

    Shapes:
        input ``(N, C_in, H, W)``; first ``(R_in, C_in)`` or None; core ``(R_out, R_in | C_in, kh, kw)``;
        last ``(C_out, R_out)`` or None; bias ``(C_out,)`` or None (``C_out = R_out`` without last).
        Returns ``(N, C_out, H_out, W_out)``: channels_last where the input is channels_last
        (and not also contiguous), else contiguous, as ``nn.Conv2d``; the input's gradient
        comes back in the same layout. Other input strides are read through a contiguous copy.
    stride, padding, dilation: an int (both dimensions) or an ``(h, w)`` pair.
    backend: None follows :func:`use_reference` (fused op by default); ``"fused"`` or ``"reference"``.

    On CUDA the forward runs the fused kernel where it is expected to be faster, else the
    unfused chain through cuDNN/cuBLAS under torch's global settings (TF32 follows
    ``torch.backends.cudnn.allow_tf32`` as for ``nn.Conv2d``); the environment variable
    ``TUCKER_OPS_CUDA_FUSED=1`` / ``=0`` forces one path (benchmarks/RESULTS_GPU.md).
    Eager calls of small layers (few output pixels, R_in a multiple of 16 bytes' worth of the
    dtype; float16, bfloat16, and float32 with TF32) run a whole-GPU fused kernel instead: one
    cooperative launch where the chain's three calls are host-bound.
    ``TUCKER_OPS_CUDA_CONV_GRID=1`` / ``=0`` forces it on every shape it takes / turns it off.

    ``torch.func`` transforms (grad, vjp, jacrev, jvp, jacfwd, hessian, vmap) and forward-mode AD
    (``torch.autograd.forward_ad``) work on it.
    """
    use_ref = _runs_reference(backend)
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if use_ref:
        return reference.tucker_conv2d(input, first, core, last, bias, stride, padding, dilation)
    if _needs_python_autograd():
        from . import _functorch

        return _functorch.tucker_conv2d(input, first, core, last, bias, stride, padding, dilation)
    if _fast_calls_apply((input, first, core, last, bias)):
        try:
            return _FAST.tucker_conv2d(input, first, core, last, bias, stride, padding, dilation)
        except TypeError:
            pass  # arguments pybind11 does not convert (SymInts, ...), or the op's own TypeError: torch.ops decides
    return _OPS.tucker_conv2d(input, first, core, last, bias, stride, padding, dilation)


def tucker_linear(
    input: Tensor,
    first: Tensor | None,
    core: Tensor,
    last: Tensor | None,
    bias: Tensor | None,
    *,
    backend: str | None = None,
) -> Tensor:
    """Tucker linear chain ``((input @ first.T) @ core.T) @ last.T + bias`` in one op.

    Shapes:
        input ``(..., in)``; first ``(R_in, in)`` or None; core ``(R_out, R_in | in)``;
        last ``(out, R_out)`` or None; bias ``(out,)`` or None. Returns ``(..., out)``, contiguous.
    backend: None follows :func:`use_reference` (fused op by default); ``"fused"`` or ``"reference"``.

    On CUDA the forward runs one fused kernel for small factor sets, else three cuBLAS
    products (``TUCKER_OPS_CUDA_FUSED=1`` / ``=0`` force one path).
    Eager calls with factor sets too large for that kernel at few rows (float16, bfloat16,
    float32) run a whole-GPU fused kernel instead, one cooperative launch, where its time model
    beats the three products' host time. ``TUCKER_OPS_CUDA_LINEAR_GRID=1`` / ``=0`` forces it /
    turns it off (benchmarks/RESULTS_GPU.md).

    ``torch.func`` transforms (grad, vjp, jacrev, jvp, jacfwd, hessian, vmap) and forward-mode AD
    (``torch.autograd.forward_ad``) work on it.
    """
    if _runs_reference(backend):
        return reference.tucker_linear(input, first, core, last, bias)
    if _needs_python_autograd():
        from . import _functorch

        return _functorch.tucker_linear(input, first, core, last, bias)
    if _fast_calls_apply((input, first, core, last, bias)):
        try:
            return _FAST.tucker_linear(input, first, core, last, bias)
        except TypeError:
            pass  # see tucker_conv2d
    return _OPS.tucker_linear(input, first, core, last, bias)
