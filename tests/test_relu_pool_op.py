"""tucker_ops::tucker_conv2d_relu_pool against its composite, avg_pool2d(relu(conv)).

The CPU kernel pools each output tile in cache (tiles a whole number of pooling
windows high, rows the floor mode drops never computed); CUDA runs the composite.
Every configuration is checked forward and backward (every gradient) in float64
against ``backend="reference"``: the reference conv chain, torch.relu and
F.avg_pool2d.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch.library import opcheck

from test_ops_fused_paths import conv_output_format
from tucker_ops._epilogue_op import tucker_conv2d_relu_pool

OPS = torch.ops.tucker_ops
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda", id="cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here"),
    ),
]  # fmt: skip
NAMES = ("input", "first", "core", "last", "bias")


def _random_case(seed: int, device: str, dtype: torch.dtype):
    """A valid random configuration whose conv output holds at least one pooling window."""
    rng = random.Random(seed)
    while True:
        pool = rng.choice((1, 2, 2, 3))
        h, w = rng.randint(1, 19), rng.randint(1, 19)
        k = (rng.randint(1, 5), rng.randint(1, 5))
        stride = (rng.randint(1, 2), rng.randint(1, 2))
        dilation = (rng.randint(1, 2), rng.randint(1, 2))
        padding = (rng.randint(0, 2), rng.randint(0, 2))
        out = [(s + 2 * p - d * (kk - 1) - 1) // st + 1 for s, p, d, kk, st in zip((h, w), padding, dilation, k, stride)]
        padding_ok = all(p <= d * (kk - 1) + 1 for p, d, kk in zip(padding, dilation, k))
        if min(out) >= pool and padding_ok:
            break
    side = rng.choice(("tucker2", "tucker2", "no_first", "no_last"))
    c_in = rng.randint(1, 7)
    r_in = None if side == "no_first" else rng.randint(1, 5)
    r_out = rng.randint(1, 6)
    c_out = None if side == "no_last" else rng.randint(1, 9)
    n = rng.choice((0, 1, 2, 3))
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).to(device=device, dtype=dtype)

    x = randn(n, c_in, h, w)
    if rng.random() < 0.3:
        x = x.contiguous(memory_format=torch.channels_last)
    tensors = (
        x,
        randn(r_in, c_in) if r_in is not None else None,
        randn(r_out, r_in if r_in is not None else c_in, *k),
        randn(c_out, r_out) if c_out is not None else None,
        randn(c_out if c_out is not None else r_out) if rng.random() < 0.7 else None,
    )
    return tensors, (stride, padding, dilation, pool)


def _maxabs(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def _check(tensors, args, tol: float, grad_seed: int) -> None:
    fused = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    ref = [t.detach().double().requires_grad_() if t is not None else None for t in tensors]
    y = tucker_conv2d_relu_pool(*fused, *args)
    y_ref = tucker_conv2d_relu_pool(*ref, *args, backend="reference")
    assert y.shape == y_ref.shape and y.dtype == tensors[0].dtype
    assert y.is_contiguous(memory_format=conv_output_format(tensors[0]))
    assert _maxabs(y.double() - y_ref) <= tol * max(_maxabs(y_ref), 1.0)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(grad_seed))
    y.backward(g.to(y.dtype).to(y.device))
    y_ref.backward(g.to(y_ref.device))
    for name, a, b in zip(NAMES, fused, ref):
        if a is None:
            continue
        assert a.grad is not None, f"no gradient for {name}"
        err = _maxabs(a.grad.double() - b.grad)
        assert err <= tol * max(_maxabs(b.grad), 1.0), f"grad of {name}: error {err:.2e}"


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("device", DEVICES)
def test_random_configurations_float64(device: str, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Odd seeds: the backward's recomputed conv output comes with its intermediates
    # (CPU), handed to the conv backward; even seeds: recomputed there instead.
    monkeypatch.setenv("TUCKER_OPS_KEEP_INTERMEDIATES", "1" if seed % 2 else "0")
    tensors, args = _random_case(seed, device, torch.float64)
    _check(tensors, args, 1e-10, seed + 7)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("device", DEVICES)
def test_random_configurations_float32(device: str, seed: int) -> None:
    tensors, args = _random_case(seed + 1000, device, torch.float32)
    _check(tensors, args, 1e-4, seed)


def test_thesisnet_conv1_at_a_batch_with_many_tiles() -> None:
    # ThesisNet's conv1 (Tucker-1 on the output side) at a batch whose tiles split images.
    gen = torch.Generator().manual_seed(3)
    t = (
        torch.randn(5, 1, 28, 28, dtype=torch.float64, generator=gen),
        None,
        torch.randn(2, 1, 5, 5, dtype=torch.float64, generator=gen),
        torch.randn(16, 2, dtype=torch.float64, generator=gen),
        torch.randn(16, dtype=torch.float64, generator=gen),
    )
    _check(t, ((1, 1), (2, 2), (1, 1), 2), 1e-10, 1)


@pytest.mark.parametrize("threads", [1, 2])
def test_result_does_not_depend_on_the_thread_count(threads: int) -> None:
    tensors, args = _random_case(5, "cpu", torch.float32)
    x = torch.randn(6, tensors[0].shape[1], 23, 21)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = tucker_conv2d_relu_pool(x, *tensors[1:], (1, 1), (1, 1), (1, 1), 2)
        torch.set_num_threads(threads)
        got = tucker_conv2d_relu_pool(x, *tensors[1:], (1, 1), (1, 1), (1, 1), 2)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(got, want)


@pytest.mark.parametrize("sides", ["tucker2", "no_first", "no_last"])
def test_gradcheck(sides: str) -> None:
    gen = torch.Generator().manual_seed(11)

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_()

    x = leaf(2, 3, 7, 6)
    first = leaf(2, 3) if sides != "no_first" else None
    core = leaf(3, 2 if first is not None else 3, 3, 3)
    last = leaf(4, 3) if sides != "no_last" else None
    bias = leaf(4 if last is not None else 3)
    inputs = tuple(t for t in (x, first, core, last, bias) if t is not None)

    def fn(*leaves):
        it = iter(leaves)
        args = [next(it) if t is not None else None for t in (x, first, core, last, bias)]
        return tucker_conv2d_relu_pool(*args, (1, 1), (1, 1), (1, 1), 2)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("pool", [1, 2, 3])
@pytest.mark.parametrize("sides", ["tucker2", "no_last"])
def test_double_backward(sides: str, pool: int) -> None:
    # create_graph=True: the backward recomputes the conv and applies the pool's and
    # the ReLU's backward through autograd, then tucker_conv2d_backward's own formula.
    gen = torch.Generator().manual_seed(14)

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_()

    x, first, core = leaf(1, 2, 7, 5), leaf(2, 2), leaf(3, 2, 2, 2)
    last = leaf(2, 3) if sides == "tucker2" else None
    bias = leaf(2 if last is not None else 3)
    inputs = tuple(t for t in (x, first, core, last, bias) if t is not None)

    def fn(*leaves):
        args = list(leaves) if last is not None else [*leaves[:3], None, leaves[3]]
        return tucker_conv2d_relu_pool(*args, (1, 1), (1, 1), (1, 1), pool)

    assert torch.autograd.gradgradcheck(fn, inputs)


def test_backward_node_is_the_cpp_one_and_kept_intermediates_change_nothing() -> None:
    import tucker_ops

    gen = torch.Generator().manual_seed(15)
    t = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((2, 3, 9, 8), (2, 3), (3, 2, 3, 3), (5, 3), (5,))]

    def grads():
        leaves = [u.clone().requires_grad_() for u in t]
        y = tucker_conv2d_relu_pool(*leaves, (1, 1), (1, 1), (1, 1), 2)
        assert "CppNode<tucker_ops::TuckerConv2dReluPoolFunction>" in y.grad_fn.name()
        return torch.autograd.grad(y.square().sum(), leaves)

    kept = grads()  # the CPU backward recomputes the conv with its intermediates
    with tucker_ops.keep_intermediates(False):
        recomputed = grads()
    for a, b in zip(kept, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_opcheck(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(12)
    t = [torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype) for s in ((2, 3, 9, 8), (2, 3), (3, 2, 3, 3), (5, 3), (5,))]
    opcheck(OPS.tucker_conv2d_relu_pool, (t[0], t[1], t[2], t[3], t[4], [1, 1], [1, 1], [1, 1], 2))
    leaves = [u.clone().requires_grad_() for u in t]
    opcheck(OPS.tucker_conv2d_relu_pool, (*leaves, [2, 1], [0, 1], [1, 2], 3))


def _first_line(fn) -> tuple[type, str]:
    with pytest.raises(Exception) as info:
        fn()
    return info.type, str(info.value).split("\n")[0]


@pytest.mark.parametrize("pool", [0, -2])
def test_bad_pool_is_a_clear_error_on_every_path(pool: int) -> None:
    x, core = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
    direct = _first_line(lambda: OPS.tucker_conv2d_relu_pool(x, None, core, None, None, [1, 1], [0, 0], [1, 1], pool))
    wrapper = _first_line(lambda: tucker_conv2d_relu_pool(x, None, core, None, None, 1, 0, 1, pool))
    assert direct[0] is ValueError and direct == wrapper
    assert "expected pool to be an int >= 1" in direct[1] and repr(pool) in direct[1]


def test_output_smaller_than_the_pool_is_a_clear_error() -> None:
    x, core = torch.randn(1, 2, 4, 9), torch.randn(3, 2, 3, 3)  # conv output 2 x 7
    errors = [
        _first_line(lambda: OPS.tucker_conv2d_relu_pool(x, None, core, None, None, [1, 1], [0, 0], [1, 1], 3)),
        _first_line(lambda: tucker_conv2d_relu_pool(x, None, core, None, None, 1, 0, 1, 3, backend="reference")),
    ]
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fx, fcore = torch.empty(1, 2, 4, 9), torch.empty(3, 2, 3, 3)
        errors.append(_first_line(lambda: OPS.tucker_conv2d_relu_pool(fx, None, fcore, None, None, [1, 1], [0, 0], [1, 1], 3)))
    assert all(e == errors[0] for e in errors), errors
    assert errors[0][0] is ValueError and "(H_out, W_out) = (2, 7)" in errors[0][1]


def test_shape_errors_name_the_op() -> None:
    x, core = torch.randn(1, 4, 6, 6), torch.randn(3, 2, 3, 3)
    kind, message = _first_line(lambda: tucker_conv2d_relu_pool(x, torch.randn(2, 3), core, None, None, 1, 0, 1, 2))
    assert kind is ValueError and message.startswith("tucker_conv2d_relu_pool: expected first")
