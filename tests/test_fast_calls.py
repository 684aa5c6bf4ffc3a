"""The entry points' direct calls (csrc/python/fast_calls.cpp) against the torch.ops route.

``tucker_ops._ops.tucker_conv2d`` / ``tucker_linear`` call the ops through the compiled
module's typed dispatcher handles in eager mode, and through ``torch.ops`` where the
Python layer matters (``__torch_function__`` overrides and modes, Dynamo). Both routes
must give the same results, gradients and errors.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from tucker_ops import _ops

OPS = torch.ops.tucker_ops


def _conv_args(dtype=torch.float32, bias=True, first=True, last=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 9, 8, generator=g, dtype=dtype)
    f = torch.randn(3, 6, generator=g, dtype=dtype) if first else None
    core = torch.randn(4, 3 if first else 6, 3, 3, generator=g, dtype=dtype)
    l = torch.randn(5, 4, generator=g, dtype=dtype) if last else None
    b = torch.randn(5 if last else 4, generator=g, dtype=dtype) if bias else None
    return x, f, core, l, b


def _linear_args(dtype=torch.float32, bias=True, first=True, last=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 2, 7, generator=g, dtype=dtype)
    f = torch.randn(4, 7, generator=g, dtype=dtype) if first else None
    core = torch.randn(5, 4 if first else 7, generator=g, dtype=dtype)
    l = torch.randn(6, 5, generator=g, dtype=dtype) if last else None
    b = torch.randn(6 if last else 5, generator=g, dtype=dtype) if bias else None
    return x, f, core, l, b


def test_the_direct_calls_are_loaded():
    # A silent fallback would cost every small layer several microseconds a call.
    assert _ops._FAST is not None
    assert _ops._fast_calls_apply((torch.randn(1), None))


class _RecordOps(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.funcs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.funcs.append(func)
        return func(*args, **(kwargs or {}))


def _assert_routes_agree(direct_call, ops_call, operands):
    leaves = [t.requires_grad_(True) for t in operands if t is not None]
    results = []
    for call in (direct_call, ops_call):
        out = call(*operands)
        results.append((out, torch.autograd.grad(out.square().sum(), leaves)))
    (direct, direct_grads), (via_ops, ops_grads) = results
    torch.testing.assert_close(direct, via_ops, rtol=0, atol=0)
    for a, e in zip(direct_grads, ops_grads):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("factors", ["tucker2", "no_first", "no_last", "no_bias"])
def test_conv2d_direct_call_matches_torch_ops(factors):
    operands = _conv_args(
        torch.float64, bias=factors != "no_bias", first=factors != "no_first", last=factors != "no_last"
    )
    _assert_routes_agree(
        lambda *a: _ops.tucker_conv2d(*a, 2, (1, 0), (1, 2), backend="fused"),
        lambda *a: OPS.tucker_conv2d(*a, (2, 2), (1, 0), (1, 2)),
        operands,
    )


@pytest.mark.parametrize("factors", ["tucker2", "no_first", "no_last", "no_bias"])
def test_linear_direct_call_matches_torch_ops(factors):
    operands = _linear_args(
        torch.float64, bias=factors != "no_bias", first=factors != "no_first", last=factors != "no_last"
    )
    _assert_routes_agree(lambda *a: _ops.tucker_linear(*a, backend="fused"), OPS.tucker_linear, operands)


def test_direct_calls_pass_gradcheck():
    x, f, core, l, b = _conv_args(torch.float64)
    x = x[:1, :, :5, :5].clone()
    args = [t.requires_grad_(True) for t in (x, f, core, l, b)]
    assert torch.autograd.gradcheck(lambda *a: _ops.tucker_conv2d(*a, 1, 1, 1, backend="fused"), args)
    xl, fl, cl, ll, bl = (t.requires_grad_(True) for t in _linear_args(torch.float64))
    assert torch.autograd.gradcheck(lambda *a: _ops.tucker_linear(*a, backend="fused"), (xl, fl, cl, ll, bl))


def _error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


@pytest.mark.parametrize(
    "case",
    ["channels_mismatch", "bias_shape", "stride_zero", "stride_three_values", "stride_float", "input_not_tensor"],
)
def test_conv2d_errors_match_torch_ops(case):
    x, f, core, l, b = _conv_args()
    stride, padding, dilation = (1, 1), (0, 0), (1, 1)
    if case == "channels_mismatch":
        x = x[:, :5]
    elif case == "bias_shape":
        b = b[:3]
    elif case == "stride_zero":
        stride = (0, 1)
    elif case == "stride_three_values":
        stride = (1, 1, 1)
    elif case == "stride_float":
        stride = (1.5, 1)
    elif case == "input_not_tensor":
        x = x.tolist()
    direct = _error(lambda: _ops.tucker_conv2d(x, f, core, l, b, stride, padding, dilation, backend="fused"))
    via_ops = _error(lambda: OPS.tucker_conv2d(x, f, core, l, b, stride, padding, dilation))
    assert direct == via_ops


@pytest.mark.parametrize("case", ["features_mismatch", "core_shape", "dtype_mismatch"])
def test_linear_errors_match_torch_ops(case):
    x, f, core, l, b = _linear_args()
    if case == "features_mismatch":
        x = x[..., :6]
    elif case == "core_shape":
        core = core[:, :3]
    elif case == "dtype_mismatch":
        core = core.double()
    direct = _error(lambda: _ops.tucker_linear(x, f, core, l, b, backend="fused"))
    via_ops = _error(lambda: OPS.tucker_linear(x, f, core, l, b))
    assert direct == via_ops
    assert direct[0] is not TypeError or case == "dtype_mismatch"


def test_torch_function_modes_see_the_op():
    # A TorchFunctionMode (and a tensor subclass with __torch_function__) is a Python-layer
    # feature: the entry points keep torch.ops for it, and the mode sees the op called.
    x, f, core, l, b = _conv_args()
    with _RecordOps() as mode:
        _ops.tucker_conv2d(x, f, core, l, b, 1, 1, 1, backend="fused")
        _ops.tucker_linear(*_linear_args(), backend="fused")
    names = [getattr(fn, "__name__", str(fn)) for fn in mode.funcs]
    assert any("tucker_conv2d" in n for n in names), names
    assert any("tucker_linear" in n for n in names), names


def test_fake_tensors_take_the_direct_call():
    # FakeTensorMode dispatches below the Python layer (the Python dispatch key), so the
    # direct call serves it and the fake kernel gives the shape.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x, f, core, l, b = (mode.from_tensor(t) for t in _conv_args())
        out = _ops.tucker_conv2d(x, f, core, l, b, 1, 1, 1, backend="fused")
        assert out.shape == (2, 5, 9, 8)
        assert not _ops._has_torch_function((x, f, core, l, b))
