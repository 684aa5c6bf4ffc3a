"""Bad input of every kind, through the ops, the modules and compression, in a child process.

Complements test_op_validation.py (shape/dtype/device checks of the raw ops) with
suspicious padding, non-finite weights, wrong ranks, integer dtypes and
requires_grad on integers, kernels larger than the padded input and zero or
negative strides reached through the public API (modules, entry points,
``compress``). The child prints one JSON line per case before and after running
it, so a signal (segfault, abort) fails the case it was in, and the child's exit
status must be 0. Each case must raise the given Python exception type with a
message containing the given fragments.

Non-finite values: ``decompose_*``, ``from_conv`` / ``from_linear`` and ``compress``
raise on NaN/Inf weights (a decomposition of them is meaningless). The ops do
not check: NaN/Inf in the weights or the input propagate exactly as in the
reference chain (GradScaler and NaN debugging rely on that, and a check would
cost a pass over every weight per call); test_nonfinite_weights_propagate checks it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
import torch
from _bad_input_harness import Outcomes, assert_child_exited_cleanly, assert_clear_error, case_ids, collect_outcomes, run_cases

F32 = torch.float32


def _op_conv(device: str, **overrides):
    args = {
        "input": torch.randn(2, 5, 9, 8, device=device),
        "first": torch.randn(4, 5, device=device),
        "core": torch.randn(6, 4, 3, 3, device=device),
        "last": torch.randn(7, 6, device=device),
        "bias": torch.randn(7, device=device),
        "stride": [1, 1],
        "padding": [0, 0],
        "dilation": [1, 1],
    }
    args.update(overrides)
    return torch.ops.tucker_ops.tucker_conv2d(**args)


def _op_conv_backward(device: str, padding):
    x = torch.randn(2, 5, 9, 8, device=device)
    return torch.ops.tucker_ops.tucker_conv2d_backward(
        torch.randn(2, 7, 15, 14, device=device), x, torch.randn(4, 5, device=device),
        torch.randn(6, 4, 3, 3, device=device), torch.randn(7, 6, device=device),
        [1, 1], padding, [1, 1], [True] * 5,
    )  # fmt: skip


def _conv_module(**kwargs):
    from tucker_ops import TuckerConv2d

    return TuckerConv2d(5, 7, 3, (4, 6), **kwargs)


def _call_conv_module(x, **kwargs):
    return _conv_module(**kwargs)(x)


def _nonfinite(shape, value):
    w = torch.randn(shape)
    w.view(-1)[3] = value
    return w


def _from_conv(value):
    from tucker_ops import TuckerConv2d

    conv = torch.nn.Conv2d(6, 8, 3)
    with torch.no_grad():
        conv.weight.copy_(_nonfinite(conv.weight.shape, value))
    return TuckerConv2d.from_conv(conv, ranks=(3, 4))


def _from_linear(value, ranks=(3, 4)):
    from tucker_ops import TuckerLinear

    lin = torch.nn.Linear(10, 9)
    with torch.no_grad():
        lin.weight.copy_(_nonfinite(lin.weight.shape, value))
    return TuckerLinear.from_linear(lin, ranks=ranks)


def _compress(value, ranks):
    import tucker_ops

    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8, 6))
    with torch.no_grad():
        model[2].weight.copy_(_nonfinite(model[2].weight.shape, value))
    return tucker_ops.compress(model, ranks=ranks)


def _decompose(value):
    from tucker_ops import decompose_conv2d

    return decompose_conv2d(_nonfinite((8, 6, 3, 3), value), (3, 4))


def _linear_module_call(x):
    from tucker_ops import TuckerLinear

    return TuckerLinear(10, 6, (4, 5))(x)


def _module_ranks(cls_name: str, ranks):
    import tucker_ops

    if cls_name == "conv":
        return tucker_ops.TuckerConv2d(5, 7, 3, ranks)
    return tucker_ops.TuckerLinear(5, 7, ranks)


def _entry(**kwargs):
    import tucker_ops

    return tucker_ops.tucker_conv2d(torch.randn(1, 2, 5, 5), None, torch.randn(3, 2, 3, 3), None, None, **kwargs)


def _meta_module_cpu_input():
    from tucker_ops import TuckerLinear

    return TuckerLinear(4, 3, (2, 2), device="meta")(torch.randn(2, 4))


BOTH = ("cpu", "meta")
CPU = ("cpu",)
C = "tucker_conv2d"
NAN, INF = float("nan"), float("inf")
# name -> (call(device), exception type, fragments the message must contain, devices)
CASES: dict[str, tuple[Callable[[str], object], type, tuple[str, ...], tuple[str, ...]]] = {
    # -- suspicious padding (more than the dilated kernel extent)
    "padding_beyond_kernel_extent": (lambda d: _op_conv(d, padding=[4, 0]), ValueError,
                                     (C, "padding along H", "dilated kernel extent", "= 3", "padding 4"), BOTH),
    "padding_beyond_dilated_extent_w": (lambda d: _op_conv(d, padding=[0, 6], dilation=[1, 2]), ValueError,
                                        (C, "padding along W", "= 5", "padding 6", "dilation 2"), BOTH),
    "padding_2_on_pointwise_core": (lambda d: _op_conv(d, core=torch.randn(6, 4, 1, 1, device=d), padding=[2, 2]),
                                    ValueError, (C, "padding along H", "= 1", "padding 2"), BOTH),
    "padding_huge_vs_input": (lambda d: _op_conv(d, padding=[1000, 1000]), ValueError,
                              (C, "padding along H", "padding 1000"), BOTH),
    "padding_suspicious_backward": (lambda d: _op_conv_backward(d, [4, 4]), ValueError,
                                    ("tucker_conv2d_backward", "padding along H", "padding 4"), BOTH),
    "padding_suspicious_module": (lambda d: _call_conv_module(torch.randn(1, 5, 8, 8), padding=5), ValueError,
                                  (C, "padding along H", "padding 5"), CPU),
    # -- kernel larger than the padded input, via the module and the entry point
    "kernel_larger_than_padded_input_module": (lambda d: _call_conv_module(torch.randn(2, 5, 1, 6)), ValueError,
                                               (C, "kernel (kh, kw) = (3, 3)", "does not fit", "(1, 6)"), CPU),
    "kernel_larger_than_padded_input_entry": (lambda d: _entry(padding=0, dilation=(3, 1)), ValueError,
                                              (C, "kernel", "does not fit", "dilation [3, 1]"), CPU),
    # -- zero / negative stride (module constructor, entry point)
    "stride_zero_module": (lambda d: _conv_module(stride=0), ValueError, ("TuckerConv2d", "stride", ">= 1", "0"), CPU),
    "stride_negative_module": (lambda d: _conv_module(stride=(1, -1)), ValueError, ("stride", "(1, -1)"), CPU),
    "stride_zero_entry": (lambda d: _entry(stride=0), ValueError, (C, "stride", ">= 1", "[0, 0]"), CPU),
    "stride_negative_entry": (lambda d: _entry(stride=(2, -3)), ValueError, (C, "stride", "[2, -3]"), CPU),
    "dilation_zero_module": (lambda d: _conv_module(dilation=(0, 1)), ValueError, ("dilation", ">= 1"), CPU),
    # -- wrong ranks
    "ranks_zero_conv": (lambda d: _module_ranks("conv", 0), ValueError, ("ranks", "r_in", ">= 1", "0"), CPU),
    "ranks_negative_linear": (lambda d: _module_ranks("linear", (2, -1)), ValueError, ("r_out", ">= 1", "-1"), CPU),
    "ranks_three_values": (lambda d: _module_ranks("conv", (1, 2, 3)), ValueError, ("ranks", "(r_in, r_out)"), CPU),
    "ranks_float": (lambda d: _module_ranks("linear", (2.5, 2)), ValueError, ("r_in", "2.5"), CPU),
    "ranks_string": (lambda d: _module_ranks("conv", "ab"), ValueError, ("ranks", "'ab'"), CPU),
    "ranks_bool": (lambda d: _module_ranks("linear", (True, 2)), ValueError, ("r_in", "True"), CPU),
    # -- wrong dims / features through the modules
    "conv_module_2d_input": (lambda d: _call_conv_module(torch.randn(5, 8)), ValueError,
                             (C, "input", "4-D", "2-D"), CPU),
    "conv_module_wrong_channels": (lambda d: _call_conv_module(torch.randn(1, 4, 8, 8)), ValueError,
                                   (C, "first", "C_in = 4", "[4, 5]"), CPU),
    "linear_module_wrong_features": (lambda d: _linear_module_call(torch.randn(3, 9)), ValueError,
                                     ("tucker_linear", "in = 9", "[4, 10]"), CPU),
    "linear_module_scalar_input": (lambda d: _linear_module_call(torch.tensor(1.0)), ValueError,
                                   ("tucker_linear", "at least 1-D", "0-D"), CPU),
    # -- dtypes and devices through the modules
    "conv_module_int_input": (lambda d: _call_conv_module(torch.ones(1, 5, 8, 8, dtype=torch.int64)), TypeError,
                              (C, "input", "torch.int64"), CPU),
    "linear_module_int_input": (lambda d: _linear_module_call(torch.ones(3, 10, dtype=torch.int32)), TypeError,
                                ("tucker_linear", "input", "torch.int32"), CPU),
    "conv_module_float64_input_float32_weights": (lambda d: _call_conv_module(torch.randn(1, 5, 8, 8, dtype=torch.float64)),
                                                  TypeError, (C, "same dtype as input", "torch.float64", "torch.float32"), CPU),
    "conv_module_half_on_cpu": (lambda d: _call_conv_module(torch.randn(1, 5, 8, 8, dtype=torch.float16), dtype=torch.float16),
                                TypeError, (C, "torch.float16", "supported on cpu"), CPU),
    "meta_module_cpu_input": (lambda d: _meta_module_cpu_input(), RuntimeError, ("same device as input",), CPU),
    # -- requires_grad on integers: refused by torch itself, before any op runs
    "int_module_parameters": (lambda d: _module_ranks("linear", 2).__class__(5, 7, 2, dtype=torch.int64), RuntimeError,
                              ("floating point",), CPU),
    "int_tensor_requires_grad": (lambda d: torch.ones(3, dtype=torch.int64).requires_grad_(), RuntimeError,
                                 ("floating point",), CPU),
    "module_to_int": (lambda d: _module_ranks("conv", 2).to(torch.int32), TypeError, ("floating point",), CPU),
    # -- non-finite weights refused by decomposition and compression
    "decompose_nan": (lambda d: _decompose(NAN), ValueError, ("decompose_conv2d", "NaN or infinite"), CPU),
    "decompose_inf": (lambda d: _decompose(INF), ValueError, ("NaN or infinite",), CPU),
    "from_conv_nan": (lambda d: _from_conv(NAN), ValueError, ("NaN or infinite",), CPU),
    "from_conv_neg_inf": (lambda d: _from_conv(-INF), ValueError, ("NaN or infinite",), CPU),
    "from_linear_inf_explicit_ranks": (lambda d: _from_linear(INF), ValueError, ("NaN or infinite",), CPU),
    "from_linear_nan_vbmf": (lambda d: _from_linear(NAN, ranks=None), ValueError, ("NaN or infinite",), CPU),
    "compress_nan_explicit": (lambda d: _compress(NAN, (2, 2)), ValueError, ("NaN or infinite",), CPU),
    "compress_inf_auto": (lambda d: _compress(INF, None), ValueError, ("NaN or infinite",), CPU),
}


@pytest.fixture(scope="module")
def outcomes() -> Outcomes:
    return collect_outcomes(__file__)


@pytest.mark.parametrize("name,device", case_ids(CASES))
def test_bad_input_raises_clear_error(outcomes: Outcomes, name: str, device: str) -> None:
    assert_clear_error(CASES, outcomes, name, device)


def test_child_process_exited_cleanly(outcomes: Outcomes) -> None:
    assert_child_exited_cleanly(outcomes)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_padding_up_to_the_kernel_extent_is_accepted(device: str) -> None:
    # extent = dilation * (k - 1) + 1: 3 for a plain 3x3, 5 with dilation 2, 1 for a 1x1 core.
    assert _op_conv(device, padding=[3, 3]).shape == (2, 7, 13, 12)
    assert _op_conv(device, padding=[5, 0], dilation=[2, 1]).shape == (2, 7, 15, 6)
    assert _op_conv(device, core=torch.randn(6, 4, 1, 1, device=device), padding=[1, 1]).shape == (2, 7, 11, 10)


def test_nonfinite_weights_propagate_like_reference() -> None:
    from tucker_ops import reference, tucker_conv2d, tucker_linear

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 9, 8, generator=gen, dtype=torch.float64)
    first, core, last = torch.randn(4, 5, dtype=torch.float64), torch.randn(6, 4, 3, 3, dtype=torch.float64), torch.randn(7, 6, dtype=torch.float64)
    first[1, 2], core[3, 0, 1, 1], last[5, 2] = float("nan"), float("inf"), float("-inf")
    for args in ((x, first, core, last, None), (x, None, torch.randn(6, 5, 3, 3, dtype=torch.float64), last, None)):
        fused = tucker_conv2d(*args, 1, 1, 1)
        ref = reference.tucker_conv2d(*args, (1, 1), (1, 1), (1, 1))
        # Non-finite exactly where the reference is; NaN vs Inf may depend on the kernel's association.
        assert torch.equal(fused.isfinite(), ref.isfinite()) and not fused.isfinite().all()
    v = torch.randn(3, 5, dtype=torch.float64)
    lin = (v, first, torch.randn(6, 4, dtype=torch.float64), last, torch.randn(7, dtype=torch.float64))
    fused, ref = tucker_linear(*lin), reference.tucker_linear(*lin)
    assert torch.equal(fused.isfinite(), ref.isfinite()) and not fused.isfinite().all()


if __name__ == "__main__" and sys.argv[1:] == ["--run-cases"]:
    run_cases(CASES)
