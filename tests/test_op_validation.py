"""Bad arguments raise a clear Python exception and never crash the process.

Every case runs in one child process (this file run as a script), once on CPU
(the C++ checks in csrc/checks.cpp) and once on the meta device (the fake
kernels in tucker_ops/_ops.py). The child prints one JSON line per case as it
goes, so a segfault fails the cases it reached instead of killing pytest.
Each case checks the exception type and that the message names the op, the
argument, the expectation and what was got.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
import torch
from _bad_input_harness import (
    T,
    Outcomes,
    assert_child_exited_cleanly,
    assert_clear_error,
    case_ids,
    collect_outcomes,
    conv_backward_call,
    run_cases,
)

DEVICES = ("cpu", "meta")
F32, F64 = torch.float32, torch.float64




def conv(device: str, op: str = "tucker_conv2d", **overrides):
    args = {
        "input": T(device, 2, 5, 9, 8),
        "first": T(device, 4, 5),
        "core": T(device, 6, 4, 3, 3),
        "last": T(device, 7, 6),
        "bias": T(device, 7),
        "stride": [1, 1],
        "padding": [0, 0],
        "dilation": [1, 1],
    }
    args.update(overrides)
    return getattr(torch.ops.tucker_ops, op)(**args)


def _conv_backward(device: str, overrides: dict):
    return conv_backward_call(device, **overrides)


def linear(device: str, **overrides):
    args = {
        "input": T(device, 3, 10),
        "first": T(device, 4, 10),
        "core": T(device, 5, 4),
        "last": T(device, 6, 5),
        "bias": T(device, 6),
    }
    args.update(overrides)
    return torch.ops.tucker_ops.tucker_linear(**args)


def linear_backward(device: str, **overrides):
    args = {
        "grad_output": T(device, 3, 6),
        "input": T(device, 3, 10),
        "first": T(device, 4, 10),
        "core": T(device, 5, 4),
        "last": T(device, 6, 5),
        "output_mask": [True] * 5,
    }
    args.update(overrides)
    return torch.ops.tucker_ops.tucker_linear_backward(**args)


def entry(device: str, fn: str, **kwargs):
    from tucker_ops import _ops

    if fn == "conv":
        return _ops.tucker_conv2d(T(device, 1, 2, 5, 5), None, T(device, 3, 2, 3, 3), None, None, **kwargs)
    return _ops.tucker_linear(T(device, 2, 4), None, T(device, 3, 4), None, None, **kwargs)


# name -> (call(device), exception type, fragments the message must contain, devices)
Case = tuple[Callable[[str], object], type, tuple[str, ...], tuple[str, ...]]
C, L = "tucker_conv2d", "tucker_linear"
CASES: dict[str, Case] = {
    # -- conv: dimensionality
    "conv_input_3d": (lambda d: conv(d, input=T(d, 5, 9, 8)), ValueError,
                      (C, "input", "4-D", "(N, C_in, H, W)", "3-D", "[5, 9, 8]"), DEVICES),
    "conv_input_5d": (lambda d: conv(d, input=T(d, 1, 2, 5, 9, 8)), ValueError,
                      (C, "input", "4-D", "[1, 2, 5, 9, 8]"), DEVICES),
    "conv_first_1d": (lambda d: conv(d, first=T(d, 4)), ValueError,
                      (C, "first", "2-D", "(R_in, C_in)", "[4]"), DEVICES),
    "conv_first_4d": (lambda d: conv(d, first=T(d, 4, 5, 1, 1)), ValueError,
                      (C, "first", "2-D", "[4, 5, 1, 1]"), DEVICES),
    "conv_core_3d": (lambda d: conv(d, core=T(d, 6, 4, 3)), ValueError,
                     (C, "core", "4-D", "(R_out, R_in, kh, kw)", "[6, 4, 3]"), DEVICES),
    "conv_last_3d": (lambda d: conv(d, last=T(d, 7, 6, 1)), ValueError,
                     (C, "last", "2-D", "(C_out, R_out)", "[7, 6, 1]"), DEVICES),
    "conv_bias_2d": (lambda d: conv(d, bias=T(d, 7, 1)), ValueError, (C, "bias", "1-D", "(C_out,)", "[7, 1]"), DEVICES),
    # -- conv: rank / channel mismatches
    "conv_first_channels": (lambda d: conv(d, first=T(d, 4, 6)), ValueError,
                            (C, "first", "C_in = 5", "input.size(1)", "[4, 6]"), DEVICES),
    "conv_core_vs_first": (lambda d: conv(d, core=T(d, 6, 3, 3, 3)), ValueError,
                           (C, "core.size(1)", "R_in = 4", "first.size(0)", "[6, 3, 3, 3]"), DEVICES),
    "conv_core_vs_input_no_first": (lambda d: conv(d, first=None), ValueError,
                                    (C, "core.size(1)", "C_in = 5", "first is None", "[6, 4, 3, 3]"), DEVICES),
    "conv_last_vs_core": (lambda d: conv(d, last=T(d, 7, 5)), ValueError,
                          (C, "last", "(C_out, R_out)", "R_out = 6", "core.size(0)", "[7, 5]"), DEVICES),
    "conv_bias_vs_last": (lambda d: conv(d, bias=T(d, 8)), ValueError,
                          (C, "bias", "(7,)", "last.size(0)", "[8]"), DEVICES),
    "conv_bias_vs_core_no_last": (lambda d: conv(d, last=None), ValueError,
                                  (C, "bias", "(6,)", "last is None", "[7]"), DEVICES),
    # -- conv: zero-size dimensions
    "conv_input_zero_channels": (lambda d: conv(d, input=T(d, 2, 0, 9, 8), first=T(d, 4, 0)), ValueError,
                                 (C, "input", "non-zero C_in, H and W", "[2, 0, 9, 8]"), DEVICES),
    "conv_input_zero_height": (lambda d: conv(d, input=T(d, 2, 5, 0, 8)), ValueError,
                               (C, "input", "non-zero", "[2, 5, 0, 8]"), DEVICES),
    "conv_first_zero_rank": (lambda d: conv(d, first=T(d, 0, 5), core=T(d, 6, 0, 3, 3)), ValueError,
                             (C, "first", "zero-size", "[0, 5]"), DEVICES),
    "conv_core_zero_rank": (lambda d: conv(d, core=T(d, 0, 4, 3, 3), last=T(d, 7, 0)), ValueError,
                            (C, "core", "zero-size", "[0, 4, 3, 3]"), DEVICES),
    "conv_core_zero_kernel": (lambda d: conv(d, core=T(d, 6, 4, 0, 3)), ValueError,
                              (C, "core", "zero-size", "[6, 4, 0, 3]"), DEVICES),
    "conv_last_zero_out": (lambda d: conv(d, last=T(d, 0, 6), bias=None), ValueError,
                           (C, "last", "zero-size", "[0, 6]"), DEVICES),
    # -- conv: stride / padding / dilation
    "conv_stride_zero": (lambda d: conv(d, stride=[0, 1]), ValueError, (C, "stride", ">= 1", "[0, 1]"), DEVICES),
    "conv_stride_negative": (lambda d: conv(d, stride=[1, -2]), ValueError, (C, "stride", ">= 1", "[1, -2]"), DEVICES),
    "conv_dilation_zero": (lambda d: conv(d, dilation=[1, 0]), ValueError, (C, "dilation", ">= 1", "[1, 0]"), DEVICES),
    "conv_padding_negative": (lambda d: conv(d, padding=[-1, 0]), ValueError,
                              (C, "padding", ">= 0", "[-1, 0]"), DEVICES),
    "conv_stride_length_3": (lambda d: conv(d, stride=[1, 1, 1]), ValueError,
                             (C, "stride", "2 elements", "length 3", "[1, 1, 1]"), DEVICES),
    "conv_padding_length_1": (lambda d: conv(d, padding=[1]), ValueError,
                              (C, "padding", "2 elements", "length 1"), DEVICES),
    "conv_dilation_length_3": (lambda d: conv(d, dilation=[1, 1, 1]), ValueError,
                               (C, "dilation", "2 elements", "length 3"), DEVICES),
    "conv_kernel_larger_than_input": (lambda d: conv(d, input=T(d, 2, 5, 2, 8)), ValueError,
                                      (C, "kernel (kh, kw) = (3, 3)", "(2, 8)", "at least (1, 1)", "(0, 6)"), DEVICES),
    "conv_dilated_kernel_too_large": (lambda d: conv(d, dilation=[1, 4]), ValueError,
                                      (C, "kernel", "dilation [1, 4]", "(9, 8)", "(7, 0)"), DEVICES),
    "conv_huge_padding": (lambda d: conv(d, padding=[2**62, 0]), ValueError,
                          (C, "padding", "too large", "64-bit"), DEVICES),
    "conv_huge_dilation": (lambda d: conv(d, dilation=[1, 2**62]), ValueError,
                           (C, "dilation", "too large", "64-bit"), DEVICES),
    # -- conv: dtypes and devices
    "conv_int_input": (lambda d: conv(d, input=T(d, 2, 5, 9, 8, dtype=torch.int64)), TypeError,
                       (C, "input", "torch.int64"), DEVICES),
    "conv_bool_input": (lambda d: conv(d, input=T(d, 2, 5, 9, 8, dtype=torch.bool)), TypeError,
                        (C, "input", "torch.bool"), DEVICES),
    "conv_complex_input": (lambda d: conv(d, input=T(d, 2, 5, 9, 8, dtype=torch.complex64)), TypeError,
                           (C, "input", "torch.complex64"), DEVICES),
    "conv_half_input_cpu": (lambda d: conv(d, **{k: T(d, *s, dtype=torch.float16) for k, s in
                                                 (("input", (2, 5, 9, 8)), ("first", (4, 5)), ("core", (6, 4, 3, 3)),
                                                  ("last", (7, 6)), ("bias", (7,)))}),
                            TypeError, (C, "input", "torch.float32, torch.float64", "cpu", "torch.float16"), ("cpu",)),
    "conv_mixed_dtype_core": (lambda d: conv(d, core=T(d, 6, 4, 3, 3, dtype=F64)), TypeError,
                              (C, "core", "same dtype as input", "torch.float32", "torch.float64"), DEVICES),
    "conv_mixed_dtype_first": (lambda d: conv(d, first=T(d, 4, 5, dtype=F64)), TypeError,
                               (C, "first", "same dtype", "torch.float64"), DEVICES),
    "conv_mixed_dtype_last": (lambda d: conv(d, last=T(d, 7, 6, dtype=torch.int32)), TypeError,
                              (C, "last", "same dtype", "torch.int32"), DEVICES),
    "conv_mixed_dtype_bias": (lambda d: conv(d, bias=T(d, 7, dtype=F64)), TypeError,
                              (C, "bias", "same dtype", "torch.float64"), DEVICES),
    "conv_mixed_device_core": (lambda d: conv(d, core=T("meta" if d == "cpu" else "cpu", 6, 4, 3, 3)), RuntimeError,
                               (C, "core", "same device as input"), DEVICES),
    "conv_mixed_device_bias": (lambda d: conv(d, bias=T("meta" if d == "cpu" else "cpu", 7)), RuntimeError,
                               (C, "bias", "same device as input"), DEVICES),
    # -- conv backward
    "conv_backward_grad_shape": (lambda d: _conv_backward(d, {"grad_output": T(d, 2, 7, 7, 5)}), ValueError,
                                 ("tucker_conv2d_backward", "grad_output", "[2, 7, 7, 6]", "[2, 7, 7, 5]"), DEVICES),
    "conv_backward_grad_dims": (lambda d: _conv_backward(d, {"grad_output": T(d, 7, 7, 6)}), ValueError,
                                ("tucker_conv2d_backward", "grad_output", "[2, 7, 7, 6]", "[7, 7, 6]"), DEVICES),
    "conv_backward_grad_dtype": (lambda d: _conv_backward(d, {"grad_output": T(d, 2, 7, 7, 6, dtype=F64)}),
                                 TypeError, ("tucker_conv2d_backward", "grad_output", "torch.float64"), DEVICES),
    "conv_backward_rank_mismatch": (lambda d: _conv_backward(d, {"last": T(d, 7, 5)}), ValueError,
                                    ("tucker_conv2d_backward", "last", "R_out = 6", "[7, 5]"), DEVICES),
    # On CPU the dispatcher converts bool[5] to a C++ array before the kernel runs and raises its own error.
    "conv_backward_mask_length_cpu": (lambda d: _conv_backward(d, {"output_mask": [True] * 4}), RuntimeError,
                                      ("4 elements", "size 5"), ("cpu",)),
    "conv_backward_mask_length_meta": (lambda d: _conv_backward(d, {"output_mask": [True] * 4}), ValueError,
                                       ("tucker_conv2d_backward", "output_mask", "5 elements", "length 4"), ("meta",)),
    # -- linear
    "linear_input_0d": (lambda d: linear(d, input=T(d)), ValueError, (L, "input", "at least 1-D", "0-D"), DEVICES),
    "linear_input_features": (lambda d: linear(d, input=T(d, 3, 9)), ValueError,
                              (L, "first", "in = 9", "input.size(-1)", "[4, 10]"), DEVICES),
    "linear_input_zero_features": (lambda d: linear(d, input=T(d, 3, 0), first=T(d, 4, 0)), ValueError,
                                   (L, "input", "non-zero in", "[3, 0]"), DEVICES),
    "linear_first_1d": (lambda d: linear(d, first=T(d, 10)), ValueError,
                        (L, "first", "2-D", "(R_in, in)", "[10]"), DEVICES),
    "linear_core_3d": (lambda d: linear(d, core=T(d, 5, 4, 1)), ValueError,
                       (L, "core", "2-D", "(R_out, R_in)", "[5, 4, 1]"), DEVICES),
    "linear_last_1d": (lambda d: linear(d, last=T(d, 6)), ValueError,
                       (L, "last", "2-D", "(out, R_out)", "[6]"), DEVICES),
    "linear_bias_2d": (lambda d: linear(d, bias=T(d, 1, 6)), ValueError, (L, "bias", "1-D", "[1, 6]"), DEVICES),
    "linear_core_vs_first": (lambda d: linear(d, core=T(d, 5, 3)), ValueError,
                             (L, "core.size(1)", "R_in = 4", "[5, 3]"), DEVICES),
    "linear_core_vs_input_no_first": (lambda d: linear(d, first=None), ValueError,
                                      (L, "core.size(1)", "in = 10", "first is None", "[5, 4]"), DEVICES),
    "linear_last_vs_core": (lambda d: linear(d, last=T(d, 6, 4)), ValueError,
                            (L, "last", "(out, R_out)", "R_out = 5", "[6, 4]"), DEVICES),
    "linear_bias_vs_last": (lambda d: linear(d, bias=T(d, 5)), ValueError, (L, "bias", "(6,)", "[5]"), DEVICES),
    "linear_zero_rank": (lambda d: linear(d, core=T(d, 0, 4), last=T(d, 6, 0)), ValueError,
                         (L, "core", "zero-size", "[0, 4]"), DEVICES),
    "linear_int_input": (lambda d: linear(d, input=T(d, 3, 10, dtype=torch.int32)), TypeError,
                         (L, "input", "torch.int32"), DEVICES),
    "linear_mixed_dtype": (lambda d: linear(d, core=T(d, 5, 4, dtype=F64)), TypeError,
                           (L, "core", "same dtype", "torch.float32", "torch.float64"), DEVICES),
    "linear_mixed_device": (lambda d: linear(d, first=T("meta" if d == "cpu" else "cpu", 4, 10)), RuntimeError,
                            (L, "first", "same device as input"), DEVICES),
    "linear_backward_grad_shape": (lambda d: linear_backward(d, grad_output=T(d, 3, 5)), ValueError,
                                   ("tucker_linear_backward", "grad_output", "[3, 6]", "[3, 5]"), DEVICES),
    # -- Python entry points
    "entry_bad_backend": (lambda d: entry(d, "conv", backend="gpu"), ValueError,
                          ("backend", "'fused'", "'reference'", "'gpu'"), DEVICES),
    "entry_bad_backend_linear": (lambda d: entry(d, "linear", backend=1), ValueError, ("backend", "1"), DEVICES),
    "entry_bool_stride": (lambda d: entry(d, "conv", stride=True), TypeError, ("stride", "True"), DEVICES),
    "entry_str_padding": (lambda d: entry(d, "conv", padding="1"), TypeError, ("padding", "'1'"), DEVICES),
    "entry_float_dilation": (lambda d: entry(d, "conv", dilation=1.5), TypeError, ("dilation", "1.5"), DEVICES),
}


@pytest.fixture(scope="module")
def outcomes() -> Outcomes:
    return collect_outcomes(__file__)


@pytest.mark.parametrize("name,device", case_ids(CASES))
def test_bad_input_raises_clear_error(outcomes: Outcomes, name: str, device: str) -> None:
    assert_clear_error(CASES, outcomes, name, device)


def test_child_process_exited_cleanly(outcomes: Outcomes) -> None:
    assert_child_exited_cleanly(outcomes)


if __name__ == "__main__" and sys.argv[1:] == ["--run-cases"]:
    run_cases(CASES)
