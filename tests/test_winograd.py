"""The Winograd core of the CPU conv (csrc/cpu/winograd.h) against the reference.

A 3x3 stride-1 undilated core runs by Winograd, F(2x2, 3x3) or F(4x4, 3x3): the forward
per tile (bands of whole tile rows), the backward with whole images as the parallel tasks
(a batch of at least two images per thread) or, for smaller batches, bands of the images.
TUCKER_OPS_CONV_CORE=winograd2 / winograd4 force a tile size at any rank (auto needs 16
channels on both sides of the core and picks the tile with fewer multiply-adds), =direct
turns it off. Every case is checked with both
tiles, forward and backward (every gradient), with the forward's intermediates kept and
recomputed, against the reference run in float64 (to 1e-10 and 2e-5 of each tensor's
largest value in float64 and float32); then gradcheck and opcheck, the non-finite
fallback to the direct path, the automatic choices, bands, thread counts, the ReLU + pool
epilogue and every instruction set.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
from test_ops_fused_paths import _factors, _num_threads, conv_output_format, run_check_in_subprocess

from tucker_ops import reference
from tucker_ops._epilogue_op import tucker_conv2d_relu_pool

ops = torch.ops.tucker_ops
ONE = (1, 1)

CASES = [
    # (N, C_in, H, W, R_in, R_out, C_out, padding, first, last)
    (4, 6, 14, 14, 5, 7, 9, (1, 1), True, True),  # even output: whole tiles
    (5, 4, 9, 7, 3, 4, 6, (1, 1), True, True),  # odd output: a half tile on each edge
    (4, 5, 8, 11, 4, 3, 5, (0, 0), True, True),  # no padding
    (4, 3, 6, 5, 2, 3, 4, (2, 1), True, True),  # padding beyond the kernel's centre
    (4, 3, 3, 3, 2, 2, 3, (0, 0), True, True),  # a single output pixel... and one tile
    (6, 4, 10, 9, 4, 5, 6, (1, 1), False, True),  # Tucker-1, output side: the input is P
    (4, 7, 10, 9, 3, 4, 3, (1, 1), True, False),  # Tucker-1, input side: the output is Q
    (4, 3, 7, 8, 3, 5, 5, (1, 0), False, False),  # neither side
    (4, 20, 12, 12, 17, 19, 18, (1, 1), True, True),  # vector tails (17 and 19 channels)
    # fewer than two images per thread: forward and backward run Winograd per band of tile
    # rows (the last band of an image shorter)
    (1, 6, 23, 9, 5, 7, 4, (1, 1), True, True),
    (2, 5, 17, 12, 4, 6, 5, (2, 0), False, True),
    (1, 4, 30, 7, 6, 4, 3, (1, 1), True, False),
]


def _check(x, params, padding, dtype, stride=ONE, dilation=ONE):
    """Output and every gradient against the reference chain (run in float64). Tolerances
    scale with each tensor's largest value: F(4x4, 3x3)'s transforms (coefficients up to 8
    and 1/24) round a few times more than the direct sum, about 5e-6 of the largest
    gradient in float32 (the direct core: about 1e-6)."""
    fused = [t.clone().requires_grad_() if t is not None else None for t in (x, *params)]
    ref = [t.double().requires_grad_() if t is not None else None for t in (x, *params)]
    y = ops.tucker_conv2d(*fused, stride, padding, dilation)
    y_ref = reference.tucker_conv2d(*ref, stride, padding, dilation)
    assert y.is_contiguous(memory_format=conv_output_format(x)) and y.dtype == dtype
    gy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y.backward(gy.to(dtype))
    y_ref.backward(gy)
    scale = 1e-10 if dtype == torch.float64 else 2e-5
    for name, a, r in zip(("output", "input", "first", "core", "last", "bias"), [y, *fused], [y_ref, *ref]):
        if a is None:
            continue
        got, want = (a if name == "output" else a.grad).double(), (r if name == "output" else r.grad).detach()
        atol = scale * max(1.0, want.abs().max().item() if want.numel() else 0.0)
        torch.testing.assert_close(got, want, rtol=10 * scale, atol=atol, msg=lambda m: f"{name}: {m}")


@contextlib.contextmanager
def _core(algo: str, monkeypatch: pytest.MonkeyPatch):
    with monkeypatch.context() as m:
        m.setenv("TUCKER_OPS_CONV_CORE", algo)
        yield


@pytest.fixture(params=["winograd2", "winograd4"])
def tile(request):
    """The forced algorithm: F(2x2, 3x3) or F(4x4, 3x3)."""
    return request.param


@pytest.fixture(params=["1", "0"], ids=["kept", "recomputed"])
def keep(request, monkeypatch):
    monkeypatch.setenv("TUCKER_OPS_KEEP_INTERMEDIATES", request.param)
    return request.param


def _inputs(case, dtype, layout, seed=0, k=3):
    n, c_in, h, w, ri, ro, c_out, padding, has_first, has_last = case
    gen = torch.Generator().manual_seed(seed + hash(case) % 2**31)
    x = torch.randn(n, c_in, h, w, dtype=dtype, generator=gen)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    params = _factors(c_in, ri, ro, c_out, (k, k), has_first, has_last, True, dtype, gen)
    # Unit-scale layers (weights / sqrt(fan-in)): float32 sums over hundreds of terms stay
    # comparable under _check's absolute tolerance.
    params = tuple(p / p[0].numel() ** 0.5 if p is not None and p.dim() > 1 else p for p in params)
    return x, params, padding


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_winograd_matches_reference(case, dtype, layout, keep, monkeypatch, tile):
    x, params, padding = _inputs(case, dtype, layout)
    with _num_threads(2), _core(tile, monkeypatch):
        _check(x, params, padding, dtype)


CASES_5X5 = [
    # F(2x2, 5x5): (N, C_in, H, W, R_in, R_out, C_out, padding, first, last)
    (4, 6, 14, 14, 5, 7, 9, (2, 2), True, True),  # even output: whole tiles
    (5, 4, 9, 8, 3, 4, 6, (2, 2), True, True),  # odd output: a half tile on the edge
    (4, 5, 8, 11, 4, 3, 5, (0, 0), True, True),  # no padding
    (4, 3, 7, 6, 2, 3, 4, (4, 1), True, True),  # padding beyond the kernel's centre
    (4, 3, 5, 5, 2, 2, 3, (0, 0), True, True),  # a single output pixel
    (6, 4, 10, 9, 4, 5, 6, (2, 2), False, True),  # Tucker-1, output side
    (4, 7, 10, 9, 3, 4, 3, (2, 2), True, False),  # Tucker-1, input side
    (4, 20, 12, 12, 17, 19, 18, (2, 2), True, True),  # vector tails
    (1, 6, 23, 9, 5, 7, 4, (2, 2), True, True),  # bands (fewer than two images per thread)
    (2, 5, 17, 12, 4, 6, 5, (3, 0), False, True),
]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES_5X5)
def test_winograd_5x5_matches_reference(case, dtype, layout, keep, monkeypatch):
    """A 5x5 core by F(2x2, 5x5): output and every gradient against the reference."""
    x, params, padding = _inputs(case, dtype, layout, k=5)
    with _num_threads(2), _core("winograd2", monkeypatch):
        _check(x, params, padding, dtype)


@pytest.mark.parametrize(
    "ranks, forced, expect",
    [
        ((16, 24), "auto", "winograd2"),  # F(2x2, 5x5): 36 multiply-adds per 4 outputs against 100
        ((16, 24), "winograd4", "direct"),  # there is no F(4x4, 5x5)
        ((8, 24), "auto", "direct"),  # below 16 channels on a side of the core
    ],
)
def test_auto_choice_5x5(ranks, forced, expect, monkeypatch):
    """A 5x5 core's results are bit for bit those of the algorithm the rule picks (and differ
    from the other's)."""
    x, params, padding = _inputs((4, 32, 12, 12, *ranks, 32, (2, 2), True, True), torch.float32, "nchw", k=5)
    with _num_threads(2):
        results = {}
        for algo in (forced, "winograd2", "direct"):
            with _core(algo, monkeypatch):
                results[algo] = _run_all(x, params, padding)
    for algo in ("winograd2", "direct"):
        same = all(torch.equal(a, b) for a, b in zip(results[forced], results[algo]))
        assert same == (algo == expect), algo


@pytest.mark.parametrize("batch", [4, 1], ids=["images", "bands"])
def test_non_finite_5x5_takes_the_direct_path(batch, monkeypatch):
    """As for 3x3: the images (or bands) holding an Inf / NaN run the direct core."""
    x, params, padding = _inputs((batch, 16, 20, 12, 16, 16, 16, (2, 2), True, True), torch.float64, "nchw", k=5)
    x = x.clone()
    x[batch - 1, 2, 5, 6] = float("inf")
    x[0, 0, 0, 0] = float("nan")
    _against_direct(x, params, padding, (0, 1, 3, 3), "winograd2", monkeypatch)


def test_gradcheck_5x5(monkeypatch):
    x, params, padding = _inputs((3, 2, 6, 5, 2, 3, 3, (2, 2), True, True), torch.float64, "nchw", k=5)
    inputs = [t.requires_grad_() for t in (x, *params)]
    with _num_threads(2), _core("winograd2", monkeypatch):
        assert torch.autograd.gradcheck(lambda *t: ops.tucker_conv2d(*t, ONE, padding, ONE), inputs)


MASKS = [(1, 0, 0, 0, 0), (0, 1, 0, 0, 0), (0, 0, 1, 0, 0), (0, 0, 0, 1, 0), (0, 0, 0, 0, 1), (1, 1, 1, 1, 1)]


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("case", [CASES[1], CASES[5], CASES[6]], ids=["tucker2", "no_first", "no_last"])
def test_backward_masks(case, mask, monkeypatch, tile):
    """Each gradient asked for alone (the backward skips the others' work), with and
    without the kept intermediates, equals the direct path's."""
    x, params, padding = _inputs(case, torch.float64, "nchw")
    first, core, last, _ = params
    mask = [bool(m) for m in mask]
    with _num_threads(2):
        with _core("direct", monkeypatch):
            y, p, q = ops.tucker_conv2d_with_intermediates(x, *params, ONE, padding, ONE)
            gy = torch.randn_like(y)
            want = ops.tucker_conv2d_backward(gy, x, first, core, last, ONE, padding, ONE, [True] * 5, None, None)
        with _core(tile, monkeypatch):
            # (with_intermediates returns empty tensors where a side has no factor)
            kept_p, kept_q = p if first is not None else None, q if last is not None else None
            for kept in ((None, None), (kept_p, kept_q)):
                got = ops.tucker_conv2d_backward(gy, x, first, core, last, ONE, padding, ONE, mask, *kept)
                for name, m, g, w in zip(("input", "first", "core", "last", "bias"), mask, got, want):
                    if m and w is not None:
                        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda e: f"{name}: {e}")


def test_gradcheck(monkeypatch, tile):
    x, params, padding = _inputs((4, 2, 5, 4, 2, 3, 3, (1, 1), True, True), torch.float64, "nchw")
    inputs = [t.requires_grad_() for t in (x, *params)]
    with _num_threads(2), _core(tile, monkeypatch):
        assert torch.autograd.gradcheck(lambda *t: ops.tucker_conv2d(*t, ONE, padding, ONE), inputs)
        torch.library.opcheck(ops.tucker_conv2d.default, (*inputs, ONE, padding, ONE))


def _run_all(x, params, padding):
    """Output and every gradient, for a fixed output gradient."""
    inputs = [t.detach().clone().requires_grad_() for t in (x, *params)]
    y = ops.tucker_conv2d(*inputs, ONE, padding, ONE)
    y.backward(torch.ones_like(y).mul_(0.5).add_(torch.linspace(-1, 1, y.numel()).view_as(y)))
    return [y.detach()] + [t.grad for t in inputs]


@pytest.mark.parametrize(
    "ranks, size, expect",
    [
        ((64, 64), 16, "winograd4"),  # 16 x 16 outputs: 16 tiles x 36 against 64 x 16 multiply-adds
        ((64, 64), 8, "winograd2"),  # 8 x 8: fewer multiply-adds with F(4x4), but only 4 tiles
        ((16, 24), 6, "winograd2"),  # 6 x 6: 9 x 16 against 4 x 36, a tie: the smaller tile
        ((16, 24), 2, "winograd2"),
        ((8, 64), 8, "direct"),  # below 16 channels on a side of the core
        ((64, 12), 8, "direct"),
    ],
)
def test_auto_choice(ranks, size, expect, monkeypatch):
    """auto's float32 results are bit for bit those of the forced algorithm it picks (and
    differ from every other's)."""
    x, params, padding = _inputs((4, 32, size, size, *ranks, 32, (1, 1), True, True), torch.float32, "nchw")
    with _num_threads(2):
        results = {}
        for algo in ("auto", "winograd2", "winograd4", "direct"):
            with _core(algo, monkeypatch):
                results[algo] = _run_all(x, params, padding)
    for algo in ("winograd2", "winograd4", "direct"):
        same = all(torch.equal(a, b) for a, b in zip(results["auto"], results[algo]))
        assert same == (algo == expect), algo


@pytest.mark.parametrize("height, expect", [(14, "direct"), (30, "winograd2"), (64, "winograd4")])
def test_auto_forward_bands(height, expect, monkeypatch):
    """At batch 1 the forward's tiles are bands of an image: auto runs Winograd only on bands
    of at least four tile rows, F(2x2)'s where F(4x4)'s are thinner (two threads: four bands
    of 4 rows on 14 rows, of 8 on 30, of 16 on 64)."""
    x, params, padding = _inputs((1, 32, height, 16, 32, 32, 32, (1, 1), True, True), torch.float32, "nchw")
    with _num_threads(2), torch.no_grad():
        results = {}
        for algo in ("auto", "winograd4", "winograd2", "direct"):
            with _core(algo, monkeypatch):
                results[algo] = ops.tucker_conv2d(x, *params, ONE, padding, ONE)
    for algo in ("winograd4", "winograd2", "direct"):
        assert torch.equal(results["auto"], results[algo]) == (algo == expect), algo


def _assert_backward_is_direct(x, params, padding, gy, tile, monkeypatch):
    """The backward op (every gradient, nothing kept) forced to `tile` gives exactly the
    direct core's results: it did not run Winograd."""
    first, core, last, _ = params
    results = {}
    with _num_threads(2):
        for algo in (tile, "direct"):
            with _core(algo, monkeypatch):
                results[algo] = ops.tucker_conv2d_backward(
                    gy, x, first, core, last, ONE, padding, ONE, [True] * 5, None, None
                )
    assert all(torch.equal(a, b) for a, b in zip(results[tile], results["direct"]))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(
    "batch, threads", [(1, 2), (1, 3), (2, 3), (3, 2)], ids=["1x2", "1x3", "2x3", "3x2"]
)
def test_backward_in_bands(batch, threads, layout, keep, monkeypatch, tile):
    """Fewer images than two per thread: the backward runs Winograd on bands of the images
    (lcm(batch, threads) tasks; each band's projection gradient, halo rows included, added
    into its chunk's copy and the copies summed), against the reference in float64; in
    float32 its results are not the direct core's (Winograd ran). The layer has the work
    for a chunk per thread (csrc/cpu/parallel_chunks.h), else one chunk runs whole images."""
    case = (batch, 16, 26, 20, 16, 16, 16, (1, 1), True, True)
    x, params, padding = _inputs(case, torch.float64, layout)
    with _num_threads(threads), _core(tile, monkeypatch):
        _check(x, params, padding, torch.float64)
    x, params, padding = _inputs(case, torch.float32, layout)
    with _num_threads(threads):
        results = {}
        for algo in (tile, "direct"):
            with _core(algo, monkeypatch):
                results[algo] = _run_all(x, params, padding)
    for name, a, b in zip(("input", "first", "core", "last", "bias"), results[tile][1:], results["direct"][1:]):
        assert name == "bias" or not torch.equal(a, b), name


@pytest.mark.parametrize("height, expect", [(34, "winograd4"), (14, "winograd2"), (6, "direct")])
def test_auto_backward_bands(height, expect, monkeypatch):
    """At batch 1 auto runs the backward's bands by Winograd only when they are at least four
    tile rows high, F(4x4) where its bands are (two threads: two bands of 5 tile rows on 34
    rows), else F(2x2) where its bands are (of 2 F(4x4) rows on 14, but of 4 F(2x2) rows),
    else the direct core (6 rows: bands of 1 F(4x4) or 2 F(2x2) rows)."""
    x, params, padding = _inputs((1, 32, height, 16, 32, 32, 32, (1, 1), True, True), torch.float32, "nchw")
    first, core, last, _ = params
    gy = torch.randn(1, 32, height, 16, generator=torch.Generator().manual_seed(3))
    with _num_threads(2):
        results = {}
        for algo in ("auto", "winograd4", "winograd2", "direct"):
            with _core(algo, monkeypatch):
                results[algo] = ops.tucker_conv2d_backward(
                    gy, x, first, core, last, ONE, padding, ONE, [True] * 5, None, None
                )
    for algo in ("winograd4", "winograd2", "direct"):
        same = all(torch.equal(a, b) for a, b in zip(results["auto"], results[algo]))
        assert same == (algo == expect), algo


def _against_direct(x, params, padding, inf_at, algo, monkeypatch):
    """Output and every gradient with the core `algo` (2 threads; an Inf in the output
    gradient at `inf_at`) equal the direct core's, NaN and Inf included; returns them."""
    inputs = [t.detach() for t in (x, *params)]
    results = {}
    with _num_threads(2):
        for core in (algo, "direct"):
            with _core(core, monkeypatch):
                ts = [t.clone().requires_grad_() for t in inputs]
                y = ops.tucker_conv2d(*ts, ONE, padding, ONE)
                gy = torch.ones_like(y)
                gy[inf_at] = float("inf")
                y.backward(gy)
                results[core] = [y.detach()] + [t.grad for t in ts]
    for a, b in zip(results[algo], results["direct"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, equal_nan=True)
    return results[algo]


def test_non_finite_bands_take_the_direct_path(monkeypatch, tile):
    """At batch 1 (bands): the band holding an Inf input pixel, and the one whose output
    gradient holds an Inf, run the direct core; every result, NaN and Inf included, is the
    direct path's."""
    x, params, padding = _inputs((1, 16, 40, 12, 16, 16, 16, (1, 1), True, True), torch.float64, "nchw")
    x = x.clone()
    x[0, 2, 3, 6] = float("inf")
    results = _against_direct(x, params, padding, (0, 1, 30, 3), tile, monkeypatch)
    assert not torch.isfinite(results[1]).all()


@pytest.mark.parametrize(
    "case",
    [CASES[0], (4, 8, 40, 36, 24, 24, 8, (1, 1), True, True)],
    ids=["one_tile_per_image", "direct_path_in_bands"],
)
def test_non_finite_images_take_the_direct_path(case, monkeypatch, tile):
    """An Inf in an input image (or in the output gradient of an image) would turn into NaN
    through the input transform's differences; those images run the direct core (all of
    the image's tiles, where the direct path splits it into bands), so every result, NaN
    and Inf included, is the direct path's."""
    x, params, padding = _inputs(case, torch.float64, "nchw")
    x = x.clone()
    x[1, 2, 5, 6] = float("inf")
    x[3, 0, 0, 0] = float("nan")
    y = _against_direct(x, params, padding, (2, 1, 3, 3), "winograd", monkeypatch)[0]
    assert torch.isfinite(y[0]).all() and not torch.isfinite(y[1]).all() and not torch.isfinite(y[3]).all()


def test_large_images_keep_the_direct_core_in_the_backward(monkeypatch, tile):
    """Above 2^19 elements of an image's pixel-major buffers (here 128 x 128 pixels x 33
    channels: R_in + R_out) the backward's core stays direct, forced or not (the forward
    runs per band and has no such limit)."""
    x, params, padding = _inputs((4, 4, 128, 128, 16, 17, 4, (1, 1), True, True), torch.float32, "nchw")
    _assert_backward_is_direct(x, params, padding, torch.ones(4, 4, 128, 128), tile, monkeypatch)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree(threads, monkeypatch, tile):
    x, params, padding = _inputs((6, 5, 9, 10, 4, 6, 5, (1, 1), True, True), torch.float64, "nchw")
    with _core(tile, monkeypatch):
        with _num_threads(threads):
            got = _run_all(x, params, padding)
        with _core("direct", monkeypatch), _num_threads(1):
            want = _run_all(x, params, padding)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bands(layout, keep, monkeypatch, tile):
    """Images large enough that each runs in several bands of tile rows (in float64, about
    512 KiB of transformed data per band), the last one shorter."""
    x, params, padding = _inputs((4, 16, 38, 21, 40, 30, 12, (1, 1), True, True), torch.float64, layout)
    with _num_threads(2), _core(tile, monkeypatch):
        _check(x, params, padding, torch.float64)


@pytest.mark.parametrize("batch", [4, 1], ids=["images", "bands"])
@pytest.mark.parametrize("pool", [1, 2, 3])
def test_relu_pool_epilogue(pool, batch, monkeypatch, tile):
    """Tiles a whole number of both pooling windows and Winograd tiles high (with 3 and 4:
    12), rows the floor mode drops never computed."""
    x, params, padding = _inputs((batch, 6, 27, 10, 5, 4, 7, (1, 1), True, True), torch.float64, "nchw")
    with _num_threads(2), _core(tile, monkeypatch):
        fused = [t.detach().clone().requires_grad_() for t in (x, *params)]
        ref = [t.detach().clone().requires_grad_() for t in (x, *params)]
        y = tucker_conv2d_relu_pool(*fused, ONE, padding, ONE, pool)
        y_ref = tucker_conv2d_relu_pool(*ref, ONE, padding, ONE, pool, backend="reference")
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
        y.backward(torch.ones_like(y))
        y_ref.backward(torch.ones_like(y_ref))
        for a, b in zip(fused, ref):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9)


def test_bad_environment_value(monkeypatch):
    x, params, padding = _inputs(CASES[0], torch.float32, "nchw")
    with _core("fast", monkeypatch), pytest.raises(RuntimeError, match="TUCKER_OPS_CONV_CORE must be 'auto', 'direct'"):
        ops.tucker_conv2d(x, *params, ONE, padding, ONE)


_ISA_CHECK = """
import torch
from test_ops_fused_paths import conv_matches_reference
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
for algo, k in (("winograd2", 3), ("winograd4", 3), ("winograd2", 5)):
    import os; os.environ["TUCKER_OPS_CONV_CORE"] = algo
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 2e-4)):
        # 19 and 21 channels: whole vectors and a tail for every ISA's width
        x = torch.randn(4, 7, 11, 10, dtype=dtype, generator=g, requires_grad=True)
        f, c, l, b = (
            (torch.randn(*s, dtype=dtype, generator=g) / (s[1] * (k * k if len(s) > 2 else 1)) ** 0.5).requires_grad_()
            for s in ((19, 7), (21, 19, k, k), (6, 21), (6, 1))
        )
        conv_matches_reference((x, f, c, l, b.view(6)), tol, padding=(k // 2, k // 2))
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_every_instruction_set(isa):
    """The transforms (and transposes) compiled for each ISA (one the CPU lacks falls back to
    the best it has), every algorithm, with channel counts that leave vector tails."""
    run_check_in_subprocess(_ISA_CHECK, {"TUCKER_OPS_ISA": isa, "TUCKER_OPS_GEMM": "kernel"})


hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed")
from hypothesis import given, strategies as st  # noqa: E402


@st.composite
def _winograd_calls(draw):
    """A random 3x3 or 5x5 stride-1 conv call the Winograd core applies to (forward in tiles
    at any batch; backward in images from two per thread, else in bands), with its tile size
    and thread count."""
    k = draw(st.sampled_from((3, 3, 5)))
    pad = (draw(st.integers(0, k)), draw(st.integers(0, k)))
    h = draw(st.integers(max(1, k - 2 * pad[0]), 17))
    w = draw(st.integers(max(1, k - 2 * pad[1]), 17))
    side = draw(st.sampled_from(("tucker2", "tucker2", "no_first", "no_last", "core_only")))
    n, c_in = draw(st.integers(0, 7)), draw(st.integers(1, 20))
    r_in = c_in if side in ("no_first", "core_only") else draw(st.integers(1, 20))
    r_out = draw(st.integers(1, 20))
    c_out = r_out if side in ("no_last", "core_only") else draw(st.integers(1, 20))
    dtype = draw(st.sampled_from((torch.float32, torch.float64)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def randn(*shape):
        fan_in = shape[-1] if len(shape) > 1 else 1
        return (torch.randn(*shape, dtype=torch.float64, generator=gen) / fan_in**0.5).to(dtype)

    x = randn(n, c_in, h, w)
    if draw(st.booleans()):
        x = x.contiguous(memory_format=torch.channels_last)
    params = (
        randn(r_in, c_in) if side in ("tucker2", "no_last") else None,
        randn(r_out, r_in, k, k),
        randn(c_out, r_out) if side in ("tucker2", "no_first") else None,
        randn(c_out) if draw(st.booleans()) else None,
    )
    nonfinite = draw(st.lists(st.sampled_from((float("nan"), float("inf"), float("-inf"))), max_size=2))
    positions = [draw(st.integers(0, max(0, x.numel() - 1))) for _ in nonfinite]
    tile = draw(st.sampled_from(("winograd2", "winograd4", "auto")))
    threads = draw(st.integers(1, 3))
    return x, params, pad, tile, threads, list(zip(positions, nonfinite))


@given(_winograd_calls())
def test_random_configurations(call):
    """Forward and every gradient against the reference (finite inputs); with NaN / Inf
    injected into the input, outputs non-finite exactly where the reference's are."""
    x, params, pad, tile, threads, injected = call
    previous = os.environ.get("TUCKER_OPS_CONV_CORE")
    os.environ["TUCKER_OPS_CONV_CORE"] = tile
    try:
        with _num_threads(threads):
            if not injected or x.numel() == 0:
                _check(x, params, pad, x.dtype)
                return
            x = x.clone()
            flat = x.view(-1) if x.is_contiguous() else x.permute(0, 2, 3, 1).reshape(-1)
            for position, value in injected:
                flat[position] = value
            if not x.is_contiguous():
                x = flat.view(x.shape[0], x.shape[2], x.shape[3], x.shape[1]).permute(0, 3, 1, 2)
            with torch.no_grad():
                y = ops.tucker_conv2d(x, *params, ONE, pad, ONE)
                wide = [p.double() if p is not None else None for p in params]
                y_ref = reference.tucker_conv2d(x.double(), *wide, ONE, pad, ONE)
            for mask in (torch.isnan, torch.isposinf, torch.isneginf):
                assert torch.equal(mask(y), mask(y_ref)), mask.__name__
    finally:
        if previous is None:
            os.environ.pop("TUCKER_OPS_CONV_CORE", None)
        else:
            os.environ["TUCKER_OPS_CONV_CORE"] = previous
