"""FlopCounterMode counts the tucker ops, forward and backward, through the registered formulas.

The independent check is the reference chain (reference.py), which FlopCounterMode
counts through aten's own convolution / mm formulas: the fused forward must count
exactly the same, and the fused backward the same plus the forward recomputation
it does when the forward did not keep the intermediates (see tucker_ops/flops.py;
TUCKER_OPS_KEEP_INTERMEDIATES forces either way).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tucker_ops
from tucker_ops import TuckerConv2d, TuckerLinear, reference

OPS = torch.ops.tucker_ops


def _count(fn) -> tuple[int, dict]:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops(), counter.get_flop_counts()["Global"]


def _conv_args(first: bool, last: bool, bias: bool, requires: tuple[bool, ...]):
    gen = torch.Generator().manual_seed(0)

    def t(*shape, grad=False):
        return torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_(grad)

    x = t(2, 5, 11, 9, grad=requires[0])
    a = t(3, 5, grad=requires[1]) if first else None
    g = t(4, 3 if first else 5, 3, 2, grad=requires[2])
    b = t(7, 4, grad=requires[3]) if last else None
    c = t(7 if last else 4, grad=requires[4]) if bias else None
    return x, a, g, b, c


CONV_OPTS = ((2, 1), (1, 2), (2, 1))  # stride, padding, dilation


def _recompute_macs(first_macs: int, core_macs: int, has_first: bool, has_last: bool, requires, keep: str) -> int:
    """Forward work the fused backward redoes (the reference saved it instead): none when kept."""
    if keep == "1":
        return 0
    need_core, need_last = requires[2], requires[3] and has_last
    macs = 0
    if (need_core or need_last) and has_first:
        macs += first_macs
    if need_last:
        macs += core_macs
    return macs


@pytest.mark.parametrize("first,last,bias", list(itertools.product((True, False), repeat=3)))
@pytest.mark.parametrize(
    "requires", [(True,) * 5, (False, True, True, True, True), (True, False, False, False, False), (False, False, True, False, False)]
)
@pytest.mark.parametrize("keep", ["0", "1"])
def test_conv2d_forward_and_backward_count_like_the_reference(first, last, bias, requires, keep, monkeypatch) -> None:
    if not any(r for r, present in zip(requires, (True, first, True, last, bias)) if present):
        pytest.skip(reason="no gradient requested")
    monkeypatch.setenv("TUCKER_OPS_KEEP_INTERMEDIATES", keep)
    args = _conv_args(first, last, bias, requires)
    fused_out = tucker_ops.tucker_conv2d(*args, *CONV_OPTS, backend="fused")
    ref_out = reference.tucker_conv2d(*args, *CONV_OPTS)
    fwd, per_op = _count(lambda: tucker_ops.tucker_conv2d(*args, *CONV_OPTS, backend="fused"))
    ref_fwd, _ = _count(lambda: reference.tucker_conv2d(*args, *CONV_OPTS))
    assert fwd == ref_fwd > 0
    kept = keep == "1" and (first or last)
    assert set(per_op) == {OPS.tucker_conv2d_with_intermediates if kept else OPS.tucker_conv2d}

    grad = torch.randn_like(fused_out)
    bwd, per_op = _count(lambda: fused_out.backward(grad))
    ref_bwd, _ = _count(lambda: ref_out.backward(grad))
    x, a, g, b, _ = args
    n, _, h, w = x.shape
    ho, wo = fused_out.shape[2:]
    first_macs = n * h * w * x.shape[1] * a.shape[0] if first else 0
    core_macs = n * ho * wo * g.numel()
    assert set(per_op) == {OPS.tucker_conv2d_backward}
    assert bwd == ref_bwd + 2 * _recompute_macs(first_macs, core_macs, first, last, requires, keep)


@pytest.mark.parametrize("first,last,bias", list(itertools.product((True, False), repeat=3)))
@pytest.mark.parametrize("requires", [(True,) * 5, (False, True, True, True, True), (True, False, False, False, False)])
@pytest.mark.parametrize("keep", ["0", "1"])
def test_linear_forward_and_backward_count_like_the_reference(first, last, bias, requires, keep, monkeypatch) -> None:
    monkeypatch.setenv("TUCKER_OPS_KEEP_INTERMEDIATES", keep)
    gen = torch.Generator().manual_seed(1)

    def t(*shape, grad=False):
        return torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_(grad)

    # 3-D input: the reference runs matmul on (..., in), the fused op flattens rows.
    x = t(2, 3, 10, grad=requires[0])
    a = t(4, 10, grad=requires[1]) if first else None
    g = t(5, 4 if first else 10, grad=requires[2])
    b = t(6, 5, grad=requires[3]) if last else None
    c = t(6 if last else 5, grad=requires[4]) if bias else None
    if not any(r for r, p in zip(requires, (x, a, g, b, c)) if p is not None):
        pytest.skip(reason="no gradient requested")
    args = (x, a, g, b, c)
    fused_out = tucker_ops.tucker_linear(*args, backend="fused")
    ref_out = reference.tucker_linear(*args)
    fwd, _ = _count(lambda: tucker_ops.tucker_linear(*args, backend="fused"))
    ref_fwd, _ = _count(lambda: reference.tucker_linear(*args))
    assert fwd == ref_fwd > 0
    grad = torch.randn_like(fused_out)
    bwd, per_op = _count(lambda: fused_out.backward(grad))
    ref_bwd, _ = _count(lambda: ref_out.backward(grad))
    rows = 6
    first_macs = rows * 10 * 4 if first else 0
    core_macs = rows * g.numel()
    assert set(per_op) == {OPS.tucker_linear_backward}
    assert bwd == ref_bwd + 2 * _recompute_macs(first_macs, core_macs, first, last, requires, keep)


def test_module_flops_are_twice_its_macs() -> None:
    conv = TuckerConv2d(6, 10, 3, (3, 4), stride=2, padding="valid", dilation=(1, 2), bias=False)
    same = TuckerConv2d(6, 10, 4, (None, 4), padding="same", padding_mode="reflect")  # explicit F.pad path
    lin = TuckerLinear(20, 8, (None, 5))
    for module, shape in ((conv, (3, 6, 17, 15)), (same, (2, 6, 9, 8)), (lin, (4, 7, 20))):
        total, _ = _count(lambda: module(torch.randn(shape)))
        assert total == 2 * module.macs(shape)


def test_compress_report_macs_agree_with_flop_counter() -> None:
    pytest.importorskip("tensorly", reason="compress decomposes with tensorly")
    torch.manual_seed(0)
    dense = tucker_ops.ThesisNet().eval()
    example = torch.randn(3, 1, 28, 28)
    compressed, report = tucker_ops.compress(dense, ranks=tucker_ops.thesis_ranks(), example_input=example)
    compressed.eval()
    with torch.no_grad():
        before, _ = _count(lambda: dense(example))
        after, per_op = _count(lambda: compressed(example))
    assert before == 2 * report.macs_before
    assert after == 2 * report.macs_after
    assert OPS.tucker_conv2d in per_op and OPS.tucker_linear in per_op


def test_formulas_are_registered_for_every_op() -> None:
    from torch.utils.flop_counter import flop_registry

    for name in ("tucker_conv2d", "tucker_linear", "tucker_conv2d_backward", "tucker_linear_backward"):
        assert getattr(OPS, name) in flop_registry
