"""Hypothesis property tests of the whole op contract against reference.py.

Drawn: batch (including 0), channels, spatial sizes, kernel, stride, padding,
dilation, ranks, Tucker-2 / Tucker-1 on either side / no factor at all, bias,
float32 / float64, memory formats (contiguous, channels_last, strided views,
transposed factors) and which arguments require grad (so every output_mask of
the backward ops). Forward and backward must match the reference chain run in
float64 on the same values; NaN and Inf in the input must make exactly the
outputs non-finite that the reference makes non-finite (and NaN exactly NaN).

The ``ci`` hypothesis profile (default) runs a few dozen derandomized examples
per test; ``pytest --slow`` runs the ``slow`` profile (thousands). See conftest.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed")
from hypothesis import given, strategies as st  # noqa: E402

import tucker_ops  # noqa: E402
from test_ops_fused_paths import conv_output_format  # noqa: E402
from tucker_ops import reference  # noqa: E402

DTYPES = (torch.float32, torch.float64)
LAYOUTS = ("contiguous", "channels_last", "strided", "transposed")


def _tolerance(dtype: torch.dtype, ref: torch.Tensor) -> dict:
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    if dtype == torch.float32:
        return {"rtol": 1e-4, "atol": 1e-5 * (1.0 + scale)}
    return {"rtol": 1e-10, "atol": 1e-12 * (1.0 + scale)}


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a view into a wider buffer: non-unit last stride
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


@dataclass
class Call:
    """One op call: the tensors (any of first/last/bias may be None), which require grad, and options."""

    tensors: list[torch.Tensor | None]
    requires: list[bool]
    options: tuple
    dtype: torch.dtype


def _tensors(draw, shapes, dtype: torch.dtype) -> tuple[list, list[bool]]:
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    tensors, requires = [], []
    for i, shape in enumerate(shapes):
        if shape is None:
            tensors.append(None)
            requires.append(False)
            continue
        t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        tensors.append(_layout(t, draw(st.sampled_from(LAYOUTS))))
        requires.append(draw(st.booleans()))
    return tensors, requires


@st.composite
def conv_calls(draw) -> Call:
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dil = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    extent = (dil[0] * (kh - 1) + 1, dil[1] * (kw - 1) + 1)
    pad = (draw(st.integers(0, min(3, extent[0]))), draw(st.integers(0, min(3, extent[1]))))
    # Smallest input the dilated kernel fits once padded, then a few more pixels.
    h = max(1, extent[0] - 2 * pad[0]) + draw(st.integers(0, 6))
    w = max(1, extent[1] - 2 * pad[1]) + draw(st.integers(0, 6))
    n, c_in = draw(st.integers(0, 3)), draw(st.integers(1, 6))
    side = draw(st.sampled_from(("tucker2", "tucker2", "no_first", "no_last", "core_only")))
    r_in = None if side in ("no_first", "core_only") else draw(st.integers(1, 6))
    r_out = draw(st.integers(1, 6))
    c_out = None if side in ("no_last", "core_only") else draw(st.integers(1, 7))
    out_channels = c_out or r_out
    bias = draw(st.booleans())
    dtype = draw(st.sampled_from(DTYPES))
    shapes = [
        (n, c_in, h, w),
        (r_in, c_in) if r_in else None,
        (r_out, r_in or c_in, kh, kw),
        (c_out, r_out) if c_out else None,
        (out_channels,) if bias else None,
    ]
    tensors, requires = _tensors(draw, shapes, dtype)
    return Call(tensors, requires, (stride, pad, dil), dtype)


@st.composite
def linear_calls(draw) -> Call:
    lead = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
    fin = draw(st.integers(1, 12))
    side = draw(st.sampled_from(("tucker2", "tucker2", "no_first", "no_last", "core_only")))
    r_in = None if side in ("no_first", "core_only") else draw(st.integers(1, 8))
    r_out = draw(st.integers(1, 8))
    fout = None if side in ("no_last", "core_only") else draw(st.integers(1, 10))
    bias = draw(st.booleans())
    dtype = draw(st.sampled_from(DTYPES))
    shapes = [
        (*lead, fin),
        (r_in, fin) if r_in else None,
        (r_out, r_in or fin),
        (fout, r_out) if fout else None,
        (fout or r_out,) if bias else None,
    ]
    tensors, requires = _tensors(draw, shapes, dtype)
    return Call(tensors, requires, (), dtype)


def _run(fn, call: Call, dtype: torch.dtype | None = None):
    """Output and gradients (for the arguments that require grad) of fn on the call's values."""
    leaves = []
    args = []
    for t, req in zip(call.tensors, call.requires):
        if t is None:
            args.append(None)
            continue
        t = t.detach() if dtype is None else t.detach().to(dtype)
        if req:
            t = t.requires_grad_()
            leaves.append(t)
        args.append(t)
    out = fn(*args, *call.options)
    if not leaves:
        return out.detach(), []
    gen = torch.Generator().manual_seed(7)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    return out.detach(), list(torch.autograd.grad(out, leaves, grad_out))


def _check(fused_fn, reference_fn, call: Call, out_shape_check) -> None:
    out, grads = _run(fused_fn, call)
    ref_out, ref_grads = _run(reference_fn, call, torch.float64)
    assert out.dtype == call.dtype and out.is_contiguous(memory_format=conv_output_format(call.tensors[0]))
    out_shape_check(out)
    torch.testing.assert_close(out.double(), ref_out, **_tolerance(call.dtype, ref_out))
    assert len(grads) == len(ref_grads)
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == call.dtype
        torch.testing.assert_close(g.double(), rg, **_tolerance(call.dtype, rg))


@given(conv_calls())
def test_conv2d_matches_reference(call: Call) -> None:
    x = call.tensors[0]
    _check(
        lambda *a: tucker_ops.tucker_conv2d(*a, backend="fused"),
        reference.tucker_conv2d,
        call,
        lambda out: out.shape[0] == x.shape[0] or pytest.fail("batch size changed"),
    )


@given(linear_calls())
def test_linear_matches_reference(call: Call) -> None:
    x = call.tensors[0]
    _check(
        lambda *a: tucker_ops.tucker_linear(*a, backend="fused"),
        reference.tucker_linear,
        call,
        lambda out: out.shape[:-1] == x.shape[:-1] or pytest.fail("leading dimensions changed"),
    )


def _float64(args: list) -> list:
    # The oracle runs in float64: PyTorch 2.14.1's float32 oneDNN conv is wrong for some
    # channels_last shapes (e.g. input (2, 1, 3, 4), weight (1, 1, 2, 4), stride (1, 3)).
    return [None if a is None else a.double() for a in args]


def _same_nonfinite(fused: torch.Tensor, ref: torch.Tensor, injected: list[float]) -> None:
    """NaN, +Inf and -Inf outputs exactly where the reference has them.

    An Inf meets different products under a different association (the reference's
    ``(-inf) * a + inf * b`` is NaN, the same product with the factors folded first is
    ``(a + b) * inf``), so the kernels keep the reference's association whenever the
    input holds a non-finite value.
    """
    for mask in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(mask(fused), mask(ref)), (mask.__name__, injected)


@given(conv_calls(), st.data())
def test_conv2d_nan_and_inf_in_input_propagate_like_reference(call: Call, data) -> None:
    x = call.tensors[0].detach().clone()
    if x.numel() == 0:
        return
    values = data.draw(st.lists(st.sampled_from((float("nan"), float("inf"), float("-inf"))), min_size=1, max_size=3))
    for v in values:
        index = data.draw(st.integers(0, x.numel() - 1))
        position = torch.unravel_index(torch.tensor(index), x.shape)
        x[tuple(int(p) for p in position)] = v
    args = [x, *call.tensors[1:]]
    with torch.no_grad():
        fused = tucker_ops.tucker_conv2d(*args, *call.options, backend="fused")
        ref = reference.tucker_conv2d(*_float64(args), *call.options)
    _same_nonfinite(fused, ref, values)


@given(linear_calls(), st.data())
def test_linear_nan_and_inf_in_input_propagate_like_reference(call: Call, data) -> None:
    x = call.tensors[0].detach().clone()
    if x.numel() == 0:
        return
    values = data.draw(st.lists(st.sampled_from((float("nan"), float("inf"), float("-inf"))), min_size=1, max_size=3))
    for v in values:
        position = torch.unravel_index(torch.tensor(data.draw(st.integers(0, x.numel() - 1))), x.shape)
        x[tuple(int(p) for p in position)] = v
    args = [x, *call.tensors[1:]]
    with torch.no_grad():
        fused = tucker_ops.tucker_linear(*args, backend="fused")
        ref = reference.tucker_linear(*_float64(args))
    _same_nonfinite(fused, ref, values)


@given(conv_calls())
def test_conv2d_meta_shapes_match_cpu(call: Call) -> None:
    meta = [None if t is None else t.to("meta") for t in call.tensors]
    with torch.no_grad():
        want = tucker_ops.tucker_conv2d(*call.tensors, *call.options, backend="fused")
    got = torch.ops.tucker_ops.tucker_conv2d(*meta, *call.options)
    assert got.shape == want.shape and got.dtype == want.dtype
