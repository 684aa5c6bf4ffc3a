"""torch.func transforms over the fused ops, against the same transforms over reference.py.

The fused ops' autograd kernels are C++, which functorch refuses; under a transform the
entry points take tucker_ops/_functorch.py's autograd.Function classes. Every check
here runs a transform on the fused entry point and on backend="reference" (plain
PyTorch, which functorch differentiates itself) in float64 and compares the results:
first derivatives (grad, jacrev, jvp, jacfwd), per-sample gradients (vmap of grad),
second derivatives (hessian, jacrev of jacrev), modules through
torch.func.functional_call, and forward-mode AD with dual tensors (forward_ad). vmap over the input alone must fold the batch into one
op call.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

import tucker_ops
from tucker_ops import _functorch
from tucker_ops._ops import tucker_conv2d, tucker_linear

SIDES = ["tucker2", "no_first", "no_last", "core_only"]
CONV_ARGS = ((2, 1), (1, 0), (1, 2))  # stride, padding, dilation


@pytest.fixture(autouse=True)
def _quiet_batching_fallback():
    # vmap over a custom op warns that it falls back to one call per sample: expected here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        yield


def _tensors(kind: str, sides: str, bias: bool, seed: int, batch: int = 2):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen)

    has_first, has_last = sides in ("tucker2", "no_last"), sides in ("tucker2", "no_first")
    if kind == "conv":
        c_in, r_in, r_out, c_out = 3, 2, 3, 4
        x = rand(batch, c_in, 7, 6)
        core = rand(r_out, r_in if has_first else c_in, 3, 2)
    else:
        c_in, r_in, r_out, c_out = 5, 2, 3, 4
        x = rand(batch, 3, c_in)
        core = rand(r_out, r_in if has_first else c_in)
    first = rand(r_in, c_in) if has_first else None
    last = rand(c_out, r_out) if has_last else None
    b = rand(c_out if has_last else r_out) if bias else None
    return x, first, core, last, b


def _op(kind: str, backend: str):
    if kind == "conv":
        return lambda x, f, c, l, b: tucker_conv2d(x, f, c, l, b, *CONV_ARGS, backend=backend)
    return lambda x, f, c, l, b: tucker_linear(x, f, c, l, b, backend=backend)


def _params(t):
    """The indices of the present tensors among (input, first, core, last, bias)."""
    return tuple(i for i, v in enumerate(t) if v is not None)


def _as_function_of(op, t, positions):
    def f(*args):
        full = list(t)
        for i, a in zip(positions, args):
            full[i] = a
        return op(*full)

    return f


def _assert_close(got, want) -> None:
    got_leaves, want_leaves = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def _both(kind: str, transform):
    """transform(op) for the fused and the reference op."""
    return transform(_op(kind, "fused")), transform(_op(kind, "reference"))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_grad_and_jacrev(kind: str, sides: str, bias: bool) -> None:
    t = _tensors(kind, sides, bias, seed=1)
    pos = _params(t)

    def loss_grad(op):
        f = _as_function_of(op, t, pos)
        return grad(lambda *a: f(*a).square().sum(), argnums=tuple(range(len(pos))))(*[t[i] for i in pos])

    _assert_close(*_both(kind, loss_grad))
    _assert_close(*_both(kind, lambda op: jacrev(_as_function_of(op, t, (2,)))(t[2])))


@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_jvp_and_jacfwd(kind: str, sides: str) -> None:
    t = _tensors(kind, sides, True, seed=2)
    pos = _params(t)
    gen = torch.Generator().manual_seed(3)
    tangents = tuple(torch.randn(t[i].shape, dtype=torch.float64, generator=gen) for i in pos)
    primals = tuple(t[i] for i in pos)
    _assert_close(*_both(kind, lambda op: jvp(_as_function_of(op, t, pos), primals, tangents)))
    _assert_close(*_both(kind, lambda op: jacfwd(_as_function_of(op, t, (2,)))(t[2])))


@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_forward_ad_dual_tensors(kind: str, sides: str) -> None:
    # torch.autograd.forward_ad outside torch.func: the same jvp rule.
    t = _tensors(kind, sides, True, seed=12)
    gen = torch.Generator().manual_seed(13)
    tangents = [torch.randn(v.shape, dtype=torch.float64, generator=gen) if v is not None else None for v in t]

    def tangent_out(backend):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(v, d) if v is not None else None for v, d in zip(t, tangents)]
            return fwAD.unpack_dual(_op(kind, backend)(*duals))

    fused, ref = tangent_out("fused"), tangent_out("reference")
    _assert_close((fused.primal, fused.tangent), (ref.primal, ref.tangent))


@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_per_sample_gradients(kind: str, sides: str) -> None:
    t = _tensors(kind, sides, True, seed=4, batch=3)
    x, pos = t[0], _params(t)[1:]
    weights = tuple(t[i] for i in pos)

    def per_sample(op):
        def loss(w, sample):
            return _as_function_of(op, t, (0, *pos))(sample.unsqueeze(0), *w).square().sum()

        return vmap(grad(loss), in_dims=(None, 0))(weights, x)

    fused, ref = _both(kind, per_sample)
    _assert_close(fused, ref)
    # And against a loop over the samples with ordinary autograd (the C++ kernels).
    for n in range(x.shape[0]):
        leaves = [w.clone().requires_grad_() for w in weights]
        _as_function_of(_op(kind, "fused"), t, (0, *pos))(x[n : n + 1], *leaves).square().sum().backward()
        for w, g in zip(leaves, fused):
            torch.testing.assert_close(g[n], w.grad, rtol=1e-10, atol=1e-10)


class _CountingOps:
    """Stands in for torch.ops.tucker_ops in _functorch.py and counts the op calls."""

    def __init__(self, ops) -> None:
        self.ops, self.calls = ops, 0

    def __getattr__(self, name):
        op = getattr(self.ops, name)

        def call(*args, **kwargs):
            self.calls += 1
            return op(*args, **kwargs)

        return call


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_vmap_over_inputs_folds_the_batch(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    t = _tensors(kind, "tucker2", True, seed=5, batch=4)
    op = _op(kind, "fused")
    want = op(*t)
    counting = _CountingOps(_functorch._OPS)
    monkeypatch.setattr(_functorch, "_OPS", counting)
    got = vmap(lambda xi: op(xi.unsqueeze(0), *t[1:]).squeeze(0))(t[0])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert counting.calls == 1, "only the input is batched: one op call for the whole batch"
    # A batched factor (an ensemble of cores): one call per sample, each with its own core.
    cores = torch.stack([t[2], 2 * t[2], -t[2]])
    counting.calls = 0
    got = vmap(lambda c: op(t[0], t[1], c, t[3], t[4]))(cores)
    assert counting.calls == 3
    for n in range(3):
        torch.testing.assert_close(got[n], op(t[0], t[1], cores[n], t[3], t[4]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sides", ["tucker2", "no_last"])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_second_derivatives(kind: str, sides: str) -> None:
    t = _tensors(kind, sides, True, seed=6, batch=1)

    def loss_of_core(op):
        return lambda c: _as_function_of(op, t, (2,))(c).square().sum()

    _assert_close(*_both(kind, lambda op: hessian(loss_of_core(op))(t[2])))  # forward over reverse
    _assert_close(*_both(kind, lambda op: jacrev(jacrev(loss_of_core(op)))(t[2])))
    # Mixed: d/d input of d loss / d core.
    mixed = lambda op: jacrev(lambda x: grad(loss_of_core(_with_input(op, x)))(t[2]))(t[0])  # noqa: E731
    _assert_close(*_both(kind, mixed))


def _with_input(op, x):
    return lambda _x, f, c, l, b: op(x, f, c, l, b)


def test_relu_pool_op_under_grad() -> None:
    t = _tensors("conv", "tucker2", True, seed=7)

    def loss(op_backend):
        def f(core):
            y = tucker_ops.tucker_conv2d_relu_pool(t[0], t[1], core, t[3], t[4], 1, 1, 1, 2, backend=op_backend)
            return y.square().sum()

        return grad(f)(t[2])

    _assert_close(loss("fused"), loss("reference"))


def _model(backend: str) -> torch.nn.Module:
    torch.manual_seed(0)
    conv = tucker_ops.TuckerConv2d(3, 6, 3, ranks=(2, 3), padding=1, dtype=torch.float64)
    pooled = tucker_ops.TuckerConv2dReLUPool(6, 5, 3, ranks=(3, 2), padding=1, pool=2, dtype=torch.float64)
    lin = tucker_ops.TuckerLinear(5 * 4 * 4, 7, ranks=(4, 3), dtype=torch.float64)
    for m in (conv, pooled, lin):
        m.backend = backend
    return torch.nn.Sequential(conv, torch.nn.ReLU(), pooled, torch.nn.Flatten(), lin)


def test_modules_through_functional_call() -> None:
    fused, ref = _model("fused"), _model("reference")
    params = {k: v.detach() for k, v in fused.named_parameters()}
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(8))

    def loss(model):
        return lambda p, xb: functional_call(model, p, (xb,)).square().sum()

    _assert_close(grad(loss(fused))(params, x), grad(loss(ref))(params, x))
    per_sample = lambda m: vmap(grad(lambda p, xi: loss(m)(p, xi.unsqueeze(0))), in_dims=(None, 0))(params, x)  # noqa: E731
    _assert_close(per_sample(fused), per_sample(ref))


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_autograd_outside_transforms_keeps_the_cpp_kernels(kind: str) -> None:
    # The Python Functions are for transforms only: ordinary autograd keeps the C++ node.
    t = [v.requires_grad_() if v is not None else None for v in _tensors(kind, "tucker2", True, seed=9)]
    y = _op(kind, "fused")(*t)
    assert "CppNode<tucker_ops::" in y.grad_fn.name()


def test_errors_under_transforms_are_the_ops_errors() -> None:
    x, first, core, last, b = _tensors("linear", "tucker2", True, seed=10)
    with pytest.raises(ValueError) as plain:
        tucker_linear(x, first[:, :-1], core, last, b)
    with pytest.raises(ValueError) as transformed:
        grad(lambda c: tucker_linear(x, first[:, :-1], c, last, b).sum())(core)
    assert str(transformed.value) == str(plain.value)
