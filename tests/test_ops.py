"""The registered ops against reference.py: forward, every gradient, registration.

Random configurations are drawn from fixed seeds (one seed per test id), so a
failure names a reproducible case.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.library import opcheck
from torch.testing import assert_close

from test_ops_fused_paths import conv_output_format
from tucker_ops import _ops, reference

OPS = torch.ops.tucker_ops
LAYOUTS = ("contiguous", "channels_last", "sliced", "permuted")


def _tol(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}


def _conv_input(n: int, c: int, h: int, w: int, layout: str, dtype: torch.dtype, gen: torch.Generator):
    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, generator=gen)

    if layout == "contiguous":
        return randn(n, c, h, w)
    if layout == "channels_last":
        return randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        return randn(n, 2 * c, h + 1, 2 * w)[:, ::2, 1:, ::2]
    if layout == "permuted":
        return randn(w, c, n, h).permute(2, 1, 3, 0)
    raise AssertionError(layout)


@dataclass
class ConvCase:
    n: int
    c_in: int
    h: int
    w: int
    r_in: int | None
    r_out: int
    c_out: int | None
    k: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    bias: bool
    dtype: torch.dtype
    layout: str

    def tensors(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        x = _conv_input(self.n, self.c_in, self.h, self.w, self.layout, self.dtype, gen)
        core_in = self.r_in if self.r_in is not None else self.c_in
        out = self.c_out if self.c_out is not None else self.r_out

        def randn(*shape):
            return torch.randn(*shape, dtype=self.dtype, generator=gen)

        first = randn(self.r_in, self.c_in) if self.r_in is not None else None
        core = randn(self.r_out, core_in, *self.k)
        last = randn(self.c_out, self.r_out) if self.c_out is not None else None
        bias = randn(out) if self.bias else None
        return x, first, core, last, bias


def _random_conv_case(seed: int) -> ConvCase:
    rng = random.Random(seed)
    while True:
        h, w = rng.randint(1, 9), rng.randint(1, 9)
        k = (rng.randint(1, 4), rng.randint(1, 4))
        stride = (rng.randint(1, 3), rng.randint(1, 3))
        dilation = (rng.randint(1, 3), rng.randint(1, 3))
        # The ops reject padding beyond the dilated kernel extent dilation * (k - 1) + 1
        # (csrc/checks.cpp, check_padding_extent), so draw it within that bound.
        padding = tuple(rng.randint(0, min(2, d * (kk - 1) + 1)) for d, kk in zip(dilation, k))
        if all(s + 2 * p - d * (kk - 1) - 1 >= 0 for s, p, d, kk in zip((h, w), padding, dilation, k)):
            break
    side = rng.choice(("tucker2", "tucker2", "no_first", "no_last"))
    return ConvCase(
        n=rng.choice((0, 1, 2, 3, 5)),
        c_in=rng.randint(1, 6),
        h=h,
        w=w,
        r_in=None if side == "no_first" else rng.randint(1, 5),
        r_out=rng.randint(1, 5),
        c_out=None if side == "no_last" else rng.randint(1, 6),
        k=k,
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=rng.random() < 0.6,
        dtype=torch.float32 if rng.random() < 0.25 else torch.float64,
        layout=rng.choice(LAYOUTS),
    )


def _check_against_reference(fused_fn, reference_fn, tensors, grad_seed: int, dtype: torch.dtype) -> None:
    """Forward and all gradients of fused_fn(*tensors) against reference_fn."""
    # detach() keeps strides, so sliced / permuted / channels_last inputs reach the op as they are.
    leaves_fused = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    leaves_ref = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    y = fused_fn(*leaves_fused)
    y_ref = reference_fn(*leaves_ref)
    assert y.is_contiguous(memory_format=conv_output_format(tensors[0]))
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, **_tol(dtype))

    gen = torch.Generator().manual_seed(grad_seed)
    g = torch.randn(y.shape, dtype=dtype, generator=gen)
    y.backward(g)
    y_ref.backward(g)
    for name, a, b in zip(("input", "first", "core", "last", "bias"), leaves_fused, leaves_ref):
        if a is None:
            continue
        assert a.grad is not None, f"no gradient for {name}"
        assert_close(a.grad, b.grad, **_tol(dtype), msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("seed", range(48))
def test_conv2d_matches_reference(seed: int) -> None:
    case = _random_conv_case(seed)
    tensors = case.tensors(seed)
    args = (case.stride, case.padding, case.dilation)
    _check_against_reference(
        lambda *t: _ops.tucker_conv2d(*t, *args, backend="fused"),
        lambda *t: reference.tucker_conv2d(*t, *args),
        tensors,
        seed + 1000,
        case.dtype,
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv2d_input_layouts_forward_and_input_grad(layout: str) -> None:
    # The layouts reach the kernel unchanged: the op gets the strided tensor itself.
    gen = torch.Generator().manual_seed(7)
    x = _conv_input(3, 4, 7, 6, layout, torch.float64, gen).requires_grad_()
    first, core, last = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 3, 3, 2, dtype=torch.float64), None
    y = OPS.tucker_conv2d(x, first, core, last, None, [1, 2], [1, 0], [2, 1])
    y_ref = reference.tucker_conv2d(x, first, core, last, None, (1, 2), (1, 0), (2, 1))
    assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    (gx_ref,) = torch.autograd.grad(y_ref, x, torch.ones_like(y_ref))
    assert_close(gx, gx_ref, rtol=1e-10, atol=1e-10)


def test_conv2d_batch_zero() -> None:
    x = torch.randn(0, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    first = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    core = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    last = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = _ops.tucker_conv2d(x, first, core, last, bias, 2, 1)
    assert y.shape == (0, 5, 3, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for t in (first, core, last, bias):
        assert t.grad.shape == t.shape
        assert torch.count_nonzero(t.grad) == 0


def test_conv2d_pointwise_core_and_multi_chunk_batch() -> None:
    # 1x1 core with stride 1 skips im2col; a batch of 9 spans several chunks.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 6, 5, 4, dtype=torch.float64, generator=gen)
    factors = (
        torch.randn(3, 6, dtype=torch.float64, generator=gen),
        torch.randn(4, 3, 1, 1, dtype=torch.float64, generator=gen),
        torch.randn(7, 4, dtype=torch.float64, generator=gen),
        torch.randn(7, dtype=torch.float64, generator=gen),
    )
    for first_none, last_none in ((False, False), (True, False), (False, True)):
        first, core, last, bias = factors
        if first_none:
            core = torch.randn(4, 6, 1, 1, dtype=torch.float64, generator=gen)
            first = None
        if last_none:
            last, bias = None, bias[:4]
        _check_against_reference(
            lambda *t: _ops.tucker_conv2d(*t),
            lambda *t: reference.tucker_conv2d(*t),
            (x, first, core, last, bias),
            11,
            torch.float64,
        )


def _random_linear_input(rng: random.Random, features: int, dtype: torch.dtype, gen: torch.Generator):
    kind = rng.choice(("1d", "2d", "3d", "4d", "empty", "transposed", "sliced"))
    if kind == "1d":
        return torch.randn(features, dtype=dtype, generator=gen)
    if kind == "2d":
        return torch.randn(rng.randint(1, 7), features, dtype=dtype, generator=gen)
    if kind == "3d":
        return torch.randn(rng.randint(1, 3), rng.randint(1, 4), features, dtype=dtype, generator=gen)
    if kind == "4d":
        return torch.randn(2, 1, 3, features, dtype=dtype, generator=gen)
    if kind == "empty":
        return torch.randn(2, 0, features, dtype=dtype, generator=gen)
    if kind == "transposed":
        return torch.randn(features, 5, dtype=dtype, generator=gen).t()
    return torch.randn(3, 2 * features + 1, dtype=dtype, generator=gen)[:, 1::2]


@pytest.mark.parametrize("seed", range(32))
def test_linear_matches_reference(seed: int) -> None:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float32 if rng.random() < 0.25 else torch.float64
    features = rng.randint(1, 9)
    side = rng.choice(("tucker2", "tucker2", "no_first", "no_last"))
    r_in = None if side == "no_first" else rng.randint(1, 6)
    r_out = rng.randint(1, 6)
    out = None if side == "no_last" else rng.randint(1, 8)
    x = _random_linear_input(rng, features, dtype, gen)
    first = torch.randn(r_in, features, dtype=dtype, generator=gen) if r_in else None
    core = torch.randn(r_out, r_in or features, dtype=dtype, generator=gen)
    last = torch.randn(out, r_out, dtype=dtype, generator=gen) if out else None
    bias = torch.randn(out or r_out, dtype=dtype, generator=gen) if rng.random() < 0.6 else None
    _check_against_reference(
        lambda *t: _ops.tucker_linear(*t, backend="fused"),
        reference.tucker_linear,
        (x, first, core, last, bias),
        seed,
        dtype,
    )


@pytest.mark.parametrize("rows", [1, 255, 600])
def test_linear_row_blocks_and_chunks(rows: int) -> None:
    # 600 rows on 2 threads: 2 chunks of 300, each one block of 256 plus a remainder.
    gen = torch.Generator().manual_seed(rows)
    tensors = tuple(
        torch.randn(*shape, dtype=torch.float64, generator=gen)
        for shape in ((rows, 12), (4, 12), (3, 4), (9, 3), (9,))
    )
    _check_against_reference(_ops.tucker_linear, reference.tucker_linear, tensors, 0, torch.float64)


def test_linear_leading_dim_zero_gradients() -> None:
    x = torch.randn(0, 4, 6, requires_grad=True)
    first, core, last = torch.randn(2, 6), torch.randn(3, 2), torch.randn(5, 3)
    weights = [t.requires_grad_() for t in (first, core, last)]
    bias = torch.randn(5, requires_grad=True)
    y = _ops.tucker_linear(x, *weights, bias)
    assert y.shape == (0, 4, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for t in (*weights, bias):
        assert t.grad.shape == t.shape and torch.count_nonzero(t.grad) == 0


def test_deterministic_at_fixed_thread_count() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 4, 9, 9, generator=gen)
    g = torch.randn(7, 6, 5, 5, generator=gen)
    factors = tuple(torch.randn(*shape, generator=gen) for shape in ((3, 4), (5, 3, 3, 3), (6, 5)))
    args = ([2, 2], [1, 1], [1, 1], [True] * 5)
    first_run = OPS.tucker_conv2d_backward(g, x, *factors, *args)
    for _ in range(3):
        for a, b in zip(first_run, OPS.tucker_conv2d_backward(g, x, *factors, *args)):
            assert torch.equal(a, b)


def test_inference_mode_and_no_grad() -> None:
    # Work runs on OpenMP threads, which must see the caller's inference mode.
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(6, 3, 8, 8, generator=gen)
    factors = tuple(torch.randn(*shape, generator=gen) for shape in ((2, 3), (4, 2, 3, 3), (5, 4)))
    bias = torch.randn(5, generator=gen, requires_grad=True)
    expected = reference.tucker_conv2d(x, *factors, bias, (1, 1), (1, 1)).detach()
    rows = torch.randn(300, 3, generator=gen)  # two chunks of rows
    with torch.inference_mode():
        assert_close(_ops.tucker_conv2d(x, *factors, bias, 1, 1), expected)
        assert_close(_ops.tucker_linear(rows, factors[0], factors[2][:, :2], None, None),
                     rows @ factors[0].T @ factors[2][:, :2].T)  # fmt: skip
    with torch.no_grad():
        y = _ops.tucker_conv2d(x, *factors, bias, 1, 1)
    assert not y.requires_grad
    assert_close(y, expected)


# -- gradcheck ------------------------------------------------------------------------


@pytest.mark.parametrize("sides", ["tucker2", "no_first", "no_last"])
def test_conv2d_gradcheck(sides: str) -> None:
    gen = torch.Generator().manual_seed(1)

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_()

    x = leaf(2, 3, 5, 4)
    first = None if sides == "no_first" else leaf(2, 3)
    core = leaf(3, 3 if first is None else 2, 2, 3)
    last = None if sides == "no_last" else leaf(4, 3)
    bias = leaf(3 if last is None else 4)
    inputs = (x, first, core, last, bias)
    assert torch.autograd.gradcheck(lambda *t: _ops.tucker_conv2d(*t, (2, 1), (1, 1), (1, 2)), inputs)


@pytest.mark.parametrize("sides", ["tucker2", "no_first", "no_last"])
def test_linear_gradcheck(sides: str) -> None:
    gen = torch.Generator().manual_seed(2)

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_()

    x = leaf(2, 3, 5)
    first = None if sides == "no_first" else leaf(2, 5)
    core = leaf(3, 5 if first is None else 2)
    last = None if sides == "no_last" else leaf(4, 3)
    bias = leaf(3 if last is None else 4)
    assert torch.autograd.gradcheck(_ops.tucker_linear, (x, first, core, last, bias))


def test_double_backward_gradgradcheck() -> None:
    gen = torch.Generator().manual_seed(4)

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_()

    conv_inputs = (leaf(1, 2, 4, 4), leaf(2, 2), leaf(2, 2, 2, 2), leaf(3, 2), leaf(3))
    assert torch.autograd.gradgradcheck(lambda *t: _ops.tucker_conv2d(*t, 1, 1, 1), conv_inputs)
    linear_inputs = (leaf(3, 4), leaf(2, 4), leaf(3, 2), leaf(2, 3), leaf(2))
    assert torch.autograd.gradgradcheck(_ops.tucker_linear, linear_inputs)


# -- opcheck --------------------------------------------------------------------------


def _conv_args(requires_grad: bool, first: bool, last: bool, bias: bool):
    gen = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_(requires_grad)

    core = t(4, 3 if first else 5, 3, 2)
    return (
        t(2, 5, 7, 6),
        t(3, 5) if first else None,
        core,
        t(6, 4) if last else None,
        t(6 if last else 4) if bias else None,
        [2, 1],
        [1, 0],
        [1, 2],
    )


def _linear_args(requires_grad: bool, first: bool, last: bool, bias: bool):
    gen = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_(requires_grad)

    return (
        t(2, 3, 5),
        t(3, 5) if first else None,
        t(4, 3 if first else 5),
        t(6, 4) if last else None,
        t(6 if last else 4) if bias else None,
    )


FACTOR_COMBOS = [
    pytest.param(True, True, True, id="tucker2-bias"),
    pytest.param(True, True, False, id="tucker2-nobias"),
    pytest.param(False, True, True, id="no_first"),
    pytest.param(True, False, False, id="no_last-nobias"),
]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("first,last,bias", FACTOR_COMBOS)
def test_opcheck_forward_ops(requires_grad: bool, first: bool, last: bool, bias: bool) -> None:
    opcheck(OPS.tucker_conv2d.default, _conv_args(requires_grad, first, last, bias))
    opcheck(OPS.tucker_linear.default, _linear_args(requires_grad, first, last, bias))


@pytest.mark.parametrize(
    "mask", [[True] * 5, [True, False, False, False, False], [False, True, True, True, True], [False] * 5]
)
@pytest.mark.parametrize("first,last,bias", FACTOR_COMBOS[::2])
def test_opcheck_backward_ops(mask: list[bool], first: bool, last: bool, bias: bool) -> None:
    conv = _conv_args(False, first, last, bias)
    conv_out = OPS.tucker_conv2d(*conv)
    opcheck(OPS.tucker_conv2d_backward.default, (torch.randn_like(conv_out), *conv[:4], *conv[5:], mask))
    lin = _linear_args(False, first, last, bias)
    lin_out = OPS.tucker_linear(*lin)
    opcheck(OPS.tucker_linear_backward.default, (torch.randn_like(lin_out), *lin[:4], mask))


def _channels_last_conv_args(requires_grad: bool):
    args = list(_conv_args(False, True, True, True))
    args[0] = args[0].contiguous(memory_format=torch.channels_last)
    return tuple(a.requires_grad_(requires_grad) if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_channels_last(requires_grad: bool) -> None:
    """The ops on channels_last input: output (and the backward's input gradient) channels_last."""
    args = _channels_last_conv_args(requires_grad)
    opcheck(OPS.tucker_conv2d.default, args)
    opcheck(OPS.tucker_conv2d_relu_pool.default, (*args, 2))
    opcheck(OPS.tucker_conv2d_with_intermediates.default, _channels_last_conv_args(False))  # no autograd
    out = OPS.tucker_conv2d(*args).detach()
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    for grad_out in (torch.randn_like(out), torch.randn_like(out).contiguous()):
        opcheck(OPS.tucker_conv2d_backward.default, (grad_out, *args[:4], *args[5:], [True] * 5))


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided"])
def test_fake_kernels_declare_the_output_layout(fmt: str) -> None:
    """Meta tensors (what torch.compile and export plan with) get the strides the CPU kernels
    return: channels_last output for channels_last input, contiguous otherwise."""
    args = list(_conv_args(False, True, True, True))
    if fmt == "channels_last":
        args[0] = args[0].contiguous(memory_format=torch.channels_last)
    elif fmt == "strided":
        args[0] = args[0].transpose(2, 3).contiguous().transpose(2, 3)
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    calls = {
        "tucker_conv2d": lambda a: [OPS.tucker_conv2d(*a)],
        "with_intermediates": lambda a: list(OPS.tucker_conv2d_with_intermediates(*a)),
        "relu_pool": lambda a: [OPS.tucker_conv2d_relu_pool(*a, 2)],
    }
    for name, call in calls.items():
        for real, fake in zip(call(args), call(meta)):
            assert fake.shape == real.shape and fake.stride() == real.stride(), (name, fake.stride(), real.stride())
    grad_out = torch.randn_like(OPS.tucker_conv2d(*args))
    real = OPS.tucker_conv2d_backward(grad_out, *args[:4], *args[5:], [True] * 5)
    fake = OPS.tucker_conv2d_backward(grad_out.to("meta"), *meta[:4], *meta[5:], [True] * 5)
    for r, f in zip(real, fake):
        assert f.shape == r.shape and f.stride() == r.stride(), (f.stride(), r.stride())


def test_backward_ops_skipped_outputs_are_empty() -> None:
    conv = _conv_args(False, first=False, last=True, bias=False)
    g = torch.randn_like(OPS.tucker_conv2d(*conv))
    grads = OPS.tucker_conv2d_backward(g, *conv[:4], *conv[5:], [False, True, True, False, True])
    # first is None, so its slot is empty even though the mask asks for it.
    assert [tuple(t.shape) for t in grads] == [(0,), (0,), tuple(conv[2].shape), (0,), (6,)]


# -- fake tensors, meta, symbolic shapes ----------------------------------------------


def test_fake_tensor_mode_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    conv = _conv_args(False, True, True, True)
    lin = _linear_args(False, True, True, True)
    with FakeTensorMode() as mode:
        fake_conv = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in conv]
        y = OPS.tucker_conv2d(*fake_conv)
        grads = OPS.tucker_conv2d_backward(y, *fake_conv[:4], *fake_conv[5:], [True] * 5)
        fake_lin = [mode.from_tensor(t) for t in lin]
        z = OPS.tucker_linear(*fake_lin)
    assert y.shape == OPS.tucker_conv2d(*conv).shape
    assert [g.shape for g in grads] == [t.shape for t in conv[:4]] + [torch.Size([6])]
    assert z.shape == (2, 3, 6)


def test_meta_device_shapes() -> None:
    with torch.device("meta"):
        y = OPS.tucker_conv2d(torch.empty(4, 5, 11, 9), None, torch.empty(6, 5, 3, 3), torch.empty(8, 6), None,
                              [2, 1], [1, 1], [1, 2])  # fmt: skip
        z = OPS.tucker_linear(torch.empty(7), torch.empty(2, 7), torch.empty(3, 2), None, torch.empty(3))
        gz = OPS.tucker_linear_backward(torch.empty(3), torch.empty(7), torch.empty(2, 7), torch.empty(3, 2), None,
                                        [True, True, False, False, True])  # fmt: skip
    assert y.device.type == "meta" and y.shape == (4, 8, 6, 7)
    assert z.shape == (3,)
    assert [tuple(g.shape) for g in gz] == [(7,), (2, 7), (0,), (0,), (3,)]


def test_symbolic_shapes_trace_and_replay() -> None:
    conv = _conv_args(False, True, True, True)
    traced = make_fx(lambda *t: OPS.tucker_conv2d(*t, [2, 1], [1, 0], [1, 2]), tracing_mode="symbolic")(*conv[:5])
    out_val = next(n for n in traced.graph.nodes if n.op == "output").args[0].meta["val"]
    assert any(isinstance(s, torch.SymInt) for s in out_val.shape)
    bigger = torch.randn(3, 5, 9, 11, dtype=torch.float64)
    assert_close(traced(bigger, *conv[1:5]), reference.tucker_conv2d(bigger, *conv[1:5], (2, 1), (1, 0), (1, 2)))

    lin = _linear_args(False, True, False, True)
    traced_lin = make_fx(lambda *t: OPS.tucker_linear(*t), tracing_mode="symbolic")(*lin)
    x = torch.randn(4, 5, 5, dtype=torch.float64)
    assert_close(traced_lin(x, *lin[1:]), reference.tucker_linear(x, *lin[1:]))


# -- Python entry points --------------------------------------------------------------


def test_entry_points_follow_use_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_conv, real_linear = reference.tucker_conv2d, reference.tucker_linear
    monkeypatch.setattr(reference, "tucker_conv2d", lambda *a: calls.append("conv") or real_conv(*a))
    monkeypatch.setattr(reference, "tucker_linear", lambda *a: calls.append("linear") or real_linear(*a))
    conv = _conv_args(False, True, True, True)
    lin = _linear_args(False, True, True, True)

    _ops.tucker_conv2d(*conv[:5])
    _ops.tucker_linear(*lin)
    assert calls == []
    with _ops.use_reference():
        _ops.tucker_conv2d(*conv[:5])
        _ops.tucker_linear(*lin)
        assert calls == ["conv", "linear"]
        with _ops.use_reference(False):
            _ops.tucker_linear(*lin)
        _ops.tucker_linear(*lin, backend="fused")
        assert calls == ["conv", "linear"]
        _ops.tucker_linear(*lin)
    assert calls == ["conv", "linear", "linear"]
    _ops.tucker_linear(*lin, backend="reference")
    assert calls == ["conv", "linear", "linear", "linear"]


def test_entry_point_int_and_pair_arguments_agree() -> None:
    conv = _conv_args(False, True, True, True)
    x, first, core, last, bias = conv[:5]
    assert_close(_ops.tucker_conv2d(x, first, core, last, bias, 2, 1, 1),
                 _ops.tucker_conv2d(x, first, core, last, bias, (2, 2), [1, 1], (1, 1)))  # fmt: skip
    assert_close(_ops.tucker_conv2d(x, first, core, last, bias, 2, 1, backend="reference"),
                 _ops.tucker_conv2d(x, first, core, last, bias, 2, 1, backend="fused"))  # fmt: skip


def test_missing_extension_raises_import_error(tmp_path) -> None:
    import shutil
    import subprocess
    import sys

    import tucker_ops

    package_dir = tmp_path / "tucker_ops"
    shutil.copytree(
        tucker_ops.__path__[0], package_dir, ignore=shutil.ignore_patterns("_C*", "__pycache__", "*.so")
    )
    proc = subprocess.run(
        [sys.executable, "-c", "import tucker_ops._ops"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "ImportError: tucker_ops._C" in proc.stderr and "pip install" in proc.stderr, proc.stderr[-2000:]
