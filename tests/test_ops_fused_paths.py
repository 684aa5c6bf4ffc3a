"""The fused CPU kernels' code paths against the reference chain.

Configurations are chosen to reach every path of csrc/cpu: whole-image and
banded tiles (batch 1 splits images into bands with halos), pixel blocks with
and without a vector-width tail, the direct 1x1 path, NCHW / channels_last /
strided input, Tucker-1 on either side, the few-rows, row-block and whole-batch
linear paths and every fold of the linear chain, each backward with the forward's
intermediates kept and recomputed (TUCKER_OPS_KEEP_INTERMEDIATES). The hand GEMM kernels
of each instruction set (and the BLAS path) run in subprocesses with TUCKER_OPS_GEMM /
TUCKER_OPS_ISA.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from tucker_ops import reference

ops = torch.ops.tucker_ops


def _factors(c_in, ri, ro, c_out, k, has_first, has_last, bias, dtype, gen):
    def rand(*shape):
        return torch.randn(*shape, dtype=dtype, generator=gen)

    first = rand(ri, c_in) if has_first else None
    core = rand(ro, ri if has_first else c_in, *k)
    last = rand(c_out, ro) if has_last else None
    b = rand(c_out if has_last else ro) if bias else None
    return first, core, last, b


def conv_output_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the conv ops promise for input x's output (and its gradient), as nn.Conv2d:
    channels_last where x is channels_last-contiguous and not contiguous, else contiguous
    (any other strides are read through a contiguous copy). Linear inputs: contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _check(fused_fn, ref_fn, inputs, dtype):
    tol = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-4}
    a = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    r = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    y, y_ref = fused_fn(*a), ref_fn(*r)
    torch.testing.assert_close(y, y_ref, **tol)
    assert y.is_contiguous(memory_format=conv_output_format(inputs[0]))
    gy = torch.randn_like(y_ref)
    y.backward(gy)
    y_ref.backward(gy)
    for name, t, t_ref in zip(("input", "first", "core", "last", "bias"), a, r):
        if t is not None:
            torch.testing.assert_close(t.grad, t_ref.grad, **tol, msg=lambda m: f"grad of {name}: {m}")


def _linear_inputs(case, dtype, seed):
    """Input and factors for a (rows, in, R_in, R_out, out, first, last) case. Unit-scale
    layers (weights / sqrt(fan-in)) keep float32 sums over hundreds of terms comparable under
    one absolute tolerance."""
    m, i, ri, ro, o, has_first, has_last = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, i, dtype=dtype, generator=gen)
    params = _factors(i, ri, ro, o, (), has_first, has_last, True, dtype, gen)
    params = (params[0], params[1].reshape(params[1].shape[:2]), params[2], params[3])
    return x, tuple(p / p.shape[-1] ** 0.5 if p is not None and p.dim() == 2 else p for p in params)


@contextlib.contextmanager
def _num_threads(n):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


CONV_CASES = [
    # (N, C_in, H, W, R_in, R_out, C_out, (kh, kw), stride, padding, dilation, first, last)
    (1, 5, 13, 11, 3, 4, 6, (3, 3), (1, 1), (1, 1), (1, 1), True, True),  # batch 1: banded tiles + halo
    (3, 4, 9, 40, 2, 3, 5, (3, 2), (2, 1), (1, 0), (1, 2), True, True),  # pixel tail, strides
    (2, 6, 8, 8, 3, 2, 7, (1, 1), (1, 1), (0, 0), (1, 1), True, True),  # direct 1x1 path
    (1, 6, 8, 8, 3, 2, 7, (1, 1), (2, 2), (0, 0), (1, 1), True, True),  # 1x1 with stride: im2col
    (2, 3, 10, 9, 3, 4, 4, (3, 3), (1, 2), (2, 1), (2, 1), False, True),  # Tucker-1 output side
    (2, 7, 10, 9, 3, 4, 4, (2, 3), (3, 1), (1, 1), (1, 1), True, False),  # Tucker-1 input side
    (1, 2, 30, 30, 2, 2, 3, (5, 5), (1, 1), (2, 2), (1, 1), False, True),  # thesis conv1-like, banded
    (1, 4, 40, 6, 2, 3, 2, (3, 1), (1, 1), (1, 0), (3, 1), True, True),  # tall image, dilation halo
    (4, 3, 7, 7, 3, 5, 4, (7, 7), (1, 1), (3, 3), (1, 1), False, False),  # neither side
    # whole-image tiles (batch >= 2 per thread) with first: each image's projection gradient
    # in thread scratch, its input and first gradients right after its tile
    (5, 5, 9, 8, 3, 4, 6, (3, 3), (1, 1), (1, 1), (1, 1), True, True),
    (6, 4, 11, 7, 2, 3, 5, (3, 2), (2, 1), (1, 0), (1, 2), True, False),
    # strides beyond the kernel's reach: input rows no output reads (zeros in a kept projection)
    (2, 4, 10, 9, 3, 3, 3, (1, 1), (3, 3), (1, 1), (1, 1), True, True),
    (1, 3, 21, 12, 2, 3, 4, (3, 2), (5, 3), (1, 0), (1, 1), True, True),
]


@pytest.fixture(params=["1", "0"], ids=["kept", "recomputed"])
def keep(request, monkeypatch):
    """The backward with the forward's intermediates kept, and with them recomputed."""
    monkeypatch.setenv("TUCKER_OPS_KEEP_INTERMEDIATES", request.param)
    return request.param


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_paths(case, dtype, layout, keep):
    n, c_in, h, w, ri, ro, c_out, k, stride, padding, dilation, has_first, has_last = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    x = torch.randn(n, c_in, h, w, dtype=dtype, generator=gen)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(n, c_in, h, 2 * w, dtype=dtype, generator=gen)[..., ::2]
    params = _factors(c_in, ri, ro, c_out, k, has_first, has_last, True, dtype, gen)
    _check(
        lambda *t: ops.tucker_conv2d(*t, stride, padding, dilation),
        lambda *t: reference.tucker_conv2d(*t, stride, padding, dilation),
        (x, *params),
        dtype,
    )


def test_conv_large_blocks_and_many_threads_agree():
    """A layer large enough for BLAS GEMMs and several pixel blocks; results agree across thread
    counts (to float32 rounding of the output's scale: on one thread the two images are the
    tasks and the core runs by Winograd F(4x4, 3x3), whose transforms cost a few times the
    direct sum's rounding; on two they are bands, direct)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, 30, 30, dtype=torch.float64, generator=gen)
    params = _factors(32, 16, 24, 40, (3, 3), True, True, True, torch.float64, gen)
    _check(
        lambda *t: ops.tucker_conv2d(*t, (1, 1), (1, 1), (1, 1)),
        lambda *t: reference.tucker_conv2d(*t, (1, 1), (1, 1), (1, 1)),
        (x, *params),
        torch.float64,
    )
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.tucker_conv2d(x.float(), *[p.float() for p in params], (1, 1), (1, 1), (1, 1))
        torch.set_num_threads(2)
        two = ops.tucker_conv2d(x.float(), *[p.float() for p in params], (1, 1), (1, 1), (1, 1))
        again = ops.tucker_conv2d(x.float(), *[p.float() for p in params], (1, 1), (1, 1), (1, 1))
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(one, two, rtol=0, atol=1e-5 * two.abs().max().item())
    assert torch.equal(two, again)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize(
    "n,has_first,k,stride",
    [(1, True, 3, 1), (1, False, 3, 1), (3, True, 5, 2), (2, False, 1, 1), (1, True, 3, 3)],
)
def test_conv_backward_small_batch_per_chunk_projection_gradients(n, has_first, k, stride, threads, keep):
    """Fewer images than two per thread: banded tiles with overlapping halos scatter into one
    projection gradient per chunk, summed in pass 2 (into the input gradient without first)."""
    gen = torch.Generator().manual_seed(n * 100 + k)
    x = torch.randn(n, 24, 33, 29, dtype=torch.float64, generator=gen)
    params = _factors(24, 12, 16, 20, (k, k), has_first, True, True, torch.float64, gen)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        _check(
            lambda *t: ops.tucker_conv2d(*t, (stride, stride), (k // 2, k // 2), (1, 1)),
            lambda *t: reference.tucker_conv2d(*t, (stride, stride), (k // 2, k // 2), (1, 1)),
            (x, *params),
            torch.float64,
        )
    finally:
        torch.set_num_threads(previous)


LINEAR_CASES = [
    # (rows, in, R_in, R_out, out, first, last) - rows < 16 take the few-rows path
    (1, 30, 4, 5, 20, True, True),
    (5, 30, 4, 5, 20, True, True),
    (300, 30, 4, 5, 20, True, True),  # row blocks, chain kept
    (300, 8, 6, 40, 7, True, True),  # many rows, big middle rank: folding first/last into core pays
    (1000, 12, 10, 9, 3, True, True),  # full fold
    (300, 20, 20, 20, 50, False, True),  # Tucker-1 output side, fold last
    (3, 20, 5, 6, 6, True, False),  # Tucker-1 input side
    (700, 33, 33, 17, 17, False, False),
    # weights (>= 2^18 elements) outweigh the rows: whole-batch BLAS stages, forward and backward
    (40, 600, 300, 200, 700, True, True),
    (4, 600, 300, 200, 700, True, True),  # few-rows forward, whole-batch backward
    (32, 700, 400, 500, 700, False, True),
    (32, 700, 500, 400, 600, True, False),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", LINEAR_CASES)
def test_linear_paths(case, dtype, keep):
    x, params = _linear_inputs(case, dtype, hash(case) % 2**31)
    _check(ops.tucker_linear, reference.tucker_linear, (x, *params), dtype)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    "case",
    [
        # (rows, in, R_in, R_out, out, first, last): weights of 2^18 elements or more outweigh
        # the rows, so every stage is one GEMM split over the threads; column counts that are
        # no multiple of the 16-element split unit, and stages split by rows or by columns.
        (33, 1201, 170, 70, 1003, True, True),
        (20, 300, 1100, 90, 1500, True, True),
        (17, 2000, 150, 140, 9, True, True),
        (24, 1300, 230, 250, 20, True, False),
        (24, 500, 600, 570, 1000, False, True),
        # float32 on AVX-512: the stages on transposed activations (the hand kernel's rule,
        # csrc/cpu/gemm.cpp nn_uses_blas), with inner dimensions over 2048
        (32, 4100, 300, 200, 2300, True, True),
        (16, 3000, 90, 70, 2500, True, True),
        (17, 2100, 300, 120, 40, True, False),
        # weight gradients of megabytes with rows aligned to the vector width: written with
        # streaming stores (csrc/cpu/gemm.h OutputStore) by every thread whose slice is
        # large enough (at 3 threads some slices of the last's gradient are not)
        (24, 4096, 256, 192, 4096, True, True),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_whole_batch_split_over_threads(case, threads, keep, dtype):
    """The whole-batch stages, forward and backward (kept and recomputed), split over 1-3
    threads, against the reference; and the result does not depend on the split."""
    x, params = _linear_inputs(case, dtype, sum(case))
    as_float = (x.float(), *[p.float() if p is not None else None for p in params])
    with _num_threads(threads):
        _check(ops.tucker_linear, reference.tucker_linear, (x, *params), dtype)
        split = ops.tucker_linear(*as_float)
    with _num_threads(1):
        single = ops.tucker_linear(*as_float)
    # Each output element is one single-threaded GEMM's in both runs; only the BLAS's
    # blocking of a narrower slice may reorder its sums.
    torch.testing.assert_close(split, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize(
    "case",
    [
        # (rows, in, R_in, R_out, out, first, last): cache-sized weights, enough work for a
        # chunk per thread and at most one row block (128 rows) per chunk: the two-phase
        # backward (row gradients row-parallel, then each weight gradient split by outputs).
        (32, 800, 40, 200, 120, True, True),  # thesis_l1 at batch 32
        (200, 300, 50, 60, 250, True, True),
        (45, 700, 90, 70, 130, True, False),
        (60, 300, 300, 200, 301, False, True),
        (37, 500, 33, 41, 17, True, True),
        (100, 400, 400, 300, 300, False, False),  # core only
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_two_phase_backward(case, threads, keep, dtype):
    """The backward for few rows per thread, kept and recomputed, at 2 and 3 threads, against
    the reference (every gradient, odd sizes: slices of uneven length)."""
    x, params = _linear_inputs(case, dtype, sum(case) + 7)
    with _num_threads(threads):
        _check(ops.tucker_linear, reference.tucker_linear, (x, *params), dtype)


_SUBPROCESS_CHECK = r"""
import torch
from tucker_ops import reference
from test_ops_fused_paths import _matches, conv_matches_reference
ops = torch.ops.tucker_ops
g = torch.Generator().manual_seed(0)
for dtype in (torch.float64, torch.float32):
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    x = torch.randn(2, 24, 17, 19, dtype=dtype, generator=g)
    f, c, l, b = (torch.randn(*s, dtype=dtype, generator=g) for s in ((12, 24), (16, 12, 3, 3), (40, 16), (40,)))
    conv_matches_reference((x, f, c, l, b), tol)
    xl = torch.randn(200, 70, dtype=dtype, generator=g)
    fl, cl, ll = (torch.randn(*s, dtype=dtype, generator=g) for s in ((20, 70), (30, 20), (50, 30)))
    torch.testing.assert_close(ops.tucker_linear(xl, fl, cl, ll, None), reference.tucker_linear(xl, fl, cl, ll, None), rtol=tol, atol=tol)
    # Weights outweighing the rows, gradients of 1-4 MB with aligned rows: streaming stores.
    gw = torch.Generator().manual_seed(1)
    xw = torch.randn(8, 4096, dtype=dtype, generator=gw)
    fw, cw, lw = (torch.randn(*s, dtype=dtype, generator=gw) for s in ((128, 4096), (96, 128), (4096, 96)))
    _matches(lambda *t: ops.tucker_linear(*t, None), lambda *t: reference.tucker_linear(*t, None), (xw, fw, cw, lw), tol)
print("ok")
"""


@pytest.mark.parametrize(
    "env",
    [
        {"TUCKER_OPS_GEMM": "kernel", "TUCKER_OPS_ISA": "avx512"},
        {"TUCKER_OPS_GEMM": "kernel", "TUCKER_OPS_ISA": "avx2"},
        {"TUCKER_OPS_GEMM": "kernel", "TUCKER_OPS_ISA": "baseline"},
        {"TUCKER_OPS_GEMM": "blas"},
    ],
    ids=["kernel-avx512", "kernel-avx2", "kernel-baseline", "blas"],
)
def test_gemm_variants(env):
    """Each GEMM implementation (an ISA the CPU lacks falls back to the best it has) gives the reference result."""
    run_check_in_subprocess(_SUBPROCESS_CHECK, env)


_PACKED_GEMM_CHECK = r"""
import torch
from test_ops_fused_paths import packed_gemm_cases_match
packed_gemm_cases_match()
print("ok")
"""


def packed_gemm_cases_match() -> None:
    """Linear and conv layers whose products take every branch of the hand kernel's packed
    form (gemm.cpp, gemm_packed; AVX2 and the baseline): K over one and several K blocks
    with a partial last one, N over one column block and past it, with an N % vector tail,
    M over one row block, panels of 7 and 8 leftover rows, A transposed (packed) and
    row-major (in place), B packed from rows (gemm_nn) and from B^T's rows (gemm_nt), and
    streamed weight gradients. Every output and gradient against the reference, float64 and
    float32, the tolerance scaled by the reference's magnitude (long sums)."""
    gen = torch.Generator().manual_seed(11)
    linear = [  # (rows, in, R_in, R_out, out)
        (150, 1100, 300, 70, 1030),  # weights dominate: whole-batch products, W X^T forward
        (304, 520, 130, 40, 1100),  # transposed A spanning MiBs in the weight gradients
        (37, 2100, 20, 24, 17),
        (61, 700, 400, 100, 300),  # rows-block paths
        (1, 1100, 300, 70, 1030),  # one row: K blocks of B against few rows, outer products
        (5, 700, 40, 30, 900),
    ]
    for dtype in (torch.float64, torch.float32):
        tol = 1e-9 if dtype == torch.float64 else 2e-5
        for rows, i, ri, ro, o in linear:
            shapes = ((rows, i), (ri, i), (ro, ri), (o, ro), (o,))
            tensors = [torch.randn(*s, dtype=dtype, generator=gen) for s in shapes]
            _matches(ops.tucker_linear, reference.tucker_linear, tensors, tol)
        shapes = ((2, 288, 20, 22), (48, 288), (40, 48, 3, 3), (272, 40), (272,))
        tensors = [torch.randn(*s, dtype=dtype, generator=gen) for s in shapes]
        conv = lambda mod: lambda *t: mod.tucker_conv2d(*t, (1, 1), (1, 1), (1, 1))  # noqa: E731
        _matches(conv(ops), conv(reference), tensors, tol)


def _matches(fn, ref_fn, tensors, tol: float) -> None:
    inputs = [t.detach().requires_grad_() for t in tensors]
    y, y_ref = fn(*inputs), ref_fn(*inputs)
    gy = torch.randn_like(y_ref)
    got = torch.autograd.grad(y, inputs, gy)
    want = torch.autograd.grad(y_ref, inputs, gy)
    for name, a, r in zip(("output", "input", "first", "core", "last", "bias"), (y, *got), (y_ref, *want)):
        scale = r.abs().max().item()
        torch.testing.assert_close(a, r, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def test_packed_gemm_paths():
    """The packed hand-kernel form, with the kernel and instruction set this CPU picks."""
    packed_gemm_cases_match()


@pytest.mark.parametrize(
    "env",
    [
        {"TUCKER_OPS_GEMM": "kernel", "TUCKER_OPS_ISA": "avx2"},
        {"TUCKER_OPS_GEMM": "kernel", "TUCKER_OPS_ISA": "baseline"},
    ],
    ids=["kernel-avx2", "kernel-baseline"],
)
def test_packed_gemm_paths_forced_kernel(env):
    """Every product on the hand kernel (gemm_nt's packed form included), per instruction set."""
    run_check_in_subprocess(_PACKED_GEMM_CHECK, env)


def conv_matches_reference(tensors, tol: float, padding=(1, 1)) -> None:
    """tucker_conv2d (stride and dilation 1) of `tensors` = (x, first, core, last, bias),
    forward and every gradient of its sum, equals the reference chain's to `tol`. For the
    child-process checks, which import it from this module."""
    inputs = [t.detach().requires_grad_() for t in tensors]
    y = ops.tucker_conv2d(*inputs, (1, 1), padding, (1, 1))
    grads = torch.autograd.grad(y.sum(), inputs)
    y_ref = reference.tucker_conv2d(*inputs, (1, 1), padding, (1, 1))
    grads_ref = torch.autograd.grad(y_ref.sum(), inputs)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=tol, atol=tol)


def run_check_in_subprocess(code: str, env: dict[str, str]) -> None:
    """Runs `code` (which prints "ok" when its checks pass) in a fresh interpreter with `env`
    added: the variables the extension reads once, at load time. tests/ is on its path, so
    it may import helpers from the test modules."""
    path = os.pathsep.join(filter(None, (os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH"))))
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": path, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_conv_float64_gradcheck_banded():
    """gradcheck on a batch-1 case that runs in bands with a halo (the two-pass input-gradient scatter)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 3, 9, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    f, c, l, b = (
        torch.randn(*s, dtype=torch.float64, generator=gen, requires_grad=True) for s in ((2, 3), (3, 2, 3, 3), (4, 3), (4,))
    )
    assert torch.autograd.gradcheck(lambda *t: ops.tucker_conv2d(*t, (1, 1), (1, 1), (1, 1)), (x, f, c, l, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_inf_in_input_lands_where_the_reference_puts_it(dtype) -> None:
    # Shapes for which the kernel would fold the factors (many rows, small ranks):
    # with an Inf in the input it must keep the reference's association instead.
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(256, 16, generator=gen, dtype=dtype)
    x[3, 2], x[10, 5], x[10, 6], x[200, 0] = float("inf"), float("inf"), float("-inf"), float("nan")
    first, core, last = (torch.randn(12, 16, generator=gen, dtype=dtype), torch.randn(12, 12, generator=gen, dtype=dtype),
                         torch.randn(16, 12, generator=gen, dtype=dtype))
    bias = torch.randn(16, generator=gen, dtype=dtype)
    got = torch.ops.tucker_ops.tucker_linear(x, first, core, last, bias)
    want = reference.tucker_linear(x, first, core, last, bias)
    for mask in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(mask(got), mask(want)), mask.__name__
    finite = torch.isfinite(want)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
    torch.testing.assert_close(got[finite], want[finite], **tol)
    # The finite input still takes the folded, cheaper path and agrees.
    x_finite = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    torch.testing.assert_close(torch.ops.tucker_ops.tucker_linear(x_finite, first, core, last, bias),
                               reference.tucker_linear(x_finite, first, core, last, bias), **tol)


@pytest.mark.parametrize("where", ["input", "core"])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_backward_nonfinite_lands_where_the_reference_puts_it(where, stride) -> None:
    """The implicit im2col multiplies discarded grid columns by zeros; an Inf there must not leak into gradients."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, generator=g)
    first, core, last, bias = _factors(3, 2, 3, 4, (3, 3), True, True, True, torch.float64, g)
    if where == "input":
        x[0, 1, 4, 7] = float("inf")  # last column: its window reaches the discarded columns
    else:
        core[1, 0, 2, 2] = float("-inf")
    args = ((stride, stride), (1, 1), (1, 1))
    gy = torch.randn(2, 4, *ops.tucker_conv2d(x, first, core, last, bias, *args).shape[2:], dtype=torch.float64, generator=g)
    got = ops.tucker_conv2d_backward(gy, x, first, core, last, *args, [True] * 5)
    ins = [t.clone().requires_grad_() for t in (x, first, core, last, bias)]
    reference.tucker_conv2d(*ins, *args).backward(gy)
    for name, a, t in zip(("input", "first", "core", "last", "bias"), got, ins):
        for mask in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(mask(a), mask(t.grad)), f"grad of {name}: {mask.__name__} differs"
        finite = torch.isfinite(t.grad)
        torch.testing.assert_close(a[finite], t.grad[finite], rtol=1e-9, atol=1e-9)


LAYOUT_CASES = [
    # (N, C_in, H, W, R_in, R_out, C_out, k, stride, first, last, dtype): every path that
    # reads gY or writes the input gradient
    (6, 5, 9, 8, 3, 4, 6, 3, 1, True, True, torch.float64),  # whole-image tiles, first
    (1, 5, 13, 11, 3, 4, 6, 3, 1, True, True, torch.float64),  # bands: per-chunk copies, pass 2
    (4, 3, 150, 30, 3, 4, 5, 3, 1, True, True, torch.float64),  # tall: tiles in two passes, pass 2
    (6, 4, 9, 8, 4, 4, 6, 3, 1, False, True, torch.float64),  # no first: the projection gradient is the input's
    (1, 4, 13, 11, 4, 4, 6, 3, 1, False, True, torch.float64),  # no first, bands
    (4, 16, 12, 12, 16, 16, 8, 3, 1, True, True, torch.float32),  # Winograd images
    (1, 16, 24, 12, 16, 16, 8, 3, 1, False, True, torch.float32),  # Winograd bands, no first
    (4, 24, 16, 16, 16, 32, 24, 3, 2, True, True, torch.float32),  # the pixel-major direct core
    (1, 24, 16, 16, 16, 32, 24, 3, 2, True, True, torch.float32),  # ... in bands
    (6, 4, 9, 8, 4, 5, 5, 3, 1, True, False, torch.float64),  # no last: gY is the core output's gradient
    (1, 16, 24, 12, 16, 16, 16, 3, 1, True, False, torch.float32),  # ... on Winograd bands
    (4, 24, 16, 16, 16, 32, 32, 3, 2, False, False, torch.float32),  # ... on the pixel-major core
    (3, 6, 8, 8, 3, 2, 7, 1, 1, True, True, torch.float64),  # pointwise core read in place
]


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("kept", [False, True], ids=["recomputed", "kept"])
@pytest.mark.parametrize("grad_layout", ["nchw", "channels_last", "expanded", "sliced", "permuted"])
@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_conv_backward_layouts(case, grad_layout, kept, threads):
    """Every gradient equals the reference's on every path, for NCHW and channels_last
    input and for grad_output NCHW, channels_last (a channels_last output's, which the
    kernels read in place), expanded (a sum's), or other strides (every other column of a
    wider tensor; an (H, N, W, C) tensor permuted), which the kernels gather per tile; the
    input gradient comes back in the input's layout (as nn.Conv2d returns it: autograd
    then copies nothing into the leaf's layout)."""
    n, c_in, h, w, ri, ro, c_out, k, stride, has_first, has_last, dtype = case
    gen = torch.Generator().manual_seed(13)
    params = _factors(c_in, ri, ro, c_out, (k, k), has_first, has_last, True, torch.float64, gen)
    params = tuple(p / p[0].numel() ** 0.5 if p is not None and p.dim() > 1 else p for p in params)
    x64 = torch.randn(n, c_in, h, w, dtype=torch.float64, generator=gen)
    args = ((stride, stride), (k // 2, k // 2), (1, 1))
    ref = [t.clone().requires_grad_() if t is not None else None for t in (x64, *params)]
    y_ref = reference.tucker_conv2d(*ref, *args)
    if grad_layout == "expanded":
        gy = torch.randn((), dtype=torch.float64, generator=gen).expand(y_ref.shape)
    else:
        gy = torch.randn(y_ref.shape, dtype=torch.float64, generator=gen)
    y_ref.backward(gy)
    tol = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-4}
    first, core, last, bias = (p.to(dtype) if p is not None else None for p in params)
    for x_fmt in (torch.channels_last, torch.contiguous_format):
        x = x64.to(dtype).contiguous(memory_format=x_fmt)
        g = gy.to(dtype)
        if grad_layout == "expanded":  # (a dtype conversion makes it dense)
            g = gy[0, 0, 0, 0].to(dtype).expand(gy.shape)
        elif grad_layout in ("nchw", "channels_last"):
            g = g.contiguous(memory_format=torch.channels_last if grad_layout == "channels_last" else torch.contiguous_format)
        elif grad_layout == "sliced":
            wide = torch.full((*g.shape[:3], 2 * g.shape[3]), float("nan"), dtype=dtype)
            wide[..., ::2] = g
            g = wide[..., ::2]
        elif grad_layout == "permuted":
            g = g.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2)
        assert grad_layout in ("nchw", "channels_last") or not g.is_contiguous(), g.stride()
        with _num_threads(threads):
            _, p, q = ops.tucker_conv2d_with_intermediates(x, first, core, last, bias, *args)
            saved = (p if kept and first is not None else None, q if kept and last is not None else None)
            mask = [True, first is not None, True, last is not None, True]
            grads = ops.tucker_conv2d_backward(g, x, first, core, last, *args, mask, *saved)
        assert grads[0].is_contiguous(memory_format=x_fmt), (x_fmt, grads[0].stride())
        for name, got, t in zip(("input", "first", "core", "last", "bias"), grads, ref):
            if t is not None:
                torch.testing.assert_close(got.double(), t.grad, **tol, msg=lambda m: f"{name} ({x_fmt}): {m}")


def test_conv_backward_opcheck_channels_last_without_first():
    """The fake kernel declares the channels_last input gradient the CPU kernel returns."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, generator=gen).contiguous(memory_format=torch.channels_last)
    _, core, last, _ = _factors(3, 3, 4, 5, (3, 3), False, True, False, torch.float64, gen)
    gy = torch.randn(2, 5, 7, 6, dtype=torch.float64, generator=gen)
    args = (gy, x, None, core, last, (1, 1), (1, 1), (1, 1), [True, False, True, True, False])
    torch.library.opcheck(ops.tucker_conv2d_backward.default, args)
    assert ops.tucker_conv2d_backward(*args)[0].is_contiguous(memory_format=torch.channels_last)


# Activations large enough that the float32 AVX-512 kernels copy rows of the input and
# of grad_output into thread scratch before multiplying them (csrc/cpu/conv_common.h,
# stages_activation_rows: >= 256 channels, >= 128 pixels a tile, tensor > 2 MiB): whole
# images (batch 12) and bands of one image (batch 1), Winograd and direct cores, a
# stride whose output tiles are too small to stage, and no last (grad_output not staged).
STAGED_CASES = [
    # (N, C_in, H, R_in, R_out, C_out, stride, last)
    (12, 256, 14, 64, 64, 256, 1, True),  # resnet50_3x3 at its ranks: both staged
    (1, 256, 48, 32, 48, 256, 1, True),  # bands of one image
    (12, 256, 14, 32, 64, 256, 2, True),  # 7 x 7 output: only the input staged
    (12, 256, 14, 64, 256, 0, 1, False),  # without last
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", STAGED_CASES)
def test_conv_staged_activation_rows(case, threads, keep):
    n, c_in, hw, ri, ro, c_out, stride, has_last = case
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(n, c_in, hw, hw, generator=gen)
    first = torch.randn(ri, c_in, generator=gen) / c_in**0.5
    core = torch.randn(ro, ri, 3, 3, generator=gen) / (9 * ri) ** 0.5
    last = torch.randn(c_out, ro, generator=gen) / ro**0.5 if has_last else None
    bias = torch.randn(c_out if has_last else ro, generator=gen)
    tensors = [x, first, core, last, bias]
    conv = ((stride, stride), (1, 1), (1, 1))
    inputs = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    with _num_threads(threads):
        y = ops.tucker_conv2d(*inputs, *conv)
        gy = torch.randn(y.shape, generator=gen)
        grads = torch.autograd.grad(y, [t for t in inputs if t is not None], gy)
    ref_inputs = [t.double().requires_grad_() if t is not None else None for t in tensors]
    y_ref = reference.tucker_conv2d(*ref_inputs, *conv)
    grads_ref = torch.autograd.grad(y_ref, [t for t in ref_inputs if t is not None], gy.double())
    # float32 against float64; the Winograd core gradient's error reaches about 1.2e-5 of
    # its largest value (benchmarks/winograd_accuracy.py).
    for name, a, r in zip(("output", "input", "first", "core", "last", "bias"), (y, *grads), (y_ref, *grads_ref)):
        scale = r.abs().max().item()
        torch.testing.assert_close(a.double(), r, rtol=0, atol=4e-5 * scale, msg=lambda m: f"{name}: {m}")
