"""The direct core's pixel-major backward (backward_rows_pixel_major in
csrc/cpu/tucker_conv2d_backward_cpu.cpp) against the reference.

Where the hand GEMM kernel is the measured-fast one (float32 with AVX-512, no
TUCKER_OPS_GEMM override), a core that does not run by Winograd (strided, dilated, not
3x3, or ranks below 16) and whose products over pixels the channel-major path would hand
to the BLAS takes its backward through a pixel-major, tap-major im2col: whole images as
the tasks (the projection gradient then goes straight to the input and first gradients),
bands of images for small batches (per-chunk copies of the projection gradient), or tiles
in two passes for tall images. Each case runs at 1-3 threads, NCHW and channels_last, with
the forward's intermediates kept and recomputed, against the reference in float64 (to
2e-5 of each tensor's largest value). Elsewhere (other instruction sets, float64) the same
cases run the channel-major path and must pass all the same.
"""

from __future__ import annotations

import pytest
import torch
from test_ops_fused_paths import _factors, _num_threads
from test_winograd import _check

from tucker_ops import reference

ops = torch.ops.tucker_ops

CASES = [
    # (N, C_in, H, W, R_in, R_out, C_out, (kh, kw), stride, padding, dilation, first, last)
    (4, 24, 30, 28, 16, 32, 40, (3, 3), (2, 2), (1, 1), (1, 1), True, True),  # the stride-2 downsample
    (1, 24, 29, 31, 16, 32, 40, (3, 3), (2, 2), (1, 1), (1, 1), True, True),  # batch 1: bands
    (3, 20, 25, 22, 12, 24, 30, (5, 5), (1, 1), (2, 2), (1, 1), True, True),  # 5x5
    (4, 16, 20, 21, 16, 16, 24, (3, 3), (1, 1), (2, 2), (2, 2), True, True),  # dilated
    (4, 16, 19, 20, 16, 24, 24, (3, 2), (2, 1), (1, 0), (1, 2), False, True),  # Tucker-1, output side
    (4, 24, 18, 18, 16, 24, 24, (3, 3), (2, 2), (1, 1), (1, 1), True, False),  # Tucker-1, input side
    (2, 16, 17, 18, 16, 24, 24, (3, 3), (2, 2), (1, 1), (1, 1), False, False),  # neither side
    (4, 16, 18, 18, 16, 24, 24, (1, 1), (2, 2), (0, 0), (1, 1), True, True),  # 1x1, strided
    (4, 16, 140, 66, 16, 24, 24, (3, 3), (2, 2), (1, 1), (1, 1), True, True),  # tall: several tiles per image
    (2, 16, 37, 30, 16, 16, 24, (3, 3), (3, 3), (0, 0), (1, 1), True, True),  # the last input row unread
]


def _inputs(case, layout, seed=0):
    n, c_in, h, w, ri, ro, c_out, k, stride, padding, dilation, has_first, has_last = case
    gen = torch.Generator().manual_seed(seed + hash(case) % 2**31)
    x = torch.randn(n, c_in, h, w, generator=gen)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    params = _factors(c_in, ri, ro, c_out, k, has_first, has_last, True, torch.float32, gen)
    # Unit-scale layers (weights / sqrt(fan-in)): float32 sums over hundreds of terms stay
    # comparable under _check's absolute tolerance.
    params = tuple(p / p[0].numel() ** 0.5 if p is not None and p.dim() > 1 else p for p in params)
    return x, params, stride, padding, dilation


@pytest.fixture(params=["1", "0"], ids=["kept", "recomputed"])
def keep(request, monkeypatch):
    monkeypatch.setenv("TUCKER_OPS_KEEP_INTERMEDIATES", request.param)
    return request.param


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, layout, threads, keep):
    x, params, stride, padding, dilation = _inputs(case, layout)
    with _num_threads(threads):
        _check(x, params, padding, torch.float32, stride, dilation)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize(
    "mask",
    [(1, 0, 0, 0, 0), (0, 1, 0, 0, 0), (0, 0, 1, 0, 0), (0, 0, 0, 1, 0), (0, 0, 0, 0, 1), (1, 0, 1, 0, 0)],
)
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[5]], ids=["tucker2", "no_first", "no_last"])
def test_backward_masks(case, mask, threads):
    """Each gradient asked for alone (the backward skips the others' work and buffers), with
    and without the kept intermediates, equals the one computed with all of them."""
    x, params, stride, padding, dilation = _inputs(case, "nchw")
    first, core, last, _ = params
    mask = [bool(m) for m in mask]
    with _num_threads(threads):
        y, p, q = ops.tucker_conv2d_with_intermediates(x, *params, stride, padding, dilation)
        gy = torch.randn_like(y)
        args = (gy, x, first, core, last, stride, padding, dilation)
        want = ops.tucker_conv2d_backward(*args, [True] * 5, None, None)
        kept = (p if first is not None else None, q if last is not None else None)
        for saved in ((None, None), kept):
            got = ops.tucker_conv2d_backward(*args, mask, *saved)
            for name, m, g, w in zip(("input", "first", "core", "last", "bias"), mask, got, want):
                if not m or w is None or w.numel() == 0:
                    continue
                atol = 1e-5 * w.abs().max().item()
                torch.testing.assert_close(g, w, rtol=1e-5, atol=atol, msg=lambda e: f"{name}: {e}")


hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed")
from hypothesis import given, strategies as st  # noqa: E402


@st.composite
def _calls(draw):
    """A random direct-core call with ranks large enough for the pixel-major backward (on
    hardware where it applies): any kernel, stride, dilation and padding, batch 0-5."""
    k = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = tuple(draw(st.integers(0, (ki - 1) * di + 1)) for ki, di in zip(k, dilation))
    reach = [(ki - 1) * di + 1 for ki, di in zip(k, dilation)]
    h = draw(st.integers(max(1, reach[0] - 2 * padding[0]), 24))
    w = draw(st.integers(max(1, reach[1] - 2 * padding[1]), 24))
    side = draw(st.sampled_from(("tucker2", "tucker2", "no_first", "no_last")))
    n, c_in, c_out = draw(st.integers(0, 5)), draw(st.integers(8, 24)), draw(st.integers(8, 24))
    r_in = c_in if side == "no_first" else draw(st.integers(8, 20))
    r_out = c_out if side == "no_last" else draw(st.integers(8, 24))
    case = (n, c_in, h, w, r_in, r_out, c_out, k, stride, padding, dilation, side != "no_first", side != "no_last")
    layout = draw(st.sampled_from(("nchw", "channels_last")))
    return case, layout, draw(st.integers(0, 1000)), draw(st.integers(1, 3))


@given(_calls())
def test_random_configurations(call):
    case, layout, seed, threads = call
    x, params, stride, padding, dilation = _inputs(case, layout, seed)
    with _num_threads(threads):
        _check(x, params, padding, torch.float32, stride, dilation)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("where", ["input", "core"])
def test_non_finite_lands_where_the_reference_puts_it(where, threads):
    """An Inf in the input or the core: every gradient is NaN / +Inf / -Inf exactly where the
    reference's is (a padded tap of the im2col is a true zero, as in the reference), and
    matches it elsewhere."""
    x, params, stride, padding, dilation = _inputs(CASES[0], "nchw")
    first, core, last, bias = (p.clone() if p is not None else None for p in params)
    if where == "input":
        x[1, 3, 0, 27] = float("inf")  # a corner pixel: some of its taps fall in the padding
    else:
        core[5, 2, 0, 0] = float("-inf")
    with _num_threads(threads):
        y = ops.tucker_conv2d(x, first, core, last, bias, stride, padding, dilation)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
        got = ops.tucker_conv2d_backward(gy, x, first, core, last, stride, padding, dilation, [True] * 5)
    ins = [t.double().requires_grad_() for t in (x, first, core, last, bias)]
    reference.tucker_conv2d(*ins, stride, padding, dilation).backward(gy.double())
    for name, a, t in zip(("input", "first", "core", "last", "bias"), got, ins):
        for mask in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(mask(a), mask(t.grad)), f"grad of {name}: {mask.__name__} differs"
        finite = torch.isfinite(t.grad)
        want = t.grad[finite]
        atol = 2e-5 * max(1.0, want.abs().max().item() if want.numel() else 0.0)
        torch.testing.assert_close(a[finite].double(), want, rtol=2e-4, atol=atol, msg=lambda m: f"{name}: {m}")
