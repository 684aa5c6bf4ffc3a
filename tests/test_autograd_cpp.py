"""The C++ autograd kernels of tucker_conv2d / tucker_linear (csrc/autograd.cpp).

Gradients for every subset of inputs that require grad (and every None factor)
against reference.py in float64, double backward, and that a plain forward +
backward runs no Python autograd code while create_graph=True does go through
the Python double-backward formula of the *_backward ops.
"""

from __future__ import annotations

import itertools
import sys

import pytest
import torch
from torch.testing import assert_close

from tucker_ops import reference

OPS = torch.ops.tucker_ops
F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}
NAMES = ("input", "first", "core", "last", "bias")
CONV_ARGS = ((2, 1), (1, 0), (1, 2))  # stride, padding, dilation


def _conv_tensors(has_first: bool, has_last: bool, has_bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, dtype=F64, generator=gen)

    r_in = 3 if has_first else 5
    return (
        randn(2, 5, 8, 7),
        randn(3, 5) if has_first else None,
        randn(4, r_in, 3, 2),
        randn(6, 4) if has_last else None,
        randn(6 if has_last else 4) if has_bias else None,
    )


def _linear_tensors(has_first: bool, has_last: bool, has_bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, dtype=F64, generator=gen)

    r_in = 3 if has_first else 7
    return (
        randn(2, 3, 7),
        randn(3, 7) if has_first else None,
        randn(4, r_in),
        randn(5, 4) if has_last else None,
        randn(5 if has_last else 4) if has_bias else None,
    )


def _fused(kind: str):
    if kind == "conv":
        return lambda x, f, c, l, b: OPS.tucker_conv2d(x, f, c, l, b, *CONV_ARGS)
    return OPS.tucker_linear


def _reference(kind: str):
    if kind == "conv":
        return lambda x, f, c, l, b: reference.tucker_conv2d(x, f, c, l, b, *CONV_ARGS)
    return reference.tucker_linear


def _tensors(kind: str, presence: tuple[bool, bool, bool], seed: int = 0):
    return (_conv_tensors if kind == "conv" else _linear_tensors)(*presence, seed=seed)


# Every (first, last, bias) presence, and for each every non-empty subset of the
# present arguments that require grad.
def _grad_cases():
    for kind in ("conv", "linear"):
        for presence in itertools.product((True, False), repeat=3):
            present = [0, 2] + [i for i, p in zip((1, 3, 4), presence) if p]
            for n in range(1, len(present) + 1):
                for wanted in itertools.combinations(sorted(present), n):
                    yield kind, presence, wanted


def _case_id(case) -> str:
    kind, (f, l, b), wanted = case
    absent = [name for name, p in zip(("first", "last", "bias"), (f, l, b)) if not p]
    return f"{kind}-grad_{'+'.join(NAMES[i] for i in wanted)}" + (f"-no_{'+'.join(absent)}" if absent else "")


GRAD_CASES = list(_grad_cases())


def test_autograd_kernel_is_registered_in_cpp() -> None:
    for op in ("tucker_ops::tucker_conv2d", "tucker_ops::tucker_linear"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "Autograd")
        autograd_lines = [line for line in torch._C._dispatch_dump(op).splitlines() if line.startswith("Autograd")]
        assert len(autograd_lines) == 1 and "autograd.cpp" in autograd_lines[0], autograd_lines


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_graph_node_is_a_cpp_node(kind: str) -> None:
    x, f, c, l, b = (t.requires_grad_() for t in _tensors(kind, (True, True, True)))
    y = _fused(kind)(x, f, c, l, b)
    assert not isinstance(y.grad_fn, torch.autograd.function.BackwardCFunction)
    assert y.grad_fn.name().endswith("Tucker" + ("Conv2d" if kind == "conv" else "Linear") + "Function>")
    # One edge per tensor argument that was given (None ones have none).
    assert len(y.grad_fn.next_functions) == 5


@pytest.mark.parametrize("case", GRAD_CASES, ids=_case_id)
def test_grads_of_a_subset_match_reference(case) -> None:
    kind, presence, wanted = case
    fused_args = list(_tensors(kind, presence))
    ref_args = [t.clone() if t is not None else None for t in fused_args]
    for i in wanted:
        fused_args[i].requires_grad_()
        ref_args[i].requires_grad_()
    y = _fused(kind)(*fused_args)
    y_ref = _reference(kind)(*ref_args)
    assert_close(y, y_ref, **TOL)
    g = torch.randn(y.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    y.backward(g)
    y_ref.backward(g)
    for i, (t, t_ref) in enumerate(zip(fused_args, ref_args)):
        if t is None:
            continue
        if i in wanted:
            assert_close(t.grad, t_ref.grad, **TOL, msg=lambda m: f"grad of {NAMES[i]}: {m}")
        else:
            assert t.grad is None, NAMES[i]


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize(
    "presence", [(True, True, True), (False, True, False), (True, False, True), (False, False, False)]
)
def test_double_backward_matches_reference(kind: str, presence: tuple[bool, bool, bool]) -> None:
    fused_args = [t.requires_grad_() if t is not None else None for t in _tensors(kind, presence, seed=2)]
    ref_args = [t.detach().clone().requires_grad_() if t is not None else None for t in fused_args]
    results = []
    for fn, args in ((_fused(kind), fused_args), (_reference(kind), ref_args)):
        leaves = [t for t in args if t is not None]
        y = fn(*args)
        g = torch.randn(y.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
        first_order = torch.autograd.grad(y, leaves, g, create_graph=True)
        # A scalar of every first-order gradient, so each one's graph is used.
        scalar = sum((t * t.detach().cos()).sum() for t in first_order)
        second = torch.autograd.grad(scalar, leaves, allow_unused=True, materialize_grads=True)
        results.append((first_order, second))
    (got1, got2), (want1, want2) = results
    for a, b in zip(got1, want1):
        assert_close(a, b, **TOL)
    for a, b in zip(got2, want2):
        assert_close(a, b, **TOL)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_gradgradcheck_with_partial_requires_grad(kind: str) -> None:
    x, f, c, l, b = _tensors(kind, (True, True, True), seed=4)
    x = x[:1, :, :4, :4].contiguous() if kind == "conv" else x[0]  # small: gradgradcheck is numerical
    fn = _fused(kind)
    # Only input and core vary; first/last/bias are constants.
    assert torch.autograd.gradgradcheck(lambda x, c: fn(x, f, c, l, b), (x.requires_grad_(), c.requires_grad_()))


def _python_calls(fn) -> set[str]:
    """Files of the Python functions called while fn runs (this thread)."""
    files: set[str] = set()

    def profile(frame, event, arg):
        if event == "call":
            files.add(frame.f_code.co_filename)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return files


def _autograd_python(files: set[str]) -> set[str]:
    # torch/_library/autograd.py runs register_autograd formulas; tucker_ops/_ops.py holds ours.
    return {f for f in files if f.endswith(("_library/autograd.py", "tucker_ops/_ops.py"))}


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_plain_training_step_runs_no_python_autograd(kind: str) -> None:
    args = [t.requires_grad_() for t in _tensors(kind, (True, True, True))]
    op = OPS.tucker_conv2d.default if kind == "conv" else OPS.tucker_linear.default
    extra = [list(a) for a in CONV_ARGS] if kind == "conv" else []

    def step():
        op(*args, *extra).sum().backward()

    step()  # warm up lazy imports
    assert _autograd_python(_python_calls(step)) == set()
    for t in args:
        assert t.grad is not None


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_create_graph_uses_the_double_backward_formula(kind: str) -> None:
    args = [t.requires_grad_() for t in _tensors(kind, (True, True, True))]
    y = _fused(kind)(*args)

    def grad_with_graph():
        torch.autograd.grad(y.sum(), args, create_graph=True)

    assert _autograd_python(_python_calls(grad_with_graph)), "the *_backward op's Python autograd was not used"


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_no_graph_under_no_grad_and_inference_mode(kind: str) -> None:
    args = [t.requires_grad_() if t is not None else None for t in _tensors(kind, (True, False, True))]
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            y = _fused(kind)(*args)
        assert y.grad_fn is None and not y.requires_grad
    # Nothing requires grad: no graph either.
    y = _fused(kind)(*[t.detach() if t is not None else None for t in args])
    assert y.grad_fn is None


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_saved_tensors_are_guarded(kind: str) -> None:
    args = [t.requires_grad_() for t in _tensors(kind, (True, True, True))]
    y = _fused(kind)(*args)
    y.sum().backward(retain_graph=True)
    first = [t.grad.clone() for t in args]
    for t in args:
        t.grad = None
    y.sum().backward()  # retain_graph=True kept the saved tensors
    for t, g in zip(args, first):
        assert_close(t.grad, g, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()
    # An in-place change to a saved input after the forward is caught.
    x = args[0].detach().clone().requires_grad_()
    core = args[2].detach().clone()
    y = _fused(kind)(x.mul(1.0), args[1].detach(), core.requires_grad_(), args[3].detach(), None)
    with torch.no_grad():
        core.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# Bad inputs that require grad raise exactly what the same call without grad raises
# (the checks run in the backend kernel, below the autograd kernel).
BAD_CALLS = {
    "conv_core_vs_first": ("conv", lambda a: (a[0], a[1], a[2][:, :2], a[3], a[4])),
    "conv_bias_len": ("conv", lambda a: (a[0], a[1], a[2], a[3], a[4][:3])),
    "conv_dtype_mix": ("conv", lambda a: (a[0], a[1].float(), a[2], a[3], a[4])),
    "linear_in_features": ("linear", lambda a: (a[0][..., :5], a[1], a[2], a[3], a[4])),
    "linear_last_vs_core": ("linear", lambda a: (a[0], a[1], a[2], a[3][:, :3], a[4])),
}


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_input_with_requires_grad_raises_the_same_error(name: str, device: str) -> None:
    kind, corrupt = BAD_CALLS[name]
    errors = []
    for requires_grad in (False, True):
        args = [t.to(device) if t is not None else None for t in _tensors(kind, (True, True, True))]
        if requires_grad:
            args = [t.requires_grad_() for t in args]
        with pytest.raises(Exception) as info:
            _fused(kind)(*corrupt(args))
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]
    assert errors[0][0] in (ValueError, TypeError), errors[0]
