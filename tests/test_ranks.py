"""Rank selection (tucker_ops.ranks)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from tucker_ops.ranks import (
    METHODS,
    dense_params,
    energy_rank,
    evbmf,
    macs_for_ranks,
    params_for_ranks,
    select_ranks,
)


def _orthonormal(n: int, r: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]


def planted_matrix(L: int, M: int, rank: int, noise: float, seed: int) -> torch.Tensor:
    """Rank-``rank`` signal (singular values 3..1) plus i.i.d. Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    s = torch.linspace(3.0, 1.0, rank, dtype=torch.float64)
    y = _orthonormal(L, rank, g) @ torch.diag(s) @ _orthonormal(M, rank, g).T
    return y + noise * torch.randn(L, M, generator=g, dtype=torch.float64)


def planted_conv(c_out: int, c_in: int, k: int, r_out: int, r_in: int, noise: float, seed: int) -> torch.Tensor:
    """Conv weight of multilinear rank (r_out, r_in) on the channel modes, plus noise."""
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(r_out, r_in, k, k, generator=g, dtype=torch.float64)
    w = torch.einsum("abhw,oa,ib->oihw", core, _orthonormal(c_out, r_out, g), _orthonormal(c_in, r_in, g))
    return w + noise * torch.randn(w.shape, generator=g, dtype=torch.float64)


def noise(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- explicit


def test_explicit_int_and_pairs():
    w = noise(16, 8, 3, 3)
    assert select_ranks(w, 4) == (4, 4)
    assert select_ranks(w, (3, 5)) == (3, 5)
    assert select_ranks(w, [3, 5]) == (3, 5)
    assert select_ranks(w, (None, 5)) == (None, 5)
    assert select_ranks(w, (3, None)) == (3, None)
    assert select_ranks(w, (3, 5), method="explicit") == (3, 5)


def test_explicit_may_exceed_mode_size():
    # The thesis's Linear(800, 120) with (40, 200): passed through, decompose pads.
    assert select_ranks(noise(120, 800), (40, 200)) == (40, 200)
    assert select_ranks(noise(4, 3, 3, 3), 9) == (9, 9)


def test_explicit_applies_min_rank_and_multiple_without_clamping():
    w = noise(16, 8, 3, 3)
    assert select_ranks(w, (2, 5), min_rank=3) == (3, 5)
    assert select_ranks(w, (3, 5), rank_multiple=4) == (4, 8)
    assert select_ranks(w, (None, 9), rank_multiple=8) == (None, 16)  # 16 > C_out: explicit, kept


# --------------------------------------------------------------------------- ratio


@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (32, 64, 3, 3), (50, 20, 5, 5)])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75])
def test_ratio_meets_budget_closely(shape, ratio):
    r_in, r_out = select_ranks(noise(*shape), ratio)
    assert r_in is not None and r_out is not None  # Tucker-2 for these layers
    budget = ratio * dense_params(shape)
    params = params_for_ranks(shape, (r_in, r_out))
    assert 0.9 * budget <= params <= budget
    # Proportional to the mode sizes, up to rounding.
    assert abs(r_out / shape[0] - r_in / shape[1]) <= 1.0 / min(shape[:2]) + 1e-9


def test_ratio_linear_is_tucker1_with_the_largest_rank_in_budget():
    shape = (120, 800)
    for ratio in (0.05, 0.25, 0.5):
        r_in, r_out = select_ranks(noise(*shape), ratio)
        assert r_in is None
        assert r_out == math.floor(ratio * 120 * 800 / (120 + 800))
        assert params_for_ranks(shape, (r_in, r_out)) <= ratio * dense_params(shape)


def test_ratio_one_keeps_the_layer_dense():
    assert select_ranks(noise(64, 32, 3, 3), 1.0) == (None, None)
    assert select_ranks(noise(120, 800), 1.0) == (None, None)


def test_ratio_with_one_input_channel_is_tucker1():
    shape = (20, 1, 5, 5)
    r_in, r_out = select_ranks(noise(*shape), 0.5)
    assert r_in is None
    # Tucker-1 output side costs r_out * (C_in*25 + C_out) = 45 r_out <= 250.
    assert r_out == 5


def test_ratio_respects_rank_multiple():
    shape = (64, 32, 3, 3)
    r_in, r_out = select_ranks(noise(*shape), 0.5, rank_multiple=8)
    assert r_in % 8 == 0 and r_out % 8 == 0
    assert params_for_ranks(shape, (r_in, r_out)) <= 0.5 * dense_params(shape)


def test_ratio_out_of_reach_warns_and_returns_the_smallest():
    shape = (64, 32, 3, 3)
    with pytest.warns(UserWarning, match="no ranks meet the budget"):
        ranks = select_ranks(noise(*shape), 0.001, min_rank=4)
    assert ranks == (4, 4)


# --------------------------------------------------------------------------- energy


def test_energy_rank_on_known_spectrum():
    g = torch.Generator().manual_seed(0)
    s = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0], dtype=torch.float64)  # s² = 16, 4, 1, 1, 0 (sum 22)
    m = _orthonormal(5, 5, g) @ torch.diag(s) @ _orthonormal(9, 5, g).T
    assert energy_rank(m, 16 / 22) == 1
    assert energy_rank(m, 16 / 22 + 1e-6) == 2
    assert energy_rank(m, 0.9) == 2  # 20/22 = 0.909
    assert energy_rank(m, 0.95) == 3
    assert energy_rank(m, 1.0) == 4  # the zero singular value is never needed
    assert energy_rank(m.T, 0.95) == 3
    assert energy_rank(torch.zeros(3, 4), 0.9) == 1


def test_energy_method_per_mode():
    w = planted_conv(16, 12, 3, r_out=5, r_in=3, noise=0.0, seed=1)
    assert select_ranks(w, method="energy", energy=1.0) == (3, 5)
    r_in, r_out = select_ranks(w, method="energy", energy=0.5)
    assert 1 <= r_in <= 3 and 1 <= r_out <= 5


def test_energy_full_sides_become_none():
    w = noise(8, 6, 3, 3)
    assert select_ranks(w, method="energy", energy=1.0) == (None, None)
    # One input channel: that side is never decomposed.
    assert select_ranks(noise(20, 1, 5, 5), method="energy", energy=0.5)[0] is None


def test_energy_linear_is_tucker1():
    m = planted_matrix(30, 50, rank=4, noise=0.0, seed=2).float()
    assert select_ranks(m, method="energy", energy=1.0) == (None, 4)


# --------------------------------------------------------------------------- EVBMF


@pytest.mark.parametrize("L, M, rank", [(60, 100, 5), (100, 60, 5), (30, 300, 3), (64, 64, 10), (200, 400, 20)])
def test_evbmf_recovers_planted_rank(L, M, rank):
    assert evbmf(planted_matrix(L, M, rank, noise=0.02, seed=L + M)) == rank


def test_evbmf_is_scale_invariant():
    m = planted_matrix(40, 70, 6, noise=0.02, seed=3)
    assert evbmf(m * 1e-6) == evbmf(m * 1e4) == 6


@pytest.mark.parametrize("L, M", [(40, 80), (80, 40), (50, 50)])
def test_evbmf_on_pure_noise_finds_nothing(L, M):
    assert evbmf(noise(L, M, seed=L * M)) == 0


def test_evbmf_degenerate_inputs():
    assert evbmf(torch.zeros(5, 7)) == 0
    assert evbmf(torch.ones(1, 7)) == 0
    with pytest.raises(ValueError, match="matrix"):
        evbmf(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="NaN"):
        evbmf(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]))


def test_vbmf_method_recovers_planted_conv_ranks():
    w = planted_conv(48, 32, 3, r_out=6, r_in=4, noise=0.01, seed=4)
    assert select_ranks(w) == (4, 6)
    assert select_ranks(w.float(), method="vbmf") == (4, 6)


def test_vbmf_weakening():
    w = planted_conv(48, 32, 3, r_out=6, r_in=4, noise=0.01, seed=4)
    assert select_ranks(w, weakening=1.0) == (4, 6)
    assert select_ranks(w, weakening=0.0) == (None, None)  # full rank on both sides
    # full - 0.5 * (full - vbmf): 32 - 14 = 18, 48 - 21 = 27
    assert select_ranks(w, weakening=0.5) == (18, 27)


def test_vbmf_rounding_and_clamping():
    w = planted_conv(48, 32, 3, r_out=6, r_in=4, noise=0.01, seed=4)
    assert select_ranks(w, rank_multiple=4) == (4, 8)
    assert select_ranks(w, min_rank=5) == (5, 6)
    assert select_ranks(w, rank_multiple=64) == (None, None)  # clamped to the mode size: full
    assert select_ranks(w, min_rank=40) == (None, 40)


def test_vbmf_on_random_weight_falls_back_to_min_rank():
    w = noise(32, 16, 3, 3)
    with pytest.warns(UserWarning, match="falling back to min_rank=1") as record:
        assert select_ranks(w) == (1, 1)
    assert len(record) == 2  # one per side
    with pytest.warns(UserWarning, match="min_rank=3"):
        assert select_ranks(w, min_rank=3) == (3, 3)
    # Weakened from the fallback: ceil(16 - 0.5*15) = 9 and ceil(32 - 0.5*31) = 17.
    with pytest.warns(UserWarning):
        assert select_ranks(w, weakening=0.5) == (9, 17)


def test_vbmf_linear_is_tucker1_and_one_channel_conv_skips_input_side():
    m = planted_matrix(50, 90, rank=6, noise=0.01, seed=5)
    assert select_ranks(m) == (None, 6)
    w = planted_conv(20, 1, 5, r_out=3, r_in=1, noise=0.001, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the single input channel must not trigger the fallback
        assert select_ranks(w) == (None, 3)


# --------------------------------------------------------------------------- parameter and MAC counts


def test_params_for_ranks_formulas():
    conv = (64, 32, 3, 3)
    assert dense_params(conv) == params_for_ranks(conv, (None, None)) == 64 * 32 * 9
    assert params_for_ranks(conv, (8, 16)) == 32 * 8 + 16 * 8 * 9 + 16 * 64
    assert params_for_ranks(conv, (None, 16)) == 16 * 32 * 9 + 16 * 64
    assert params_for_ranks(conv, (8, None)) == 32 * 8 + 64 * 8 * 9
    # The thesis's l1: Linear(800, 120) with (40, 200).
    assert params_for_ranks((120, 800), (40, 200)) == 40 * 800 + 200 * 40 + 120 * 200


@pytest.mark.parametrize("ranks", [(3, 5), (None, 5), (3, None), (11, 20)])
def test_params_for_ranks_matches_decomposed_factors(ranks):
    pytest.importorskip("tensorly")
    from tucker_ops.decompose import decompose_conv2d, decompose_linear

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (11, 20) pads
        f = decompose_conv2d(noise(12, 8, 3, 3), ranks)
        lf = decompose_linear(noise(10, 14), ranks)
    count = sum(t.numel() for t in (f.first, f.core, f.last) if t is not None)
    assert params_for_ranks((12, 8, 3, 3), ranks) == count
    count = sum(t.numel() for t in (lf.first, lf.core, lf.last) if t is not None)
    assert params_for_ranks((10, 14), ranks) == count


def test_macs_for_ranks():
    conv = (64, 32, 3, 3)
    assert macs_for_ranks(conv, (None, None), (10, 10), (8, 8)) == 64 * 32 * 9 * 64
    assert macs_for_ranks(conv, (8, 16), (10, 10), (8, 8)) == 32 * 8 * 100 + (16 * 8 * 9 + 16 * 64) * 64
    assert macs_for_ranks((120, 800), (40, 200)) == params_for_ranks((120, 800), (40, 200))
    with pytest.raises(ValueError, match="input_hw"):
        macs_for_ranks(conv, (8, 16))
    with pytest.raises(ValueError, match="input_hw"):
        macs_for_ranks((120, 800), (4, 4), (1, 1), (1, 1))


def test_count_helpers_reject_bad_arguments():
    with pytest.raises(ValueError, match="weight_shape"):
        params_for_ranks((3, 4, 5), (1, 1))
    with pytest.raises(ValueError, match="weight_shape"):
        dense_params((0, 4))
    with pytest.raises(ValueError, match="r_in"):
        params_for_ranks((3, 4), (0, 1))
    with pytest.raises(TypeError, match="ranks"):
        params_for_ranks((3, 4), 2)


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(method="svd"), ValueError, "method.*explicit.*ratio.*energy.*vbmf"),
        (dict(spec=0.0), ValueError, r"spec.*\(0, 1\]"),
        (dict(spec=1.5), ValueError, r"spec.*\(0, 1\]"),
        (dict(spec=-0.2), ValueError, "spec"),
        (dict(method="energy", energy=0.0), ValueError, "energy"),
        (dict(method="energy", energy=1.01), ValueError, "energy"),
        (dict(weakening=-0.1), ValueError, "weakening"),
        (dict(weakening=1.1), ValueError, "weakening"),
        (dict(min_rank=0), ValueError, "min_rank"),
        (dict(min_rank=1.5), TypeError, "min_rank"),
        (dict(rank_multiple=0), ValueError, "rank_multiple"),
        (dict(spec="4"), TypeError, "spec"),
        (dict(spec=True), TypeError, "spec"),
        (dict(spec={4: 4}), TypeError, "spec"),
        (dict(spec=(1, 2, 3)), ValueError, "pair"),
        (dict(spec=(0, 2)), ValueError, "r_in"),
        (dict(spec=(2, 2.5)), TypeError, "r_out"),
        (dict(spec=0), ValueError, "spec"),
        (dict(spec=(None, None)), ValueError, "spec"),
        (dict(method="ratio"), ValueError, "ratio.*float"),
        (dict(method="explicit"), ValueError, "explicit"),
        (dict(spec=4, method="ratio"), ValueError, "method"),
        (dict(spec=0.5, method="explicit"), ValueError, "method"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        select_ranks(noise(8, 6, 3, 3), **kwargs)


def test_bad_weights():
    with pytest.raises(ValueError, match="weight"):
        select_ranks(noise(8, 6, 3), 2)
    with pytest.raises(TypeError, match="weight"):
        select_ranks([[1.0]], 2)
    with pytest.raises(TypeError, match="floating"):
        select_ranks(torch.ones(4, 4, dtype=torch.int32), 2)


def test_methods_constant():
    assert METHODS == ("explicit", "ratio", "energy", "vbmf")


def test_large_matrices_use_the_gram_spectrum(monkeypatch):
    import numpy as np

    from tucker_ops import _linalg

    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(60, 7, generator=gen) @ torch.randn(7, 150, generator=gen) + 0.1 * torch.randn(60, 150, generator=gen)).float()
    exact = np.linalg.svd(a.double().numpy(), compute_uv=False)
    expected = (evbmf(a), evbmf(a.T), energy_rank(a, 0.9))
    monkeypatch.setattr(_linalg, "LARGE_NUMEL", 1)
    for m in (a, a.T):
        np.testing.assert_allclose(_linalg.singular_values(m), exact, rtol=1e-4, atol=1e-5 * exact[0])
    assert (evbmf(a), evbmf(a.T), energy_rank(a, 0.9)) == expected
    a[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        evbmf(a)
