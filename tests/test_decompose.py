"""Tucker decomposition of Conv2d / Linear weights (tucker_ops.decompose)."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("tensorly")

from tucker_ops import reference  # noqa: E402
from tucker_ops.decompose import (  # noqa: E402
    TuckerFactors,
    decompose_conv2d,
    decompose_linear,
    reconstruct_conv2d,
    reconstruct_linear,
)

C_OUT, C_IN, K = 12, 8, 3
OUT, IN = 10, 14


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.fixture
def conv_weight() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(C_OUT, C_IN, K, K, generator=g)


@pytest.fixture
def linear_weight() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(OUT, IN, generator=g)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("ranks", [(C_IN, C_OUT), (None, C_OUT), (C_IN, None)])
def test_conv_full_rank_reproduces_dense_layer(conv_weight, ranks):
    f = decompose_conv2d(conv_weight, ranks)
    assert f.relative_error < 1e-6
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, C_IN, 11, 9, generator=g)
    bias = torch.randn(C_OUT, generator=g)
    conv_args = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    got = reference.tucker_conv2d(x, f.first, f.core, f.last, bias, **conv_args)
    want = F.conv2d(x, conv_weight, bias, **conv_args)
    assert got.shape == want.shape
    assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("ranks", [(IN, OUT), (None, OUT), (IN, None), (OUT, OUT)])
def test_linear_full_rank_reproduces_dense_layer(linear_weight, ranks):
    # (OUT, OUT): r_in = 10 < in = 14 is still exact, since rank(W) <= 10.
    f = decompose_linear(linear_weight, ranks)
    assert f.relative_error < 1e-6
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, IN, generator=g)
    bias = torch.randn(OUT, generator=g)
    got = reference.tucker_linear(x, f.first, f.core, f.last, bias)
    want = F.linear(x, linear_weight, bias)
    assert _rel(got, want) < 1e-5


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize(
    "ranks, first, core, last",
    [
        ((3, 5), (3, C_IN), (5, 3, K, K), (C_OUT, 5)),
        ((None, 5), None, (5, C_IN, K, K), (C_OUT, 5)),
        ((3, None), (3, C_IN), (C_OUT, 3, K, K), None),
    ],
)
def test_conv_factor_layout(conv_weight, ranks, first, core, last):
    f = decompose_conv2d(conv_weight, ranks)
    assert isinstance(f, TuckerFactors)
    assert (None if f.first is None else tuple(f.first.shape)) == first
    assert tuple(f.core.shape) == core
    assert (None if f.last is None else tuple(f.last.shape)) == last
    assert f.ranks == ranks
    for t in (f.first, f.core, f.last):
        if t is not None:
            assert t.dtype == conv_weight.dtype and t.device == conv_weight.device
            assert t.is_contiguous()
    # Projections are orthonormal (HOOI factors), so the chain is well conditioned.
    if f.first is not None:
        torch.testing.assert_close(f.first @ f.first.T, torch.eye(ranks[0]), atol=1e-5, rtol=0)
    if f.last is not None:
        torch.testing.assert_close(f.last.T @ f.last, torch.eye(ranks[1]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "ranks, first, core, last",
    [
        ((4, 6), (4, IN), (6, 4), (OUT, 6)),
        ((None, 6), None, (6, IN), (OUT, 6)),
        ((4, None), (4, IN), (OUT, 4), None),
    ],
)
def test_linear_factor_layout(linear_weight, ranks, first, core, last):
    f = decompose_linear(linear_weight, ranks)
    assert (None if f.first is None else tuple(f.first.shape)) == first
    assert tuple(f.core.shape) == core
    assert (None if f.last is None else tuple(f.last.shape)) == last
    assert f.ranks == ranks


@pytest.mark.parametrize("ranks", [(3, 5), (None, 4), (2, None)])
def test_relative_error_matches_reconstruction(conv_weight, linear_weight, ranks):
    f = decompose_conv2d(conv_weight, ranks)
    w = reconstruct_conv2d(f.first, f.core, f.last)
    assert f.relative_error == pytest.approx(_rel(w, conv_weight), rel=1e-5)
    assert 0.0 < f.relative_error < 1.0
    f = decompose_linear(linear_weight, ranks)
    w = reconstruct_linear(f.first, f.core, f.last)
    assert f.relative_error == pytest.approx(_rel(w, linear_weight), rel=1e-5)


def test_low_rank_weight_is_recovered_exactly():
    # A weight of multilinear rank (4 out, 3 in) is exact at those ranks.
    g = torch.Generator().manual_seed(4)
    core = torch.randn(4, 3, K, K, generator=g, dtype=torch.float64)
    w = torch.einsum("abhw,oa,ib->oihw", core, torch.randn(C_OUT, 4, generator=g, dtype=torch.float64),
                     torch.randn(C_IN, 3, generator=g, dtype=torch.float64))
    assert decompose_conv2d(w, (3, 4)).relative_error < 1e-10
    assert decompose_conv2d(w, (2, 4)).relative_error > 1e-3


# --------------------------------------------------------------------------- monotone error


def _errors(fn, weight, ranks_list):
    return [fn(weight, r).relative_error for r in ranks_list]


@pytest.mark.parametrize(
    "ranks_list",
    [
        [(r, r) for r in range(1, C_IN + 1)] + [(C_IN, r) for r in range(C_IN + 1, C_OUT + 1)],
        [(None, r) for r in range(1, C_OUT + 1)],
        [(r, None) for r in range(1, C_IN + 1)],
    ],
)
def test_conv_error_falls_with_rank(conv_weight, ranks_list):
    errs = _errors(decompose_conv2d, conv_weight, ranks_list)
    assert all(b <= a + 1e-9 for a, b in zip(errs, errs[1:])), errs
    assert errs[0] > 0.5 and errs[-1] < 1e-6


@pytest.mark.parametrize(
    "ranks_list",
    [[(r, r) for r in range(1, OUT + 1)], [(None, r) for r in range(1, OUT + 1)],
     [(r, None) for r in range(1, OUT + 1)]],
)
def test_linear_error_falls_with_rank(linear_weight, ranks_list):
    errs = _errors(decompose_linear, linear_weight, ranks_list)
    assert all(b <= a + 1e-9 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-6


def test_linear_rank_r_error_is_the_svd_optimum(linear_weight):
    # For a matrix, Tucker at rank r is the truncated SVD (Eckart-Young).
    s = torch.linalg.svdvals(linear_weight.double())
    for r in (1, 3, 6):
        optimum = float(s[r:].norm() / s.norm())
        for ranks in ((r, r), (None, r), (r, None)):
            assert decompose_linear(linear_weight, ranks).relative_error == pytest.approx(optimum, rel=1e-4)


# --------------------------------------------------------------------------- zero padding


def test_linear_rank_above_mode_size_pads_with_zeros_and_warns():
    # The thesis's l1: Linear(800, 120) with ranks (40, 200).
    g = torch.Generator().manual_seed(5)
    w = torch.randn(120, 800, generator=g)
    with pytest.warns(UserWarning, match=r"r_out=200.*output mode size 120"):
        f = decompose_linear(w, (40, 200))
    assert tuple(f.first.shape) == (40, 800)
    assert tuple(f.core.shape) == (200, 40)
    assert tuple(f.last.shape) == (120, 200)
    assert torch.count_nonzero(f.last[:, 120:]) == 0
    assert torch.count_nonzero(f.core[120:]) == 0
    unpadded = decompose_linear(w, (40, 120))
    assert f.relative_error == pytest.approx(unpadded.relative_error, rel=1e-6)
    x = torch.randn(7, 800, generator=g)
    torch.testing.assert_close(
        reference.tucker_linear(x, f.first, f.core, f.last, None),
        reference.tucker_linear(x, unpadded.first, unpadded.core, unpadded.last, None),
    )


def test_conv_rank_above_mode_size_is_exact(conv_weight):
    with pytest.warns(UserWarning, match=r"r_in=11.*input mode size 8"):
        f = decompose_conv2d(conv_weight, (11, None))
    assert tuple(f.first.shape) == (11, C_IN)
    assert tuple(f.core.shape) == (C_OUT, 11, K, K)
    assert torch.count_nonzero(f.first[C_IN:]) == 0
    assert f.relative_error < 1e-6
    with pytest.warns(UserWarning, match=r"r_out=20"):
        f = decompose_conv2d(conv_weight, (C_IN, 20))
    assert f.relative_error < 1e-6
    x = torch.randn(2, C_IN, 6, 6)
    assert _rel(reference.tucker_conv2d(x, f.first, f.core, f.last, None), F.conv2d(x, conv_weight)) < 1e-5


def test_ranks_within_mode_size_do_not_warn(conv_weight):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decompose_conv2d(conv_weight, (C_IN, C_OUT))
        decompose_linear(torch.randn(6, 30), (6, 5))  # HOOI's inner SVD warnings stay hidden


# --------------------------------------------------------------------------- dtype, device, determinism


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtype_is_preserved(conv_weight, dtype):
    w = conv_weight.to(dtype)
    f = decompose_conv2d(w, (4, 6))
    assert f.first.dtype == f.core.dtype == f.last.dtype == dtype
    ref = decompose_conv2d(conv_weight.double(), (4, 6)).relative_error
    assert f.relative_error == pytest.approx(ref, abs=2e-2)


def test_deterministic(conv_weight):
    a = decompose_conv2d(conv_weight, (3, 5))
    b = decompose_conv2d(conv_weight, (3, 5))
    assert torch.equal(a.first, b.first) and torch.equal(a.core, b.core) and torch.equal(a.last, b.last)


def test_grad_requiring_weight_gives_plain_factors(conv_weight):
    w = conv_weight.clone().requires_grad_(True)
    f = decompose_conv2d(w, (3, 5))
    assert not f.core.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_weight_gives_cuda_factors(conv_weight):
    f = decompose_conv2d(conv_weight.cuda(), (3, 5))
    assert f.first.is_cuda and f.core.is_cuda and f.last.is_cuda


def test_zero_weight():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = decompose_conv2d(torch.zeros(4, 3, 3, 3), (2, 3))
    assert f.relative_error == 0.0
    assert torch.count_nonzero(reconstruct_conv2d(f.first, f.core, f.last)) == 0


# --------------------------------------------------------------------------- reconstruct


def test_reconstruct_matches_chain_for_random_factors():
    g = torch.Generator().manual_seed(6)
    first, core, last = (torch.randn(3, 5, generator=g, dtype=torch.float64),
                         torch.randn(4, 3, 3, 2, generator=g, dtype=torch.float64),
                         torch.randn(7, 4, generator=g, dtype=torch.float64))
    x = torch.randn(2, 5, 8, 8, generator=g, dtype=torch.float64)
    for a, c, b in ((first, core, last), (None, torch.randn(4, 5, 3, 2, dtype=torch.float64), last),
                    (first, torch.randn(7, 3, 3, 2, dtype=torch.float64), None)):
        torch.testing.assert_close(F.conv2d(x, reconstruct_conv2d(a, c, b)), reference.tucker_conv2d(x, a, c, b, None))
    xl = torch.randn(6, 5, generator=g, dtype=torch.float64)
    core_l = torch.randn(4, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(F.linear(xl, reconstruct_linear(first, core_l, last)),
                               reference.tucker_linear(xl, first, core_l, last, None))


def test_reconstruct_rejects_mismatched_factors():
    with pytest.raises(ValueError, match="first"):
        reconstruct_conv2d(torch.randn(3, 5), torch.randn(4, 2, 3, 3), None)
    with pytest.raises(ValueError, match="last"):
        reconstruct_conv2d(None, torch.randn(4, 2, 3, 3), torch.randn(7, 3))
    with pytest.raises(ValueError, match="core"):
        reconstruct_conv2d(None, torch.randn(4, 2), None)
    with pytest.raises(ValueError, match="core"):
        reconstruct_linear(None, torch.randn(4, 2, 1, 1), None)
    with pytest.raises(ValueError, match="last"):
        reconstruct_linear(None, torch.randn(4, 2), torch.randn(4, 2, 1))


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "ranks, exc, match",
    [
        ((0, 3), ValueError, "r_in"),
        ((3, -1), ValueError, "r_out"),
        ((None, None), ValueError, "ranks"),
        ((2.0, 3), TypeError, "r_in"),
        ((True, 3), TypeError, "r_in"),
        (3, TypeError, "ranks"),
        ((1, 2, 3), TypeError, "ranks"),
        ("ab", TypeError, "ranks"),
    ],
)
def test_bad_ranks(conv_weight, ranks, exc, match):
    with pytest.raises(exc, match=match):
        decompose_conv2d(conv_weight, ranks)


def test_bad_weights(conv_weight, linear_weight):
    with pytest.raises(ValueError, match=r"weight must be 4-d"):
        decompose_conv2d(linear_weight, (2, 2))
    with pytest.raises(ValueError, match=r"weight must be 2-d"):
        decompose_linear(conv_weight, (2, 2))
    with pytest.raises(TypeError, match="floating-point"):
        decompose_linear(torch.ones(3, 4, dtype=torch.int64), (2, 2))
    with pytest.raises(TypeError, match="torch.Tensor"):
        decompose_linear(np.ones((3, 4)), (2, 2))
    with pytest.raises(ValueError, match="NaN"):
        decompose_linear(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), (1, 1))
    with pytest.raises(ValueError, match="empty"):
        decompose_linear(torch.ones(0, 4), (1, 1))
    with pytest.raises(ValueError, match="n_iter_max"):
        decompose_linear(linear_weight, (2, 2), n_iter_max=0)
    with pytest.raises(ValueError, match="tol"):
        decompose_linear(linear_weight, (2, 2), tol=-1.0)


# --------------------------------------------------------------------------- tensorly handling


def test_tensorly_backend_is_not_leaked(conv_weight):
    import tensorly as tl

    before = tl.get_backend()
    try:
        tl.set_backend("pytorch")
        f = decompose_conv2d(conv_weight, (3, 5))
        assert tl.get_backend() == "pytorch"
    finally:
        tl.set_backend(before)
    assert f.relative_error == pytest.approx(decompose_conv2d(conv_weight, (3, 5)).relative_error, rel=1e-9)


def test_old_tensorly_api_is_handled(conv_weight, monkeypatch):
    """tensorly < 0.8: partial_tucker(tensor, modes, ranks=...) -> (core, factors)."""
    import tensorly.decomposition as td

    new = td.partial_tucker
    calls = []

    def old_partial_tucker(tensor, modes, ranks=None, n_iter_max=100, init="svd", tol=1e-4,
                           random_state=None, verbose=False):
        calls.append((list(modes), list(ranks)))
        (core, factors), _ = new(tensor, ranks, modes=modes, n_iter_max=n_iter_max, init=init,
                                 tol=tol, random_state=random_state)
        return core, factors

    expected = decompose_conv2d(conv_weight, (3, 5))
    monkeypatch.setattr(td, "partial_tucker", old_partial_tucker)
    got = decompose_conv2d(conv_weight, (3, 5))
    assert calls == [([0, 1], [5, 3])]
    assert torch.equal(got.core, expected.core) and torch.equal(got.first, expected.first)


def test_missing_tensorly_says_how_to_install(conv_weight, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorly", None)
    monkeypatch.setitem(sys.modules, "tensorly.decomposition", None)
    with pytest.raises(ImportError, match="pip install tensorly"):
        decompose_conv2d(conv_weight, (3, 5))


# -- large weights: bounded-memory paths (tucker_ops._linalg), exercised on small
# -- matrices by lowering the size threshold


@pytest.fixture
def everything_large(monkeypatch):
    from tucker_ops import _linalg

    monkeypatch.setattr(_linalg, "LARGE_NUMEL", 1)


@pytest.mark.parametrize(
    "shape, ranks",
    [((40, 70), (None, 9)), ((40, 70), (12, None)), ((70, 40), (9, 9)), ((70, 40), (5, 11)),
     ((24, 16, 3, 3), (None, 7)), ((24, 16, 3, 3), (6, None)), ((24, 16, 3, 3), (6, 7))],
)  # fmt: skip
@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_large_weight_paths_match_the_exact_small_path(shape, ranks, svd, everything_large, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    # Planted low rank plus noise, the shape trained layers have.
    m = shape[0]
    n = int(np.prod(shape[1:]))
    w = (torch.randn(m, 6, generator=gen) @ torch.randn(6, n, generator=gen) + 0.05 * torch.randn(m, n, generator=gen))
    w = w.reshape(shape).float()
    fn = decompose_linear if len(shape) == 2 else decompose_conv2d
    big = fn(w, ranks, svd=svd)
    from tucker_ops import _linalg

    monkeypatch.setattr(_linalg, "LARGE_NUMEL", 1 << 40)
    small = fn(w.double(), ranks, svd="exact")
    assert big.core.dtype == torch.float32 and big.ranks == ranks
    assert big.relative_error == pytest.approx(small.relative_error, rel=1e-3, abs=1e-5)
    # The reported error is the error of the returned factors.
    rec = (reconstruct_linear if len(shape) == 2 else reconstruct_conv2d)(big.first, big.core, big.last)
    assert big.relative_error == pytest.approx(_rel(rec, w), rel=1e-4)
    for factor in (big.first, None if big.last is None else big.last.T):
        if factor is not None:
            torch.testing.assert_close(factor.double() @ factor.double().T, torch.eye(factor.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)


def test_large_weight_ranks_beyond_the_unfolding_fall_back_to_tensorly(everything_large):
    # r_out = 20 > C_in * kh * kw = 9: the factor needs tensorly's orthonormal completion.
    w = torch.randn(24, 1, 3, 3)
    f = decompose_conv2d(w, (None, 20))
    assert f.ranks == (None, 20) and f.relative_error < 1e-5


def test_large_weight_nan_and_zero(everything_large):
    w = torch.randn(30, 40)
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        decompose_linear(w, (None, 4))
    f = decompose_linear(torch.zeros(30, 40), (None, 4))
    assert f.relative_error == 0.0 and not f.core.any()


def test_svd_option_is_checked():
    with pytest.raises(ValueError, match="svd: expected one of"):
        decompose_linear(torch.randn(4, 5), (None, 2), svd="lanczos")


def test_randomized_svd_on_a_small_weight_is_close_to_exact():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(50, 5, generator=gen, dtype=torch.float64) @ torch.randn(5, 80, generator=gen, dtype=torch.float64)
    w += 0.01 * torch.randn(50, 80, generator=gen, dtype=torch.float64)
    exact = decompose_linear(w, (None, 5), svd="exact").relative_error
    randomized = decompose_linear(w, (None, 5), svd="randomized").relative_error
    assert randomized == pytest.approx(exact, rel=1e-6)
