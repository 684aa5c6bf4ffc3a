"""Rank selection for Tucker-decomposed Conv2d / Linear layers.

Ranks are always in chain order ``(r_in, r_out)``; ``None`` on a side means that
side is not decomposed (Tucker-1). Four methods (:data:`METHODS`):

* ``explicit``: the caller's ranks. An int ``r`` means ``(r, r)``. They may
  exceed the mode size (decompose then zero-pads, with a warning).
* ``ratio``: a float in (0, 1], the fraction of the layer's weight parameters
  to keep; the largest ranks whose parameter count stays within that budget
  (conv: Tucker-2 ranks proportional to ``C_in`` and ``C_out``). If min_rank /
  rank_multiple make the budget unreachable, the cheapest ranks, with a warning.
* ``energy``: per mode, the smallest rank whose leading singular values of the
  mode unfolding keep at least ``energy`` of the sum of squared singular values.
* ``vbmf``: Empirical Variational Bayesian Matrix Factorization (Nakajima et al.
  2013) of each mode unfolding, as Kim et al. (ICLR 2016) use it, optionally
  weakened towards full rank as in MUSCO: ``full - weakening * (full - vbmf)``.

Rules applied to every method, in this order: raise to ``min_rank`` (and to 1),
round up to a multiple of ``rank_multiple``. Automatic methods (ratio, energy,
vbmf) then clamp to the mode size, and a side that ends at its full mode size is
returned as None, because a full projection only adds cost. If both sides end
up None the result is ``(None, None)``: no rank reduction, and the caller
(``compress``) leaves the layer dense.

Linear layers under the automatic methods get Tucker-1 ``(None, r)``: for a
matrix, Tucker-2 ``A·G·Bᵀ`` with ranks ``(r, r)`` approximates exactly as well
as the rank-``r`` ``A·G`` (the unfoldings are ``W`` and ``Wᵀ``, which share
their singular values) but costs ``r²`` more parameters and a third matmul.
``r`` reaching ``min(out, in)`` means no reduction: ``(None, None)``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "METHODS",
    "RankSpec",
    "Ranks",
    "select_ranks",
    "evbmf",
    "energy_rank",
    "params_for_ranks",
    "dense_params",
    "macs_for_ranks",
]

METHODS = ("explicit", "ratio", "energy", "vbmf")

Ranks = tuple[Union[int, None], Union[int, None]]
RankSpec = Union[int, float, tuple[Union[int, None], Union[int, None]], None]


# --------------------------------------------------------------------------- public API


def select_ranks(
    weight: Tensor,
    spec: RankSpec = None,
    *,
    method: str = "vbmf",
    energy: float = 0.9,
    weakening: float = 1.0,
    min_rank: int = 1,
    rank_multiple: int = 1,
) -> Ranks:
    """Choose chain-order ranks ``(r_in, r_out)`` for one layer weight.

    Args:
        weight: conv ``(C_out, C_in, kh, kw)`` or linear ``(out, in)``.
        spec: int ``r`` -> explicit ``(r, r)``; tuple ``(r_in, r_out)`` ->
            explicit (None = Tucker-1 on that side); float in (0, 1] -> ratio of
            weight parameters to keep; None -> ``method`` ("vbmf" or "energy").
            A non-None spec decides the method; ``method`` must then be
            compatible ("explicit" only with int/tuple, "ratio" only with float).
        method: one of :data:`METHODS`.
        energy: for "energy", the fraction in (0, 1] of squared singular values kept.
        weakening: for "vbmf", in [0, 1]; 1.0 = pure EVBMF, 0.0 = full rank.
        min_rank: lower bound (>= 1) on every selected rank.
        rank_multiple: every rank is rounded up to a multiple of this (>= 1).

    Returns:
        ``(r_in, r_out)``. For automatic methods a side at full mode size is
        None, and ``(None, None)`` means "no rank reduction: keep the layer dense".

    Raises:
        ValueError / TypeError naming the offending argument.
    """
    shape = _weight_shape(weight, "select_ranks")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if not isinstance(energy, numbers.Real) or isinstance(energy, bool) or not 0.0 < energy <= 1.0:
        raise ValueError(f"energy: expected a float in (0, 1], got {energy!r}")
    if (
        not isinstance(weakening, numbers.Real)
        or isinstance(weakening, bool)
        or not 0.0 <= weakening <= 1.0
    ):
        raise ValueError(f"weakening: expected a float in [0, 1], got {weakening!r}")
    min_rank = _positive_int(min_rank, "min_rank")
    rank_multiple = _positive_int(rank_multiple, "rank_multiple")
    rules = (min_rank, rank_multiple)

    if spec is None:
        if method == "explicit":
            raise ValueError(
                "spec: method 'explicit' needs the ranks as spec (an int r or a pair (r_in, r_out)), got None"
            )
        if method == "ratio":
            raise ValueError(
                "spec: method 'ratio' needs the fraction of parameters to keep as spec "
                "(a float in (0, 1]), got None"
            )
        if method == "energy":
            return _automatic(weight, shape, lambda m, size: energy_rank(m, energy), rules)
        return _automatic(
            weight, shape, lambda m, size: _vbmf_rank(m, size, weakening, min_rank), rules
        )

    if isinstance(spec, bool):
        raise TypeError(f"spec: expected an int, a float, a pair (r_in, r_out) or None, got {spec!r}")
    if isinstance(spec, numbers.Integral):
        _require_method(method, "explicit", spec)
        r = int(spec)
        if r < 1:
            raise ValueError(f"spec: an explicit rank must be >= 1, got {r}")
        return _explicit((r, r), rules)
    if isinstance(spec, numbers.Real):
        _require_method(method, "ratio", spec)
        ratio = float(spec)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"spec: a parameter ratio must be in (0, 1], got {ratio!r}")
        return _ratio(shape, ratio, rules)
    if isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
        _require_method(method, "explicit", spec)
        if len(spec) != 2:
            raise ValueError(f"spec: explicit ranks must be a pair (r_in, r_out), got {spec!r}")
        pair: list[int | None] = []
        for name, r in zip(("r_in", "r_out"), spec):
            if r is None:
                pair.append(None)
                continue
            if isinstance(r, bool) or not isinstance(r, numbers.Integral):
                raise TypeError(f"spec: {name} must be an int or None, got {r!r}")
            if int(r) < 1:
                raise ValueError(f"spec: {name} must be >= 1 (or None for Tucker-1), got {int(r)}")
            pair.append(int(r))
        if pair[0] is None and pair[1] is None:
            raise ValueError("spec: explicit ranks (None, None) decompose nothing; give at least one int")
        return _explicit((pair[0], pair[1]), rules)
    raise TypeError(
        f"spec: expected an int, a float, a pair (r_in, r_out) or None, got {type(spec).__name__}"
    )


def evbmf(matrix: Tensor) -> int:
    """Rank that analytic Empirical VBMF keeps for ``matrix`` (0 when it finds no signal).

    Implements the global analytic EVB solution of Nakajima, Sugiyama, Babacan
    and Tomioka (JMLR 2013) with the noise variance σ² estimated by minimising
    the free energy over its analytic bounds. A singular value survives when
    ``γ_h > σ·sqrt(M·(1 + τ̄)(1 + α/τ̄))`` with ``L <= M`` the matrix sides,
    ``α = L/M`` and ``τ̄`` the zero of ``log(τ+1) + α·log(τ/α+1) − τ``
    (≈ 2.5129·√α, which other implementations hard-code).

    Args:
        matrix: ``(L, M)`` real matrix, either orientation.

    Returns:
        The number of components EVBMF keeps, in ``[0, min(L, M)]``.
    """
    if not isinstance(matrix, Tensor) or matrix.dim() != 2:
        raise ValueError(f"matrix: expected a 2-d tensor, got {_describe(matrix)}")
    s = _singular_values(matrix, "matrix")
    big, small = max(matrix.shape), min(matrix.shape)
    if s.size == 0 or s[0] == 0.0 or small == 1:
        # One singular value cannot be told apart from noise: σ²'s bounds collapse.
        return 0
    # EVB is scale invariant; normalising keeps σ² near 1 for the search.
    s = s / s[0]
    alpha = small / big
    tau_bar = _tau_bar(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
    sigma2 = _evb_sigma2(s, small, big, x_bar)
    threshold = math.sqrt(big * sigma2 * x_bar)
    return int(np.count_nonzero(s > threshold))


def energy_rank(matrix: Tensor, energy: float) -> int:
    """Smallest rank whose leading singular values keep ``energy`` of ``sum(σ²)``.

    Args:
        matrix: ``(L, M)`` real matrix. energy: in (0, 1].

    Returns:
        A rank in ``[1, min(L, M)]`` (1 for an all-zero matrix).
    """
    if not isinstance(matrix, Tensor) or matrix.dim() != 2:
        raise ValueError(f"matrix: expected a 2-d tensor, got {_describe(matrix)}")
    if not isinstance(energy, numbers.Real) or not 0.0 < energy <= 1.0:
        raise ValueError(f"energy: expected a float in (0, 1], got {energy!r}")
    s2 = _singular_values(matrix, "matrix") ** 2
    total = float(s2.sum())
    if total == 0.0:
        return 1
    kept = np.cumsum(s2) / total
    # Tolerance so that energy=1.0 is reached despite rounding in the cumsum.
    return int(np.searchsorted(kept, energy - 1e-12) + 1)


def dense_params(weight_shape: Sequence[int]) -> int:
    """Weight parameters (no bias) of the dense layer: ``C_out·C_in·kh·kw`` or ``out·in``."""
    shape = _shape_tuple(weight_shape)
    return math.prod(shape)


def params_for_ranks(weight_shape: Sequence[int], ranks: Ranks) -> int:
    """Weight parameters (no bias) of the decomposed layer.

    Args:
        weight_shape: conv ``(C_out, C_in, kh, kw)`` or linear ``(out, in)``.
        ranks: chain-order ``(r_in, r_out)``; ``(None, None)`` = the dense layer.

    Returns:
        ``C_in·R_in + R_out·R_in·kh·kw + R_out·C_out`` with absent sides dropped
        and ``R = C`` on an undecomposed side.
    """
    shape = _shape_tuple(weight_shape)
    r_in, r_out = _ranks_pair(ranks)
    c_out, c_in = shape[0], shape[1]
    k = math.prod(shape[2:])
    core_out = c_out if r_out is None else r_out
    core_in = c_in if r_in is None else r_in
    total = core_out * core_in * k
    if r_in is not None:
        total += r_in * c_in
    if r_out is not None:
        total += c_out * r_out
    return total


def macs_for_ranks(
    weight_shape: Sequence[int],
    ranks: Ranks,
    input_hw: Sequence[int] | None = None,
    output_hw: Sequence[int] | None = None,
) -> int:
    """Multiply-accumulates of one sample through the (decomposed) layer.

    Args:
        weight_shape: conv ``(C_out, C_in, kh, kw)`` or linear ``(out, in)``.
        ranks: chain-order ``(r_in, r_out)``; ``(None, None)`` = the dense layer.
        input_hw: conv only, the input ``(H, W)``; output_hw: conv only,
            ``(H_out, W_out)``. Both None for linear (MACs per input row).

    Returns:
        ``C_in·R_in·H·W + (R_out·R_in·kh·kw + R_out·C_out)·H_out·W_out`` with
        absent sides dropped (the ARCHITECTURE.md cost of the chain).
    """
    shape = _shape_tuple(weight_shape)
    r_in, r_out = _ranks_pair(ranks)
    if len(shape) == 2:
        if input_hw is not None or output_hw is not None:
            raise ValueError("input_hw/output_hw: only meaningful for a conv weight; pass None for linear")
        in_px = out_px = 1
    else:
        if input_hw is None or output_hw is None:
            raise ValueError("input_hw, output_hw: both (H, W) pairs are required for a conv weight")
        in_px = math.prod(_hw(input_hw, "input_hw"))
        out_px = math.prod(_hw(output_hw, "output_hw"))
    c_out, c_in = shape[0], shape[1]
    k = math.prod(shape[2:])
    core_out = c_out if r_out is None else r_out
    core_in = c_in if r_in is None else r_in
    total = core_out * core_in * k * out_px
    if r_in is not None:
        total += c_in * r_in * in_px
    if r_out is not None:
        total += r_out * c_out * out_px
    return total


# --------------------------------------------------------------------------- rank rules


def _apply_rules(r: int, rules: tuple[int, int]) -> int:
    min_rank, multiple = rules
    r = max(int(r), min_rank, 1)
    return -(-r // multiple) * multiple


def _finish_auto(r: int, size: int, rules: tuple[int, int]) -> int | None:
    """min_rank, rank_multiple, clamp to ``size``; None when the side is full."""
    r = min(_apply_rules(r, rules), size)
    return None if r >= size else r


def _explicit(ranks: Ranks, rules: tuple[int, int]) -> Ranks:
    r_in, r_out = ranks
    return (
        None if r_in is None else _apply_rules(r_in, rules),
        None if r_out is None else _apply_rules(r_out, rules),
    )


def _require_method(method: str, needed: str, spec: Any) -> None:
    if method in ("explicit", "ratio") and method != needed:
        raise ValueError(
            f"method: {method!r} does not match spec {spec!r}, which selects {needed!r} "
            f"(an int or pair is explicit, a float is a parameter ratio)"
        )


# --------------------------------------------------------------------------- methods


def _automatic(weight: Tensor, shape: tuple[int, ...], rank_of, rules: tuple[int, int]) -> Ranks:
    """Apply ``rank_of(unfolding, mode_size) -> int`` to each side (linear: once, Tucker-1)."""
    w = weight.detach()
    if len(shape) == 2:
        size = min(shape)
        if size == 1:
            return None, None
        return None, _finish_auto(rank_of(w, size), size, rules)
    c_out, c_in = shape[0], shape[1]
    r_out = None if c_out == 1 else _finish_auto(rank_of(w.reshape(c_out, -1), c_out), c_out, rules)
    r_in = (
        None
        if c_in == 1
        else _finish_auto(rank_of(w.transpose(0, 1).reshape(c_in, -1), c_in), c_in, rules)
    )
    return r_in, r_out


def _vbmf_rank(matrix: Tensor, full: int, weakening: float, min_rank: int) -> int:
    """EVBMF rank of one unfolding, weakened towards ``full`` (the side's mode size)."""
    r = evbmf(matrix)
    if r == 0:
        warnings.warn(
            f"EVBMF found no component above the noise level in a {tuple(matrix.shape)} unfolding "
            f"(typical of untrained weights); falling back to min_rank={min_rank}",
            UserWarning,
            stacklevel=5,
        )
        r = min_rank
    # MUSCO's weakening: move from the EVBMF rank towards full rank; ceil keeps
    # any fractional rank rather than dropping it.
    return math.ceil(full - weakening * (full - r) - 1e-9)


def _ratio(shape: tuple[int, ...], ratio: float, rules: tuple[int, int]) -> Ranks:
    budget = ratio * math.prod(shape)
    candidates: set[Ranks] = {(None, None)}
    c_out, c_in = shape[0], shape[1]
    if len(shape) == 2:
        size = min(shape)
        for r in range(1, size + 1):
            candidates.add((None, _finish_auto(r, size, rules)))
    else:
        # Tucker-2 ranks proportional to the mode sizes, stepping the larger side.
        big = max(c_out, c_in)
        for t in range(1, big + 1):
            r_out = max(1, round(t * c_out / big))
            r_in = max(1, round(t * c_in / big))
            candidates.add((_finish_auto(r_in, c_in, rules), _finish_auto(r_out, c_out, rules)))

    def key(ranks: Ranks) -> tuple[int, int, int]:
        return (
            params_for_ranks(shape, ranks),
            ranks[0] if ranks[0] is not None else c_in,
            ranks[1] if ranks[1] is not None else c_out,
        )

    ordered = sorted(candidates, key=key)
    feasible = [c for c in ordered if params_for_ranks(shape, c) <= budget + 1e-9]
    if feasible:
        return feasible[-1]
    best = ordered[0]
    warnings.warn(
        f"ratio={ratio}: no ranks meet the budget of {budget:.0f} parameters for weight {shape} "
        f"with min_rank={rules[0]}, rank_multiple={rules[1]}; using the smallest, {best} "
        f"({params_for_ranks(shape, best)} parameters)",
        UserWarning,
        stacklevel=3,
    )
    return best


# --------------------------------------------------------------------------- EVBMF internals


def _tau_bar(alpha: float) -> float:
    """Positive zero of ``log(τ+1) + α·log(τ/α+1) − τ`` (decreasing through it)."""

    def f(t: float) -> float:
        return math.log1p(t) + alpha * math.log1p(t / alpha) - t

    lo, hi = 1e-12, 1.0
    while f(hi) > 0.0:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) > 0.0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return 0.5 * (lo + hi)


def _evb_free_energy(sigma2: float, s: np.ndarray, L: int, M: int, x_bar: float) -> float:
    """EVB free energy in σ², up to constants (Nakajima et al. 2013).

    ``Σ_h ψ0(x_h) + Σ_{x_h > x̄} ψ1(x_h)`` with ``x_h = γ_h²/(Mσ²)``,
    ``ψ0(x) = x − log x`` and ``ψ1 = log(τ+1) + α·log(τ/α+1) − τ``. The
    ``−log γ_h²`` part of ψ0 does not depend on σ² and is dropped, which keeps
    the objective finite when some γ_h are exactly zero.
    """
    alpha = L / M
    x = s * s / (M * sigma2)
    value = float(x.sum()) + L * math.log(sigma2)
    z = x[x > x_bar]
    if z.size:
        b = z - (1.0 + alpha)
        tau = 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))
        value += float(np.sum(np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau))
    return value


def _evb_sigma2(s: np.ndarray, L: int, M: int, x_bar: float) -> float:
    """σ² minimising the EVB free energy between its analytic bounds."""
    alpha = L / M
    h_bar = min(math.ceil(L / (1.0 + alpha)) - 1, L - 1)  # upper bound on the EVB rank
    upper = float(np.sum(s * s)) / (L * M)
    lower = max(s[h_bar] ** 2 / (M * x_bar), float(np.mean(s[h_bar:] ** 2)) / M)
    lower = min(max(lower, upper * 1e-12), upper)
    if lower >= upper:
        return upper

    # The free energy need not be unimodal: grid search in log σ², then refine
    # the best cell by golden section.
    def obj(log_s2: float) -> float:
        return _evb_free_energy(math.exp(log_s2), s, L, M, x_bar)

    grid = np.linspace(math.log(lower), math.log(upper), 257)
    values = [obj(g) for g in grid]
    i = int(np.argmin(values))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    best_x, best_v = grid[i], values[i]
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = obj(c), obj(d)
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = obj(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = obj(d)
        if b - a < 1e-12:
            break
    for x, v in ((c, fc), (d, fd)):
        if v < best_v:
            best_x, best_v = x, v
    return math.exp(best_x)


# --------------------------------------------------------------------------- validation


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def _singular_values(matrix: Tensor, name: str) -> np.ndarray:
    from ._linalg import all_finite, singular_values

    m = matrix.detach()
    if not all_finite(m):
        raise ValueError(f"{name}: contains NaN or infinite values")
    # Small: LAPACK in float64. Large (a VGG-16 fc layer): Gram eigenvalues, in
    # bounded memory and seconds instead of minutes.
    return singular_values(m)


def _weight_shape(weight: Any, fn: str) -> tuple[int, ...]:
    if not isinstance(weight, Tensor):
        raise TypeError(f"{fn}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() not in (2, 4):
        raise ValueError(
            f"{fn}: weight must be conv (C_out, C_in, kh, kw) or linear (out, in), "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.numel() == 0:
        raise ValueError(f"{fn}: weight must not be empty, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{fn}: weight must be floating point, got dtype {weight.dtype}")
    return tuple(int(d) for d in weight.shape)


def _shape_tuple(weight_shape: Any) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in weight_shape)
    except TypeError:
        raise TypeError(
            f"weight_shape: expected a shape sequence, got {type(weight_shape).__name__}"
        ) from None
    if len(shape) not in (2, 4) or any(d < 1 for d in shape):
        raise ValueError(
            f"weight_shape: expected conv (C_out, C_in, kh, kw) or linear (out, in) with "
            f"positive sizes, got {shape}"
        )
    return shape


def _ranks_pair(ranks: Any) -> Ranks:
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence) or len(ranks) != 2:
        raise TypeError(f"ranks: expected a pair (r_in, r_out) of ints or None, got {ranks!r}")
    out: list[int | None] = []
    for name, r in zip(("r_in", "r_out"), ranks):
        if r is None:
            out.append(None)
        elif isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
            raise ValueError(f"ranks: {name} must be an int >= 1 or None, got {r!r}")
        else:
            out.append(int(r))
    return out[0], out[1]


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value}")
    return int(value)


def _hw(hw: Any, name: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in hw)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected an (H, W) pair, got {hw!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{name}: expected positive sizes, got {(h, w)}")
    return h, w
