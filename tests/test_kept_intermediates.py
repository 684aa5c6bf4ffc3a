"""Saved intermediates: the *_with_intermediates ops and the backward ops that read them.

csrc/ops.cpp ("Saved intermediates"): ``tucker_conv2d_with_intermediates`` /
``tucker_linear_with_intermediates`` return the forward output plus the
projection (input through first) and the core output (projection through core,
before last and bias); given to ``tucker_conv2d_backward`` /
``tucker_linear_backward`` they replace the backward's recomputation and must
not change a single gradient. The autograd kernels (csrc/autograd.cpp) choose
per call whether to keep them: ``TUCKER_OPS_KEEP_INTERMEDIATES=1`` always,
``=0`` never, unset by the rule in csrc/cpu/intermediates.h (conv: whenever
first or last exists; linear: from 16 rows on). The variable is read on every
call, so the tests switch it with ``monkeypatch``.

Covered here: the values, shapes and memory formats of the intermediates (and
that the meta kernels agree), every output_mask of the backward ops with both,
either or neither intermediate against the recomputing call and reference.py,
the validation of the intermediates (CPU and meta, in a child process like
test_op_validation.py), autograd under the three settings with the forward op
actually dispatched recorded (so no case passes vacuously), gradcheck /
gradgradcheck, opcheck, and the FLOP counts.

Random configurations come from fixed seeds (one per test id), so a failure
names a reproducible case.
"""

from __future__ import annotations

import itertools
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
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
from torch.library import opcheck
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from test_ops_fused_paths import conv_output_format

import tucker_ops
from tucker_ops import flops, reference

OPS = torch.ops.tucker_ops
F32, F64 = torch.float32, torch.float64
NAMES = ("input", "first", "core", "last", "bias")
ENV = "TUCKER_OPS_KEEP_INTERMEDIATES"
KEEP_SETTINGS = [pytest.param("1", id="keep=1"), pytest.param("0", id="keep=0"), pytest.param(None, id="keep=auto")]
ALL_MASKS = [list(m) for m in itertools.product((False, True), repeat=5)]
# Single entries and the combinations whose recomputation differs (last's gradient
# needs the core output; core's the projection; input/first neither).
NAMED_MASKS = {
    "none": (0, 0, 0, 0, 0),
    "input": (1, 0, 0, 0, 0),
    "first": (0, 1, 0, 0, 0),
    "core": (0, 0, 1, 0, 0),
    "last": (0, 0, 0, 1, 0),
    "bias": (0, 0, 0, 0, 1),
    "last+bias": (0, 0, 0, 1, 1),
    "core+last": (0, 0, 1, 1, 0),
    "input+first": (1, 1, 0, 0, 0),
    "weights": (0, 1, 1, 1, 1),
    "all": (1, 1, 1, 1, 1),
}
# Which intermediates a backward call is given: (projection, core_output).
GIVEN = [pytest.param((True, True), id="both"), pytest.param((True, False), id="projection_only"),
         pytest.param((False, True), id="core_output_only")]  # fmt: skip


def _tol(dtype: torch.dtype, want: torch.Tensor) -> dict:
    scale = float(want.detach().abs().max()) if want.numel() else 1.0
    if dtype == F64:
        return {"rtol": 1e-9, "atol": 1e-10 * (1.0 + scale)}
    return {"rtol": 1e-4, "atol": 1e-5 * (1.0 + scale)}


def _same_grads(got, want, dtype: torch.dtype, what: str) -> None:
    """Backward-op results: same shapes ((0,) for skipped entries), same values."""
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape, f"{what}: grad_{name} has shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        assert_close(a, b, **_tol(dtype, b), msg=lambda m, name=name: f"{what}: grad_{name}: {m}")


class _OpLog(TorchDispatchMode):
    """Records every tucker_ops op that reaches the backends (below autograd), but the
    keep/recompute setting's utility ops (``_``-prefixed)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "tucker_ops" and not func._opname.startswith("_"):
            self.calls.append((func._opname, args, kwargs))
        return func(*args, **kwargs)

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]

    def backward_intermediates(self, op: str) -> list[tuple[bool, bool]]:
        """(projection given, core_output given) of each call to the backward op ``op``."""
        index = {"tucker_conv2d_backward": 9, "tucker_linear_backward": 6}[op]
        result = []
        for name, args, kwargs in self.calls:
            if name != op:
                continue
            values = [args[i] if len(args) > i else kwargs.get(key) for i, key in
                      ((index, "projection"), (index + 1, "core_output"))]  # fmt: skip
            result.append(tuple(v is not None for v in values))
        return result


# -- configurations --------------------------------------------------------------------


@dataclass
class ConvCase:
    tensors: tuple  # input, first, core, last, bias (first/last/bias may be None)
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    dtype: torch.dtype

    @property
    def opts(self) -> tuple:
        return self.stride, self.padding, self.dilation

    def __repr__(self) -> str:
        shapes = [tuple(t.shape) if t is not None else None for t in self.tensors]
        x = self.tensors[0]
        layout = "channels_last" if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last) else (
            "contiguous" if x.is_contiguous() else "strided")
        return f"ConvCase({shapes}, {layout}, {self.opts}, {self.dtype})"


def _randn(gen: torch.Generator, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=gen).to(dtype)


def _conv_input(gen, dtype, n, c, h, w, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return _randn(gen, dtype, n, c, h, w).contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        return _randn(gen, dtype, n, 2 * c, h, w + 1)[:, ::2, :, 1:]
    return _randn(gen, dtype, n, c, h, w)


def _conv_case(seed: int, dtype: torch.dtype | None = None) -> ConvCase:
    rng = random.Random(seed)
    while True:
        h, w = rng.randint(1, 12), rng.randint(1, 12)
        k = (rng.choice((1, 3, 5)), rng.choice((1, 3, 5)))
        stride = [rng.randint(1, 3), rng.randint(1, 3)]
        dilation = [rng.randint(1, 2), rng.randint(1, 2)]
        # The ops reject padding beyond the dilated kernel extent (checks.cpp, check_padding_extent).
        padding = [rng.randint(0, min(2, d * (kk - 1) + 1)) for d, kk in zip(dilation, k)]
        if all(s + 2 * p - d * (kk - 1) - 1 >= 0 for s, p, d, kk in zip((h, w), padding, dilation, k)):
            break
    side = rng.choice(("tucker2", "tucker2", "tucker2", "no_first", "no_last", "neither"))
    has_first, has_last = side in ("tucker2", "no_last"), side in ("tucker2", "no_first")
    if dtype is None:
        dtype = F32 if rng.random() < 0.2 else F64
    n, c_in = rng.choice((0, 1, 2, 3, 4)), rng.randint(1, 6)
    r_in, r_out, c_out = rng.randint(1, 5), rng.randint(1, 5), rng.randint(1, 6)
    layout = rng.choice(("contiguous", "channels_last", "channels_last", "sliced"))
    has_bias = rng.random() < 0.5
    gen = torch.Generator().manual_seed(seed)
    tensors = (
        _conv_input(gen, dtype, n, c_in, h, w, layout),
        _randn(gen, dtype, r_in, c_in) if has_first else None,
        _randn(gen, dtype, r_out, r_in if has_first else c_in, *k),
        _randn(gen, dtype, c_out, r_out) if has_last else None,
        _randn(gen, dtype, c_out if has_last else r_out) if has_bias else None,
    )
    return ConvCase(tensors, stride, padding, dilation, dtype)


def _fixed_conv(n, c_in, hw, r_in, r_out, c_out, k, stride, padding, dilation=(1, 1), *, channels_last=False,
                bias=True, seed=0) -> ConvCase:  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    x = _conv_input(gen, F64, n, c_in, *hw, "channels_last" if channels_last else "contiguous")
    tensors = (
        x,
        _randn(gen, F64, r_in, c_in) if r_in else None,
        _randn(gen, F64, r_out, r_in or c_in, *k),
        _randn(gen, F64, c_out, r_out) if c_out else None,
        _randn(gen, F64, c_out or r_out) if bias else None,
    )
    return ConvCase(tensors, list(stride), list(padding), list(dilation), F64)


# Larger convs that reach the kernels' other paths: several tiles per image (hand
# kernels, implicit im2col), BLAS-sized ranks on a channels_last input, the pointwise
# core that reads the projection in place, and a stride that skips input rows.
BIG_CONVS = {
    "tiles": lambda: _fixed_conv(3, 8, (33, 31), 12, 16, 10, (3, 3), (1, 1), (1, 1)),
    "blas_channels_last": lambda: _fixed_conv(2, 16, (20, 18), 48, 64, 24, (3, 3), (2, 1), (1, 1), channels_last=True),
    "pointwise": lambda: _fixed_conv(2, 6, (15, 14), 5, 7, 4, (1, 1), (1, 1), (0, 0)),
    "stride_gaps": lambda: _fixed_conv(3, 5, (29, 23), 4, 6, 7, (1, 2), (4, 3), (0, 1), channels_last=True),
    "dilated_no_last": lambda: _fixed_conv(2, 6, (21, 19), 5, 8, None, (3, 3), (1, 2), (2, 1), (2, 2)),
    "no_first": lambda: _fixed_conv(2, 6, (17, 16), None, 8, 9, (5, 3), (2, 1), (2, 1)),
}


@dataclass
class LinearCase:
    tensors: tuple
    dtype: torch.dtype

    @property
    def rows(self) -> int:
        x = self.tensors[0]
        return x.numel() // x.shape[-1]

    def __repr__(self) -> str:
        return f"LinearCase({[tuple(t.shape) if t is not None else None for t in self.tensors]}, {self.dtype})"


def _linear_case(seed: int, dtype: torch.dtype | None = None) -> LinearCase:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    if dtype is None:
        dtype = F32 if rng.random() < 0.2 else F64
    features = rng.randint(1, 12)
    side = rng.choice(("tucker2", "tucker2", "tucker2", "no_first", "no_last", "neither"))
    has_first, has_last = side in ("tucker2", "no_last"), side in ("tucker2", "no_first")
    r_in, r_out, out = rng.randint(1, 6), rng.randint(1, 6), rng.randint(1, 8)
    kind = rng.choice(("1d", "2d", "2d_16", "3d_16", "empty", "transposed", "rows"))
    if kind == "1d":
        x = _randn(gen, dtype, features)
    elif kind == "2d":
        x = _randn(gen, dtype, rng.randint(1, 20), features)
    elif kind == "2d_16":
        x = _randn(gen, dtype, 16, features)
    elif kind == "3d_16":
        x = _randn(gen, dtype, 2, 8, features)
    elif kind == "empty":
        x = _randn(gen, dtype, 2, 0, features)
    elif kind == "transposed":
        x = _randn(gen, dtype, features, rng.randint(1, 20)).t()
    else:
        x = _randn(gen, dtype, 300, features)
    tensors = (
        x,
        _randn(gen, dtype, r_in, features) if has_first else None,
        _randn(gen, dtype, r_out, r_in if has_first else features),
        _randn(gen, dtype, out, r_out) if has_last else None,
        _randn(gen, dtype, out if has_last else r_out) if rng.random() < 0.5 else None,
    )
    return LinearCase(tensors, dtype)


def _fixed_linear(shape, features, r_in, r_out, out, seed=0) -> LinearCase:
    gen = torch.Generator().manual_seed(seed)
    return LinearCase(
        (
            _randn(gen, F64, *shape, features),
            _randn(gen, F64, r_in, features) if r_in else None,
            _randn(gen, F64, r_out, r_in or features),
            _randn(gen, F64, out, r_out) if out else None,
            _randn(gen, F64, out or r_out),
        ),
        F64,
    )


BIG_LINEARS = {
    # 600 rows on 2 threads: several chunks of row blocks.
    "row_chunks": lambda: _fixed_linear((600,), 12, 5, 7, 9),
    # Weights of over 2^18 elements and few rows: the whole-batch BLAS path.
    "whole_batch": lambda: _fixed_linear((2, 8), 512, 512, 8, 16),
    "no_first": lambda: _fixed_linear((4, 50), 10, None, 6, 11),
    "no_last": lambda: _fixed_linear((70,), 9, 4, 6, None),
    # Whole-batch GEMMs large enough to split over the threads (rows or columns).
    "whole_batch_split": lambda: _fixed_linear((32,), 1201, 170, 70, 1003),
    "whole_batch_core_only": lambda: _fixed_linear((32,), 500, None, 600, None),
    # A chunk per thread, at most one row block each: the two-phase backward.
    "two_phase": lambda: _fixed_linear((32,), 800, 40, 200, 120),
    "two_phase_no_first": lambda: _fixed_linear((3, 20), 300, None, 200, 301),
    "two_phase_core_only": lambda: _fixed_linear((100,), 400, None, 300, None),
}


# -- reference values -----------------------------------------------------------------


def _reference_conv_grads(case: ConvCase, grad_output: torch.Tensor) -> list[torch.Tensor | None]:
    """Every gradient the backward op returns, through reference.py in float64 (bias: a zero leaf)."""
    x, first, core, last, _ = case.tensors
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, first, core, last)]
    bias = torch.zeros(grad_output.shape[1], dtype=F64, requires_grad=True)
    y = reference.tucker_conv2d(*leaves, bias, *case.opts)
    wrt = [t for t in (*leaves, bias) if t is not None]
    grads = iter(torch.autograd.grad(y, wrt, grad_output.double()))
    return [next(grads) if t is not None else None for t in (*leaves, bias)]


def _reference_linear_grads(case: LinearCase, grad_output: torch.Tensor) -> list[torch.Tensor | None]:
    x, first, core, last, _ = case.tensors
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, first, core, last)]
    bias = torch.zeros(grad_output.shape[-1], dtype=F64, requires_grad=True)
    y = reference.tucker_linear(*leaves, bias)
    wrt = [t for t in (*leaves, bias) if t is not None]
    grads = iter(torch.autograd.grad(y, wrt, grad_output.double()))
    return [next(grads) if t is not None else None for t in (*leaves, bias)]


def _expected_backward(reference_grads, mask, dtype: torch.dtype) -> list[torch.Tensor]:
    """What a backward op returns: the requested gradients of present arguments, else (0,)."""
    empty = torch.empty(0, dtype=dtype)
    return [g.to(dtype) if wanted and g is not None else empty for wanted, g in zip(mask, reference_grads)]


def _rows_read(case: ConvCase) -> torch.Tensor:
    """Input rows (H) some output row reads: oh * stride - pad + i * dilation for a kernel tap i."""
    x, _, core, _, _ = case.tensors
    h, kh = x.shape[2], core.shape[2]
    (s, _), (p, _), (d, _) = case.opts
    h_out = (h + 2 * p - d * (kh - 1) - 1) // s + 1
    read = torch.zeros(h, dtype=torch.bool)
    for oh in range(h_out):
        for i in range(kh):
            ih = oh * s - p + i * d
            if 0 <= ih < h:
                read[ih] = True
    return read


def _to_meta(args):
    return [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]


# -- the with_intermediates ops --------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_conv2d_with_intermediates_returns_the_chain(seed: int) -> None:
    case = _conv_case(seed)
    x, first, core, last, bias = case.tensors
    output, projection, core_output = OPS.tucker_conv2d_with_intermediates(*case.tensors, *case.opts)
    # The same kernel as tucker_conv2d: bitwise the same output.
    plain = OPS.tucker_conv2d(*case.tensors, *case.opts)
    assert output.shape == plain.shape and output.is_contiguous(memory_format=conv_output_format(x))
    assert torch.equal(output, plain), f"{case!r}: output differs from tucker_conv2d"
    want = reference.tucker_conv2d(*[t.double() if t is not None else None for t in case.tensors], *case.opts)
    assert_close(output.double(), want, **_tol(case.dtype, want))

    x64 = x.double()
    projection_ref = F.conv2d(x64, first.double()[:, :, None, None]) if first is not None else x64
    core_output_ref = F.conv2d(projection_ref, core.double(), None, *case.opts)
    if first is None:
        assert projection.shape == (0,) and projection.dtype == case.dtype
    else:
        assert projection.shape == (x.shape[0], first.shape[0], *x.shape[2:]) and projection.dtype == case.dtype
        assert projection.is_contiguous(memory_format=conv_output_format(x)), (case, projection.stride())
        read = _rows_read(case)
        got, expected = projection[:, :, read].double(), projection_ref[:, :, read]
        assert_close(got, expected, **_tol(case.dtype, expected), msg=lambda m: f"{case!r}: projection: {m}")
    if last is None:
        assert core_output.shape == (0,) and core_output.dtype == case.dtype
    else:
        assert core_output.shape == (x.shape[0], core.shape[0], *output.shape[2:]) and core_output.is_contiguous()
        assert_close(core_output.double(), core_output_ref, **_tol(case.dtype, core_output_ref),
                     msg=lambda m: f"{case!r}: core_output: {m}")  # fmt: skip


# Input rows that no output reads: stride beyond the (dilated) kernel's reach, or
# rows below the last output's window.
UNREAD_ROWS = {
    "k1_stride3": lambda: _fixed_conv(2, 3, (13, 5), 2, 4, 5, (1, 1), (3, 1), (0, 0), bias=False),
    "k1_stride4_pad1": lambda: _fixed_conv(4, 3, (30, 6), 2, 4, 5, (1, 1), (4, 1), (1, 0), bias=False),
    "k2_stride5_channels_last": lambda: _fixed_conv(3, 3, (17, 4), 2, 4, 5, (2, 1), (5, 1), (0, 0),
                                                    channels_last=True, bias=False),  # fmt: skip
}


@pytest.mark.parametrize("name", sorted(UNREAD_ROWS))
def test_conv2d_projection_rows_no_output_reads_are_zeros(name: str) -> None:
    # ops.cpp: "Input rows no output reads (a stride beyond the kernel's reach) are
    # zeros in the conv's projection"; every other row is conv2d(input, first).
    case = UNREAD_ROWS[name]()
    x, first = case.tensors[:2]
    _, projection, _ = OPS.tucker_conv2d_with_intermediates(*case.tensors, *case.opts)
    read = _rows_read(case)
    assert not read.all(), "the case must have unread rows"
    expected = F.conv2d(x, first[:, :, None, None])
    expected[:, :, ~read] = 0
    nonzero_unread = [i for i in range(x.shape[2]) if not read[i] and projection[:, :, i].abs().max() > 0]
    assert nonzero_unread == [], (
        f"projection rows {nonzero_unread} are read by no output but are not zero "
        f"(unread rows: {torch.nonzero(~read).flatten().tolist()})"
    )
    assert_close(projection, expected, rtol=1e-10, atol=1e-10)


CONV_LAYOUTS = {
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "sliced": lambda t: torch.cat([t, t], 1)[:, ::2],
    "permuted": lambda t: t.permute(3, 1, 2, 0).contiguous().permute(3, 1, 2, 0),
    # C = 1: contiguous and channels_last at once, so NCHW.
    "one_channel_channels_last": lambda t: t[:, :1].contiguous(memory_format=torch.channels_last),
    "empty_batch_channels_last": lambda t: t[:0].contiguous(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("layout", sorted(CONV_LAYOUTS))
def test_conv2d_intermediates_layout_and_meta_kernel_agree(layout: str) -> None:
    gen = torch.Generator().manual_seed(1)
    x = CONV_LAYOUTS[layout](_randn(gen, F64, 3, 4, 9, 7))
    args = (x, _randn(gen, F64, 3, x.shape[1]), _randn(gen, F64, 5, 3, 3, 2), _randn(gen, F64, 6, 5), None,
            [2, 1], [1, 0], [1, 2])  # fmt: skip
    real = OPS.tucker_conv2d_with_intermediates(*args)
    meta = OPS.tucker_conv2d_with_intermediates(*_to_meta(args))
    assert real[1].is_contiguous(memory_format=conv_output_format(x)), real[1].stride()
    for name, r, m in zip(("output", "projection", "core_output"), real, meta):
        assert m.device.type == "meta" and m.dtype == r.dtype
        assert m.shape == r.shape, f"{name}: meta shape {tuple(m.shape)} != {tuple(r.shape)}"
        assert m.stride() == r.stride(), f"{name}: meta strides {m.stride()} != {r.stride()}"


@pytest.mark.parametrize("seed", range(30))
def test_linear_with_intermediates_returns_the_chain(seed: int) -> None:
    case = _linear_case(seed)
    x, first, core, last, bias = case.tensors
    output, projection, core_output = OPS.tucker_linear_with_intermediates(*case.tensors)
    plain = OPS.tucker_linear(*case.tensors)
    assert output.shape == plain.shape and output.dtype == case.dtype and output.is_contiguous()
    assert_close(output, plain, **_tol(case.dtype, plain))  # another association: not bitwise
    want = reference.tucker_linear(*[t.double() if t is not None else None for t in case.tensors])
    assert_close(output.double(), want, **_tol(case.dtype, want))
    x64 = x.double()
    projection_ref = x64 @ first.double().T if first is not None else x64
    if first is None:
        assert projection.shape == (0,) and projection.dtype == case.dtype
    else:
        assert projection.shape == (*x.shape[:-1], first.shape[0]) and projection.dtype == case.dtype
        assert_close(projection.double(), projection_ref, **_tol(case.dtype, projection_ref))
    if last is None:
        assert core_output.shape == (0,) and core_output.dtype == case.dtype
    else:
        want_q = projection_ref @ core.double().T
        assert core_output.shape == (*x.shape[:-1], core.shape[0])
        assert_close(core_output.double(), want_q, **_tol(case.dtype, want_q))
    meta = OPS.tucker_linear_with_intermediates(*_to_meta(case.tensors))
    for r, m in zip((output, projection, core_output), meta):
        assert m.shape == r.shape and m.dtype == r.dtype


# -- the backward ops given the intermediates -------------------------------------------


def _check_backward_masks(kind: str, case, masks, given_options, seed: int) -> None:
    """Every mask: the backward op without intermediates against the reference, and with
    each combination of them against both."""
    x, first, core, last, _ = case.tensors
    if kind == "conv":
        with_op, backward_op, extra = OPS.tucker_conv2d_with_intermediates, OPS.tucker_conv2d_backward, case.opts
        reference_grads_of = _reference_conv_grads
    else:
        with_op, backward_op, extra = OPS.tucker_linear_with_intermediates, OPS.tucker_linear_backward, ()
        reference_grads_of = _reference_linear_grads
    output, projection, core_output = with_op(*case.tensors, *extra)
    grad_output = torch.randn(output.shape, dtype=F64, generator=torch.Generator().manual_seed(seed)).to(case.dtype)
    reference_grads = reference_grads_of(case, grad_output)
    args = (grad_output, x, first, core, last, *extra)
    for mask in masks:
        mask = [bool(m) for m in mask]
        recomputed = backward_op(*args, mask)
        _same_grads(recomputed, _expected_backward(reference_grads, mask, case.dtype), case.dtype,
                    f"{case!r} mask {mask} without intermediates")  # fmt: skip
        for give_p, give_q in given_options:
            p = projection if give_p and first is not None else None
            q = core_output if give_q and last is not None else None
            kept = backward_op(*args, mask, p, q)
            what = f"{case!r} mask {mask} projection={p is not None} core_output={q is not None}"
            _same_grads(kept, recomputed, case.dtype, what + " vs without")
            _same_grads(kept, _expected_backward(reference_grads, mask, case.dtype), case.dtype, what + " vs reference")


def _check_conv_backward_masks(case: ConvCase, masks, given_options, seed: int) -> None:
    _check_backward_masks("conv", case, masks, given_options, seed)


def _check_linear_backward_masks(case: LinearCase, masks, given_options, seed: int) -> None:
    _check_backward_masks("linear", case, masks, given_options, seed)


ALL_GIVEN = [(True, True), (True, False), (False, True)]


@pytest.mark.parametrize("seed", range(14))
def test_conv2d_backward_every_mask_with_intermediates(seed: int) -> None:
    _check_conv_backward_masks(_conv_case(100 + seed), ALL_MASKS, ALL_GIVEN, seed)


@pytest.mark.parametrize("given", GIVEN)
@pytest.mark.parametrize("mask", list(NAMED_MASKS.values()), ids=list(NAMED_MASKS))
@pytest.mark.parametrize("name", list(BIG_CONVS))
def test_conv2d_backward_mask_on_larger_convs(name: str, mask, given) -> None:
    _check_conv_backward_masks(BIG_CONVS[name](), [mask], [given], 3)


@pytest.mark.parametrize("seed", range(14))
def test_linear_backward_every_mask_with_intermediates(seed: int) -> None:
    _check_linear_backward_masks(_linear_case(200 + seed), ALL_MASKS, ALL_GIVEN, seed)


@pytest.mark.parametrize("given", GIVEN)
@pytest.mark.parametrize("mask", list(NAMED_MASKS.values()), ids=list(NAMED_MASKS))
@pytest.mark.parametrize("name", list(BIG_LINEARS))
def test_linear_backward_mask_on_larger_linears(name: str, mask, given) -> None:
    _check_linear_backward_masks(BIG_LINEARS[name](), [mask], [given], 4)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_only_grad_last_from_the_core_output_is_not_zero(kind: str) -> None:
    # The regression named in the brief: only last's gradient asked for, core_output
    # given (nothing else needs the projection), returned zeros.
    mask = [False, False, False, True, False]
    if kind == "conv":
        case = BIG_CONVS["tiles"]()
        y, _, q = OPS.tucker_conv2d_with_intermediates(*case.tensors, *case.opts)
        g = torch.randn_like(y)
        got = OPS.tucker_conv2d_backward(g, *case.tensors[:4], *case.opts, mask, None, q)[3]
        want = _reference_conv_grads(case, g)[3]
    else:
        case = BIG_LINEARS["row_chunks"]()
        y, _, q = OPS.tucker_linear_with_intermediates(*case.tensors)
        g = torch.randn_like(y)
        got = OPS.tucker_linear_backward(g, *case.tensors[:4], mask, None, q)[3]
        want = _reference_linear_grads(case, g)[3]
    assert got.abs().max() > 0, "grad_last is all zeros"
    assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_projection_in_another_layout_is_read_by_its_strides() -> None:
    # A channels_last input's projection is channels_last; an NCHW copy of it (or a
    # channels_last copy of the NCHW core output) holds the same values.
    case = BIG_CONVS["blas_channels_last"]()
    x, first, core, last, _ = case.tensors
    y, p, q = OPS.tucker_conv2d_with_intermediates(*case.tensors, *case.opts)
    assert p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    g = torch.randn_like(y)
    want = OPS.tucker_conv2d_backward(g, x, first, core, last, *case.opts, [True] * 5)
    for p_alt, q_alt in ((p.contiguous(), q), (p, q.contiguous(memory_format=torch.channels_last))):
        got = OPS.tucker_conv2d_backward(g, x, first, core, last, *case.opts, [True] * 5, p_alt, q_alt)
        _same_grads(got, want, F64, "relaid-out intermediates")


# -- validation of the intermediates (CPU checks.cpp and the meta kernels) ------------


DEVICES = ("cpu", "meta")


_conv_backward = conv_backward_call


def _linear_backward(device: str, **overrides):
    args = {
        "grad_output": T(device, 3, 2, 6),
        "input": T(device, 3, 2, 10),
        "first": T(device, 4, 10),
        "core": T(device, 5, 4),
        "last": T(device, 6, 5),
        "output_mask": [True] * 5,
    }
    args.update(overrides)
    return OPS.tucker_linear_backward(**args)


def _conv_kept(device: str, **overrides):
    args = {"input": T(device, 2, 5, 9, 8), "first": T(device, 4, 5), "core": T(device, 6, 4, 3, 3),
            "last": T(device, 7, 6), "bias": T(device, 7), "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1]}  # fmt: skip
    args.update(overrides)
    return OPS.tucker_conv2d_with_intermediates(**args)


def _linear_kept(device: str, **overrides):
    args = {"input": T(device, 3, 10), "first": T(device, 4, 10), "core": T(device, 5, 4), "last": T(device, 6, 5),
            "bias": T(device, 6)}  # fmt: skip
    args.update(overrides)
    return OPS.tucker_linear_with_intermediates(**args)


def _other(device: str) -> str:
    return "meta" if device == "cpu" else "cpu"


CB, LB = "tucker_conv2d_backward", "tucker_linear_backward"
CASES: dict = {
    # -- conv backward
    "conv_projection_without_first": (
        lambda d: _conv_backward(d, first=None, core=T(d, 6, 5, 3, 3), projection=T(d, 2, 5, 9, 8)),
        ValueError, (CB, "expected projection to be None when first is None", "[2, 5, 9, 8]"), DEVICES),
    "conv_core_output_without_last": (
        lambda d: _conv_backward(d, last=None, grad_output=T(d, 2, 6, 7, 6), core_output=T(d, 2, 6, 7, 6)),
        ValueError, (CB, "expected core_output to be None when last is None", "[2, 6, 7, 6]"), DEVICES),
    "conv_projection_spatial_shape": (
        lambda d: _conv_backward(d, projection=T(d, 2, 4, 9, 7)), ValueError,
        (CB, "expected projection to have the shape", "[2, 4, 9, 8]", "[2, 4, 9, 7]"), DEVICES),
    "conv_projection_rank": (
        lambda d: _conv_backward(d, projection=T(d, 2, 5, 9, 8)), ValueError,
        (CB, "expected projection to have the shape", "[2, 4, 9, 8]", "[2, 5, 9, 8]"), DEVICES),
    "conv_projection_output_sized": (  # the core output's size is not the projection's
        lambda d: _conv_backward(d, projection=T(d, 2, 4, 7, 6)), ValueError,
        (CB, "expected projection to have the shape", "[2, 4, 9, 8]", "[2, 4, 7, 6]"), DEVICES),
    "conv_projection_3d": (
        lambda d: _conv_backward(d, projection=T(d, 2, 4, 72)), ValueError,
        (CB, "expected projection to have the shape", "[2, 4, 9, 8]", "[2, 4, 72]"), DEVICES),
    "conv_projection_flat": (
        lambda d: _conv_backward(d, projection=T(d, 576)), ValueError,
        (CB, "expected projection to have the shape", "[576]"), DEVICES),
    "conv_projection_empty": (  # what with_intermediates returns without first, passed with first
        lambda d: _conv_backward(d, projection=T(d, 0)), ValueError,
        (CB, "expected projection to have the shape", "[2, 4, 9, 8]", "[0]"), DEVICES),
    "conv_core_output_shape": (
        lambda d: _conv_backward(d, core_output=T(d, 2, 6, 7, 5)), ValueError,
        (CB, "expected core_output to have the shape", "[2, 6, 7, 6]", "[2, 6, 7, 5]"), DEVICES),
    "conv_core_output_channels": (  # C_out instead of R_out channels
        lambda d: _conv_backward(d, core_output=T(d, 2, 7, 7, 6)), ValueError,
        (CB, "expected core_output to have the shape", "[2, 6, 7, 6]", "[2, 7, 7, 6]"), DEVICES),
    "conv_core_output_batch": (
        lambda d: _conv_backward(d, core_output=T(d, 1, 6, 7, 6)), ValueError,
        (CB, "expected core_output to have the shape", "[1, 6, 7, 6]"), DEVICES),
    "conv_projection_dtype": (
        lambda d: _conv_backward(d, projection=T(d, 2, 4, 9, 8, dtype=F64)), TypeError,
        (CB, "expected projection to have the same dtype as input", "torch.float32", "torch.float64"), DEVICES),
    "conv_core_output_dtype": (
        lambda d: _conv_backward(d, core_output=T(d, 2, 6, 7, 6, dtype=F64)), TypeError,
        (CB, "expected core_output to have the same dtype as input", "torch.float64"), DEVICES),
    "conv_projection_int": (
        lambda d: _conv_backward(d, projection=T(d, 2, 4, 9, 8, dtype=torch.int64)), TypeError,
        (CB, "expected projection to have the same dtype as input", "torch.int64"), DEVICES),
    "conv_projection_device": (
        lambda d: _conv_backward(d, projection=T(_other(d), 2, 4, 9, 8)), RuntimeError,
        (CB, "expected projection to be on the same device as input"), DEVICES),
    "conv_core_output_device": (
        lambda d: _conv_backward(d, core_output=T(_other(d), 2, 6, 7, 6)), RuntimeError,
        (CB, "expected core_output to be on the same device as input"), DEVICES),
    # -- linear backward
    "linear_projection_without_first": (
        lambda d: _linear_backward(d, first=None, core=T(d, 5, 10), projection=T(d, 3, 2, 10)),
        ValueError, (LB, "expected projection to be None when first is None", "[3, 2, 10]"), DEVICES),
    "linear_core_output_without_last": (
        lambda d: _linear_backward(d, last=None, grad_output=T(d, 3, 2, 5), core_output=T(d, 3, 2, 5)),
        ValueError, (LB, "expected core_output to be None when last is None", "[3, 2, 5]"), DEVICES),
    "linear_projection_shape": (
        lambda d: _linear_backward(d, projection=T(d, 3, 2, 5)), ValueError,
        (LB, "expected projection to have the shape", "[3, 2, 4]", "[3, 2, 5]"), DEVICES),
    "linear_projection_rows_flattened": (  # (rows, R_in) for a 3-D input: the leading dims must match
        lambda d: _linear_backward(d, projection=T(d, 6, 4)), ValueError,
        (LB, "expected projection to have the shape", "[3, 2, 4]", "[6, 4]"), DEVICES),
    "linear_projection_empty": (
        lambda d: _linear_backward(d, projection=T(d, 0)), ValueError,
        (LB, "expected projection to have the shape", "[3, 2, 4]", "[0]"), DEVICES),
    "linear_core_output_shape": (
        lambda d: _linear_backward(d, core_output=T(d, 3, 2, 6)), ValueError,
        (LB, "expected core_output to have the shape", "[3, 2, 5]", "[3, 2, 6]"), DEVICES),
    "linear_core_output_rows": (
        lambda d: _linear_backward(d, core_output=T(d, 2, 3, 5)), ValueError,
        (LB, "expected core_output to have the shape", "[3, 2, 5]", "[2, 3, 5]"), DEVICES),
    "linear_projection_dtype": (
        lambda d: _linear_backward(d, projection=T(d, 3, 2, 4, dtype=F64)), TypeError,
        (LB, "expected projection to have the same dtype as input", "torch.float32", "torch.float64"), DEVICES),
    "linear_core_output_dtype": (
        lambda d: _linear_backward(d, core_output=T(d, 3, 2, 5, dtype=F64)), TypeError,
        (LB, "expected core_output to have the same dtype as input", "torch.float64"), DEVICES),
    "linear_projection_device": (
        lambda d: _linear_backward(d, projection=T(_other(d), 3, 2, 4)), RuntimeError,
        (LB, "expected projection to be on the same device as input"), DEVICES),
    # -- the with_intermediates ops check, and name themselves in errors, as the plain ops
    "conv_kept_first_channels": (
        lambda d: _conv_kept(d, first=T(d, 4, 6)), ValueError,
        ("tucker_conv2d: expected first to have shape (R_in, C_in)", "[4, 6]"), DEVICES),
    "conv_kept_bias": (
        lambda d: _conv_kept(d, bias=T(d, 8)), ValueError, ("tucker_conv2d: expected bias", "[8]"), DEVICES),
    "conv_kept_dtype": (
        lambda d: _conv_kept(d, core=T(d, 6, 4, 3, 3, dtype=F64)), TypeError,
        ("tucker_conv2d: expected core to have the same dtype as input", "torch.float64"), DEVICES),
    "conv_kept_kernel_too_large": (
        lambda d: _conv_kept(d, input=T(d, 2, 5, 2, 8)), ValueError,
        ("tucker_conv2d: kernel (kh, kw) = (3, 3)", "(2, 8)"), DEVICES),
    "conv_kept_stride_zero": (
        lambda d: _conv_kept(d, stride=[0, 1]), ValueError, ("tucker_conv2d: expected every element of stride",),
        DEVICES),
    "linear_kept_core": (
        lambda d: _linear_kept(d, core=T(d, 5, 3)), ValueError,
        ("tucker_linear: expected core.size(1) to equal R_in = 4", "[5, 3]"), DEVICES),
    "linear_kept_no_first": (
        lambda d: _linear_kept(d, first=None), ValueError,
        ("tucker_linear: expected core.size(1) to equal in = 10", "first is None"), DEVICES),
    "linear_kept_dtype": (
        lambda d: _linear_kept(d, input=T(d, 3, 10, dtype=torch.int32)), TypeError,
        ("tucker_linear: expected input", "torch.int32"), DEVICES),
}  # fmt: skip

# The plain op's call for each with_intermediates case: the errors must be the same.
PLAIN_TWINS = {
    "conv_kept_first_channels": lambda d: OPS.tucker_conv2d(T(d, 2, 5, 9, 8), T(d, 4, 6), T(d, 6, 4, 3, 3),
                                                            T(d, 7, 6), T(d, 7), [1, 1], [0, 0], [1, 1]),
    "linear_kept_core": lambda d: OPS.tucker_linear(T(d, 3, 10), T(d, 4, 10), T(d, 5, 3), T(d, 6, 5), T(d, 6)),
}  # fmt: skip
for _name, _call in PLAIN_TWINS.items():
    CASES[f"{_name}__plain"] = (_call, CASES[_name][1], CASES[_name][2], DEVICES)


@pytest.fixture(scope="module")
def outcomes() -> Outcomes:
    return collect_outcomes(__file__)


@pytest.mark.parametrize("name,device", case_ids(CASES))
def test_bad_intermediate_raises_clear_error(outcomes: Outcomes, name: str, device: str) -> None:
    assert_clear_error(CASES, outcomes, name, device)


# Messages that name the device or its supported dtypes differ between CPU and meta by design.
PER_DEVICE_MESSAGES = {n for n in CASES if "device" in n} | {"linear_kept_dtype"}


@pytest.mark.parametrize("name", sorted(set(CASES) - PER_DEVICE_MESSAGES))
def test_meta_kernel_raises_what_the_cpu_kernel_raises(outcomes: Outcomes, name: str) -> None:
    results = outcomes[0]
    cpu, meta = results.get((name, "cpu")), results.get((name, "meta"))
    assert cpu is not None and meta is not None, outcomes[2]
    assert (cpu["type"], cpu["message"].split("\n")[0]) == (meta["type"], meta["message"].split("\n")[0])


@pytest.mark.parametrize("name", sorted(PLAIN_TWINS))
def test_with_intermediates_errors_equal_the_plain_ops(outcomes: Outcomes, name: str) -> None:
    results = outcomes[0]
    for device in DEVICES:
        kept, plain = results[(name, device)], results[(f"{name}__plain", device)]
        assert (kept["type"], kept["message"]) == (plain["type"], plain["message"])


def test_validation_child_exited_cleanly(outcomes: Outcomes) -> None:
    assert_child_exited_cleanly(outcomes)


# -- autograd: the C++ kernels' choice and their gradients ------------------------------


def _set_keep(monkeypatch: pytest.MonkeyPatch, setting: str | None) -> None:
    if setting is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, setting)


def _expect_kept(kind: str, setting: str | None, has_first: bool, has_last: bool, rows: int = 0) -> bool:
    # Without first and last there is nothing to keep: the plain op, whatever the setting.
    if setting == "0" or not (has_first or has_last):
        return False
    return setting == "1" or kind == "conv" or rows >= 16


def _requires(rng: random.Random, tensors) -> list[bool]:
    present = [i for i, t in enumerate(tensors) if t is not None]
    wanted = set(rng.sample(present, rng.randint(1, len(present))))
    return [i in wanted for i in range(5)]


def _autograd_case(kind: str, setting: str | None, case, requires: list[bool], seed: int) -> None:
    tensors = case.tensors
    fused_fn = (lambda *t: OPS.tucker_conv2d(*t, *case.opts)) if kind == "conv" else OPS.tucker_linear
    ref_fn = (lambda *t: reference.tucker_conv2d(*t, *case.opts)) if kind == "conv" else reference.tucker_linear
    leaves = [t.detach().requires_grad_(r) if t is not None else None for t, r in zip(tensors, requires)]
    ref_leaves = [t.detach().double().requires_grad_(r) if t is not None else None for t, r in zip(tensors, requires)]
    with _OpLog() as log:
        y = fused_fn(*leaves)
        g = torch.randn(y.shape, dtype=F64, generator=torch.Generator().manual_seed(seed)).to(case.dtype)
        wrt = [t for t, r in zip(leaves, requires) if r]
        grads = torch.autograd.grad(y, wrt, g)
    y_ref = ref_fn(*ref_leaves)
    ref_grads = torch.autograd.grad(y_ref, [t for t, r in zip(ref_leaves, requires) if r], g.double())
    assert_close(y.double(), y_ref.detach(), **_tol(case.dtype, y_ref))
    names = [n for n, r in zip(NAMES, requires) if r]
    for name, a, b in zip(names, grads, ref_grads):
        assert_close(a.double(), b, **_tol(case.dtype, b), msg=lambda m, name=name: f"{case!r}: grad of {name}: {m}")

    has_first, has_last = tensors[1] is not None, tensors[3] is not None
    rows = case.rows if kind == "linear" else 0
    kept = _expect_kept(kind, setting, has_first, has_last, rows)
    op = "tucker_conv2d" if kind == "conv" else "tucker_linear"
    forward_calls = [n for n in log.names() if not n.endswith("_backward")]
    assert forward_calls == [f"{op}_with_intermediates" if kept else op], (case, setting, log.names())
    assert log.backward_intermediates(f"{op}_backward") == [(kept and has_first, kept and has_last)], log.names()


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("setting", KEEP_SETTINGS)
def test_conv2d_autograd_matches_reference(monkeypatch: pytest.MonkeyPatch, setting: str | None, seed: int) -> None:
    _set_keep(monkeypatch, setting)
    case = _conv_case(300 + seed, dtype=F64)
    _autograd_case("conv", setting, case, _requires(random.Random(seed), case.tensors), seed)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("setting", KEEP_SETTINGS)
def test_linear_autograd_matches_reference(monkeypatch: pytest.MonkeyPatch, setting: str | None, seed: int) -> None:
    _set_keep(monkeypatch, setting)
    case = _linear_case(400 + seed, dtype=F64)
    _autograd_case("linear", setting, case, _requires(random.Random(seed), case.tensors), seed)


@pytest.mark.parametrize("setting", KEEP_SETTINGS)
@pytest.mark.parametrize("name", ["tiles", "blas_channels_last", "stride_gaps"])
def test_conv2d_autograd_larger_convs_every_gradient(monkeypatch: pytest.MonkeyPatch, name: str, setting) -> None:
    _set_keep(monkeypatch, setting)
    _autograd_case("conv", setting, BIG_CONVS[name](), [True] * 5, 5)


@pytest.mark.parametrize("setting", KEEP_SETTINGS)
@pytest.mark.parametrize("requires", [(0, 0, 0, 1, 0), (0, 0, 1, 0, 0), (1, 0, 0, 0, 0), (0, 1, 0, 0, 0),
                                      (0, 0, 0, 0, 1)], ids=["last", "core", "input", "first", "bias"])  # fmt: skip
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_autograd_single_requires_grad(monkeypatch: pytest.MonkeyPatch, kind: str, requires, setting) -> None:
    _set_keep(monkeypatch, setting)
    case = BIG_CONVS["tiles"]() if kind == "conv" else BIG_LINEARS["row_chunks"]()
    _autograd_case(kind, setting, case, [bool(r) for r in requires], 6)


@pytest.mark.parametrize(
    "kind,sides,rows,kept",
    [
        ("conv", (True, True), 1, True),
        ("conv", (True, False), 1, True),
        ("conv", (False, True), 1, True),
        ("conv", (False, False), 1, False),
        ("linear", (True, True), 16, True),
        ("linear", (True, True), 15, False),
        ("linear", (False, True), 16, True),
        ("linear", (True, False), 40, True),
        ("linear", (False, False), 40, False),
    ],
)
def test_automatic_rule(monkeypatch: pytest.MonkeyPatch, kind: str, sides, rows: int, kept: bool) -> None:
    monkeypatch.delenv(ENV, raising=False)
    gen = torch.Generator().manual_seed(7)
    has_first, has_last = sides
    if kind == "conv":
        x = _randn(gen, F64, 1, 3, 6, 6)
        core = _randn(gen, F64, 4, 2 if has_first else 3, 3, 3)
    else:
        x = _randn(gen, F64, rows, 3) if rows != 16 else _randn(gen, F64, 2, 8, 3)  # 16 rows as (2, 8)
        core = _randn(gen, F64, 4, 2 if has_first else 3)
    first = _randn(gen, F64, 2, 3) if has_first else None
    last = _randn(gen, F64, 5, 4) if has_last else None
    x.requires_grad_()
    with _OpLog() as log:
        y = OPS.tucker_conv2d(x, first, core, last, None, [1, 1], [1, 1], [1, 1]) if kind == "conv" else \
            OPS.tucker_linear(x, first, core, last, None)  # fmt: skip
        y.sum().backward()
    op = f"tucker_{'conv2d' if kind == 'conv' else 'linear'}"
    assert log.names() == [f"{op}_with_intermediates" if kept else op, f"{op}_backward"]


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_setting_is_read_on_every_call(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    gen = torch.Generator().manual_seed(8)
    x = _randn(gen, F64, 2, 3, 5, 5) if kind == "conv" else _randn(gen, F64, 4, 3)  # linear: 4 rows, auto: plain
    first = _randn(gen, F64, 2, 3).requires_grad_()
    core = _randn(gen, F64, 4, 2, 3, 3) if kind == "conv" else _randn(gen, F64, 4, 2)
    last = _randn(gen, F64, 5, 4)
    op = f"tucker_{'conv2d' if kind == 'conv' else 'linear'}"
    seen, grads = [], []
    for setting in ("1", "0", None, "1"):
        _set_keep(monkeypatch, setting)
        with _OpLog() as log:
            y = OPS.tucker_conv2d(x, first, core, last, None, [1, 1], [0, 0], [1, 1]) if kind == "conv" else \
                OPS.tucker_linear(x, first, core, last, None)  # fmt: skip
            grads.append(torch.autograd.grad(y, first, torch.ones_like(y))[0])
        seen.append(log.names()[0])
    auto = f"{op}_with_intermediates" if kind == "conv" else op
    assert seen == [f"{op}_with_intermediates", op, auto, f"{op}_with_intermediates"]
    for g in grads[1:]:
        assert_close(g, grads[0], rtol=1e-12, atol=1e-12)


def _forward_op_run(kind: str) -> str:
    """The tucker_ops forward op a graph-recording call reaches (conv: auto keeps; linear: 20 rows, auto keeps)."""
    gen = torch.Generator().manual_seed(9)
    x = _randn(gen, F64, 2, 3, 5, 5) if kind == "conv" else _randn(gen, F64, 20, 3)
    first = _randn(gen, F64, 2, 3).requires_grad_()
    core = _randn(gen, F64, 4, 2, 3, 3) if kind == "conv" else _randn(gen, F64, 4, 2)
    last = _randn(gen, F64, 5, 4)
    with _OpLog() as log:
        if kind == "conv":
            OPS.tucker_conv2d(x, first, core, last, None, [1, 1], [0, 0], [1, 1])
        else:
            OPS.tucker_linear(x, first, core, last, None)
    return log.names()[0]


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_keep_intermediates_context_manager(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    op = f"tucker_{'conv2d' if kind == 'conv' else 'linear'}"
    kept = f"{op}_with_intermediates"
    _set_keep(monkeypatch, None)
    assert _forward_op_run(kind) == kept  # automatic
    with tucker_ops.keep_intermediates(False):
        assert _forward_op_run(kind) == op
        with tucker_ops.keep_intermediates(True):
            assert _forward_op_run(kind) == kept
            with tucker_ops.keep_intermediates(None):  # back to automatic inside
                assert _forward_op_run(kind) == kept
            assert _forward_op_run(kind) == kept
        assert _forward_op_run(kind) == op  # nested settings restored on exit
    assert _forward_op_run(kind) == kept
    # The Python setting overrides the environment variable, and None defers to it again.
    _set_keep(monkeypatch, "0")
    assert _forward_op_run(kind) == op
    with tucker_ops.keep_intermediates(True):
        assert _forward_op_run(kind) == kept
        with tucker_ops.keep_intermediates(None):
            assert _forward_op_run(kind) == op
    _set_keep(monkeypatch, "1")
    with tucker_ops.keep_intermediates(False):
        assert _forward_op_run(kind) == op


def test_keep_intermediates_restored_after_an_exception() -> None:
    with pytest.raises(RuntimeError, match="inside"):
        with tucker_ops.keep_intermediates(False):
            raise RuntimeError("inside")
    assert OPS._keep_intermediates_mode() in (-1, 0, 1)
    assert OPS._set_keep_intermediates(-1) == -1  # nothing left set


def test_set_keep_intermediates_rejects_a_bad_mode() -> None:
    with pytest.raises(ValueError, match="expected mode to be -1 .automatic., 0 .recompute. or 1 .keep., but got 2"):
        OPS._set_keep_intermediates(2)
    assert OPS._set_keep_intermediates(-1) == -1


def test_relu_pool_backward_follows_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    _set_keep(monkeypatch, None)
    gen = torch.Generator().manual_seed(10)
    x = _randn(gen, F64, 2, 3, 8, 8).requires_grad_()
    first, core, last = _randn(gen, F64, 2, 3), _randn(gen, F64, 4, 2, 3, 3), _randn(gen, F64, 5, 4)
    grads = []
    for enabled, recomputed_with in ((True, "tucker_conv2d_with_intermediates"), (False, "tucker_conv2d")):
        with tucker_ops.keep_intermediates(enabled):
            y = tucker_ops.tucker_conv2d_relu_pool(x, first, core, last, None, 1, 1, 1, 2)
            with _OpLog() as log:
                (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
        assert log.names()[0] == recomputed_with
        given = log.backward_intermediates("tucker_conv2d_backward")
        assert given == [(enabled, enabled)]
        grads.append(g)
    assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_no_grad_and_no_requires_grad_use_the_plain_op(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    monkeypatch.setenv(ENV, "1")
    gen = torch.Generator().manual_seed(9)
    if kind == "conv":
        tensors = [_randn(gen, F64, 2, 3, 6, 6), _randn(gen, F64, 2, 3), _randn(gen, F64, 4, 2, 3, 3),
                   _randn(gen, F64, 5, 4), _randn(gen, F64, 5)]  # fmt: skip

        def call(*t):
            return OPS.tucker_conv2d(*t, [1, 1], [1, 1], [1, 1])

        op = "tucker_conv2d"
    else:
        tensors = [_randn(gen, F64, 32, 3), _randn(gen, F64, 2, 3), _randn(gen, F64, 4, 2), _randn(gen, F64, 5, 4),
                   _randn(gen, F64, 5)]  # fmt: skip
        call, op = OPS.tucker_linear, "tucker_linear"
    leaves = [t.clone().requires_grad_() for t in tensors]
    for context in (torch.no_grad, torch.inference_mode):
        with context(), _OpLog() as log:
            y = call(*leaves)
        assert log.names() == [op] and y.grad_fn is None
    with _OpLog() as log:  # nothing requires grad
        y = call(*tensors)
    assert log.names() == [op] and y.grad_fn is None
    with _OpLog() as log:  # the control: with grad the kept op runs
        call(*leaves)
    assert log.names() == [f"{op}_with_intermediates"]


def test_profiler_names_the_forward_op(monkeypatch: pytest.MonkeyPatch) -> None:
    case = BIG_CONVS["pointwise"]()
    leaves = [t.clone().requires_grad_() if t is not None else None for t in case.tensors]
    events = {}
    for setting in ("1", "0"):
        monkeypatch.setenv(ENV, setting)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            OPS.tucker_conv2d(*leaves, *case.opts).sum().backward()
        events[setting] = {e.name for e in prof.events() if e.name.startswith("tucker_ops::")}
    assert "tucker_ops::tucker_conv2d_with_intermediates" in events["1"], events["1"]
    assert "tucker_ops::tucker_conv2d_with_intermediates" not in events["0"], events["0"]
    assert "tucker_ops::tucker_conv2d_backward" in events["0"] and "tucker_ops::tucker_conv2d" in events["0"]


def _leaf(gen, *shape):
    return _randn(gen, F64, *shape).requires_grad_()


@pytest.mark.parametrize("sides", ["tucker2", "no_first", "no_last"])
def test_gradcheck_keeping_intermediates(monkeypatch: pytest.MonkeyPatch, sides: str) -> None:
    monkeypatch.setenv(ENV, "1")
    gen = torch.Generator().manual_seed(10)
    x = _leaf(gen, 2, 3, 7, 5).detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    first = None if sides == "no_first" else _leaf(gen, 2, 3)
    core = _leaf(gen, 3, 3 if first is None else 2, 2, 3)
    last = None if sides == "no_last" else _leaf(gen, 4, 3)
    bias = _leaf(gen, 3 if last is None else 4)
    conv_inputs = (x, first, core, last, bias)

    def conv(*t):
        return OPS.tucker_conv2d(*t, [3, 1], [1, 1], [1, 2])  # stride 3 > a 2-row kernel's reach

    rows = _leaf(gen, 2, 9, 4)  # 18 rows
    lfirst = None if sides == "no_first" else _leaf(gen, 3, 4)
    lcore = _leaf(gen, 2, 4 if lfirst is None else 3)
    llast = None if sides == "no_last" else _leaf(gen, 5, 2)
    linear_inputs = (rows, lfirst, lcore, llast, _leaf(gen, 2 if llast is None else 5))
    with _OpLog() as log:
        assert torch.autograd.gradcheck(conv, conv_inputs)
        assert torch.autograd.gradcheck(OPS.tucker_linear, linear_inputs)
    # Not vacuous: the analytical gradients came from backward calls given the intermediates.
    assert "tucker_conv2d_with_intermediates" in log.names() and "tucker_linear_with_intermediates" in log.names()
    assert (first is not None, last is not None) in log.backward_intermediates("tucker_conv2d_backward")
    assert (lfirst is not None, llast is not None) in log.backward_intermediates("tucker_linear_backward")


def test_gradgradcheck_keeping_intermediates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "1")
    gen = torch.Generator().manual_seed(11)
    conv_inputs = (_leaf(gen, 1, 2, 4, 4), _leaf(gen, 2, 2), _leaf(gen, 2, 2, 2, 2), _leaf(gen, 3, 2), _leaf(gen, 3))
    linear_inputs = (_leaf(gen, 3, 4), _leaf(gen, 2, 4), _leaf(gen, 3, 2), _leaf(gen, 2, 3), _leaf(gen, 2))
    with _OpLog() as log:
        assert torch.autograd.gradgradcheck(lambda *t: OPS.tucker_conv2d(*t, [1, 1], [1, 1], [1, 1]), conv_inputs)
        assert torch.autograd.gradgradcheck(OPS.tucker_linear, linear_inputs)
    assert (True, True) in log.backward_intermediates("tucker_conv2d_backward")
    assert (True, True) in log.backward_intermediates("tucker_linear_backward")


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_create_graph_double_backward_matches_reference(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    monkeypatch.setenv(ENV, "1")
    case = BIG_CONVS["stride_gaps"]() if kind == "conv" else BIG_LINEARS["row_chunks"]()
    fused_fn = (lambda *t: OPS.tucker_conv2d(*t, *case.opts)) if kind == "conv" else OPS.tucker_linear
    ref_fn = (lambda *t: reference.tucker_conv2d(*t, *case.opts)) if kind == "conv" else reference.tucker_linear
    results = []
    for fn in (fused_fn, ref_fn):
        leaves = [t.clone().requires_grad_() for t in case.tensors]
        y = fn(*leaves)
        g = torch.randn(y.shape, dtype=F64, generator=torch.Generator().manual_seed(12))
        first_order = torch.autograd.grad(y, leaves, g, create_graph=True)
        scalar = sum((t * t.detach().cos()).sum() for t in first_order)
        second = torch.autograd.grad(scalar, leaves, materialize_grads=True, allow_unused=True)
        results.append((first_order, second))
    for got, want in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        assert_close(got, want, **_tol(F64, want))


# -- opcheck --------------------------------------------------------------------------

OPCHECK_FACTORS = [
    pytest.param(True, True, True, id="tucker2-bias"),
    pytest.param(False, True, False, id="no_first"),
    pytest.param(True, False, True, id="no_last"),
    pytest.param(False, False, True, id="core_only"),
]


def _opcheck_conv_args(first: bool, last: bool, bias: bool, channels_last: bool):
    gen = torch.Generator().manual_seed(13)
    x = _conv_input(gen, F64, 2, 5, 7, 6, "channels_last" if channels_last else "contiguous")
    return (
        x,
        _randn(gen, F64, 3, 5) if first else None,
        _randn(gen, F64, 4, 3 if first else 5, 3, 2),
        _randn(gen, F64, 6, 4) if last else None,
        _randn(gen, F64, 6 if last else 4) if bias else None,
        [2, 1],
        [1, 0],
        [1, 2],
    )


def _opcheck_linear_args(first: bool, last: bool, bias: bool):
    gen = torch.Generator().manual_seed(14)
    return (
        _randn(gen, F64, 2, 3, 5),
        _randn(gen, F64, 3, 5) if first else None,
        _randn(gen, F64, 4, 3 if first else 5),
        _randn(gen, F64, 6, 4) if last else None,
        _randn(gen, F64, 6 if last else 4) if bias else None,
    )


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("first,last,bias", OPCHECK_FACTORS)
def test_opcheck_with_intermediates_ops(first: bool, last: bool, bias: bool, channels_last: bool) -> None:
    opcheck(OPS.tucker_conv2d_with_intermediates.default, _opcheck_conv_args(first, last, bias, channels_last))
    if not channels_last:
        opcheck(OPS.tucker_linear_with_intermediates.default, _opcheck_linear_args(first, last, bias))


@pytest.mark.parametrize(
    "mask", [[True] * 5, [False, False, False, True, False], [False, False, True, False, False], [True, True, False, False, False]],
    ids=["all", "last", "core", "input+first"],
)  # fmt: skip
@pytest.mark.parametrize("first,last,bias", OPCHECK_FACTORS[:3])
def test_opcheck_backward_ops_given_intermediates(first: bool, last: bool, bias: bool, mask) -> None:
    conv = _opcheck_conv_args(first, last, bias, channels_last=first)
    y, p, q = OPS.tucker_conv2d_with_intermediates(*conv)
    opcheck(OPS.tucker_conv2d_backward.default,
            (torch.randn_like(y), *conv[:4], *conv[5:], mask, p if first else None, q if last else None))  # fmt: skip
    lin = _opcheck_linear_args(first, last, bias)
    y, p, q = OPS.tucker_linear_with_intermediates(*lin)
    opcheck(OPS.tucker_linear_backward.default,
            (torch.randn_like(y), *lin[:4], mask, p if first else None, q if last else None))  # fmt: skip


# -- FLOP counts ----------------------------------------------------------------------


def _count(fn) -> tuple[int, dict]:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops(), counter.get_flop_counts()["Global"]


@pytest.mark.parametrize("mask", list(NAMED_MASKS.values()), ids=list(NAMED_MASKS))
def test_backward_flop_formulas_count_no_recomputation_when_kept(mask) -> None:
    mask = [bool(m) for m in mask]
    conv_shapes = ((2, 6, 5, 5), (2, 5, 7, 7), (3, 5), (4, 3, 3, 3), (6, 4))
    linear_shapes = ((8, 10), (4, 10), (5, 4), (6, 5))
    # Forward MACs of the stages, for the recomputation each backward would do.
    conv_first, conv_core = 2 * 7 * 7 * 5 * 3, 2 * 5 * 5 * 4 * 3 * 9
    linear_first, linear_core = 8 * 10 * 4, 8 * 4 * 5
    for fn, args, first_macs, core_macs in (
        (flops.conv2d_backward_flops, conv_shapes, conv_first, conv_core),
        (flops.linear_backward_flops, linear_shapes, linear_first, linear_core),
    ):
        plain = fn(*args, mask)
        kept = fn(*args, mask, kept_projection=True, kept_core_output=True)
        only_p = fn(*args, mask, kept_projection=True)
        only_q = fn(*args, mask, kept_core_output=True)
        need_core, need_last = mask[2], mask[3]
        recompute = (first_macs if need_core or need_last else 0) + (core_macs if need_last else 0)
        assert plain - kept == 2 * recompute, (fn.__name__, mask, plain, kept)
        assert kept <= only_p <= plain and kept <= only_q <= plain
        if need_core or need_last:
            assert kept < plain
        if need_last:
            assert only_q < plain and only_p < plain


def test_backward_flops_kept_is_less_on_a_tucker2_conv() -> None:
    args = ((2, 6, 5, 5), (2, 5, 7, 7), (3, 5), (4, 3, 3, 3), (6, 4), [True] * 5)
    assert flops.conv2d_backward_flops(*args, kept_projection=True, kept_core_output=True) < \
        flops.conv2d_backward_flops(*args)  # fmt: skip
    largs = ((8, 10), (4, 10), (5, 4), (6, 5), [True] * 5)
    assert flops.linear_backward_flops(*largs, kept_projection=True, kept_core_output=True) < \
        flops.linear_backward_flops(*largs)  # fmt: skip


@pytest.mark.parametrize("requires", [(1, 1, 1, 1, 1), (0, 1, 1, 1, 1), (0, 0, 0, 1, 0), (0, 0, 1, 0, 0)],
                         ids=["all", "weights", "last", "core"])  # fmt: skip
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_training_step_flops_keeping_intermediates(monkeypatch: pytest.MonkeyPatch, kind: str, requires) -> None:
    case = BIG_CONVS["tiles"]() if kind == "conv" else BIG_LINEARS["row_chunks"]()
    fused = (lambda *t: OPS.tucker_conv2d(*t, *case.opts)) if kind == "conv" else OPS.tucker_linear
    ref = (lambda *t: reference.tucker_conv2d(*t, *case.opts)) if kind == "conv" else reference.tucker_linear
    op = "tucker_conv2d" if kind == "conv" else "tucker_linear"

    def counts(fn):
        leaves = [t.clone().requires_grad_(bool(r)) for t, r in zip(case.tensors, requires)]
        forward, per_op = _count(lambda: fn(*leaves))
        y = fn(*leaves)
        backward, backward_ops = _count(lambda: y.backward(torch.ones_like(y)))
        return forward, backward, set(per_op), set(backward_ops)

    results = {}
    for setting in ("1", "0"):
        monkeypatch.setenv(ENV, setting)
        results[setting] = counts(fused)
    ref_forward, ref_backward, _, _ = counts(ref)
    (fwd_kept, bwd_kept, fwd_ops_kept, bwd_ops_kept), (fwd_plain, bwd_plain, fwd_ops_plain, _) = results["1"], results["0"]
    assert fwd_ops_kept == {getattr(OPS, f"{op}_with_intermediates")} and fwd_ops_plain == {getattr(OPS, op)}
    assert bwd_ops_kept == {getattr(OPS, f"{op}_backward")}
    assert fwd_kept == fwd_plain == ref_forward > 0
    # Kept: nothing recomputed, so the backward counts what the reference chain's does.
    assert bwd_kept == ref_backward, (bwd_kept, ref_backward)
    assert bwd_kept < bwd_plain


if __name__ == "__main__" and sys.argv[1:] == ["--run-cases"]:
    run_cases(CASES)
