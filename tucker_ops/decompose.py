"""Tucker-1 / Tucker-2 decomposition of Conv2d and Linear weights through tensorly.

The decomposition itself is tensorly's ``partial_tucker`` (HOOI with SVD
initialisation) run on a float64 NumPy copy of the weight; this module only
maps layer weights to tensor modes and back into the op layout of
ARCHITECTURE.md ("The op contract"):

* Conv2d weight ``W (C_out, C_in, kh, kw)``; mode 0 is the output side, mode 1
  the input side. ``W ≈ core ×₀ U_out ×₁ U_in`` gives ``first = U_inᵀ``
  ``(R_in, C_in)``, ``core (R_out, R_in, kh, kw)``, ``last = U_out (C_out, R_out)``.
* Linear weight ``W (out, in)`` is the same with ``kh = kw = 1`` dropped:
  ``W ≈ A·G·Bᵀ`` with ``first = Bᵀ``, ``core = G``, ``last = A``.

Ranks are given in chain order ``(r_in, r_out)``; ``None`` leaves that side
undecomposed (Tucker-1). tensorly is imported lazily so that the rest of the
package works without it.

Large weights (at least 2**22 elements, e.g. VGG-16's Linear layers) are handled
in their own precision (float32), never as a float64 copy, and without tensorly
where a closed form exists: Tucker-1 (one mode) is the leading left singular
vectors of that mode's unfolding, and a matrix Tucker-2 is its leading left and
right singular vectors (Eckart-Young), so no HOOI sweep is needed. Those vectors
come from ``svd="exact"`` (eigendecomposition of the smaller side's Gram matrix
in float64) or ``svd="randomized"`` (Halko et al. range finder, 4 power
iterations), the default for large weights. What the randomized SVD adds to
the relative reconstruction error, measured on VGG-16-shaped layers by
``benchmarks/bench_compress_big.py svd-error`` (table in docs/reliability.md):
+0.002 to +0.007 on random-init weights (a flat spectrum, its worst case),
below +1e-4 on a decaying (1/i) spectrum like a trained layer's. The error of a
large weight is computed block by block in its own precision with float64 sums.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "TuckerFactors",
    "decompose_conv2d",
    "decompose_linear",
    "reconstruct_conv2d",
    "reconstruct_linear",
]

# Accepted ``svd`` values: "auto" = randomized for weights of >= tucker_ops._linalg.LARGE_NUMEL elements.
SVD_METHODS = ("auto", "exact", "randomized")

# Elements per block of the blocked error computation for big weights (8 MiB in float64).
_ERROR_BLOCK = 1 << 20


@dataclass(frozen=True)
class TuckerFactors:
    """Factors of one decomposed layer, in the op layout.

    Attributes:
        first: ``(R_in, C_in)`` input projection (the 1x1 conv / Linear weight),
            or None for Tucker-1 on the output side.
        core: conv ``(R_out | C_out, R_in | C_in, kh, kw)``; linear
            ``(R_out | out, R_in | in)``.
        last: ``(C_out, R_out)`` output projection, or None for Tucker-1 on the
            input side.
        relative_error: ``||W - Ŵ||_F / ||W||_F`` of the returned factors,
            computed in float64 (0.0 for an all-zero weight reproduced exactly).
    """

    first: Tensor | None
    core: Tensor
    last: Tensor | None
    relative_error: float

    @property
    def ranks(self) -> tuple[int | None, int | None]:
        """The chain-order ranks ``(r_in, r_out)`` these factors realise."""
        r_in = None if self.first is None else int(self.first.shape[0])
        r_out = None if self.last is None else int(self.last.shape[1])
        return r_in, r_out


def decompose_conv2d(
    weight: Tensor,
    ranks: Sequence[int | None],
    *,
    n_iter_max: int = 100,
    tol: float = 1e-8,
    random_state: int | None = 0,
    svd: str = "auto",
) -> TuckerFactors:
    """Tucker-decompose a Conv2d weight over its output and/or input channels.

    Args:
        weight: ``(C_out, C_in, kh, kw)`` floating-point weight, any device.
        ranks: ``(r_in, r_out)`` in chain order. ``(r_in, r_out)`` is Tucker-2;
            ``(None, r_out)`` is Tucker-1 on the output side (first is None,
            core ``(R_out, C_in, kh, kw)``); ``(r_in, None)`` is Tucker-1 on the
            input side (core ``(C_out, R_in, kh, kw)``, last is None). A rank
            above its mode size is met by zero padding (an exact no-op) with a
            UserWarning.
        n_iter_max: HOOI iteration limit, passed to tensorly.
        tol: HOOI stops once the reconstruction error changes by less than this.
        random_state: seed handed to tensorly (and to the randomized SVD), for
            reproducibility.
        svd: ``"exact"``, ``"randomized"`` or ``"auto"`` (randomized for weights of
            at least ``tucker_ops._linalg.LARGE_NUMEL`` = 2**22 elements, exact
            below). See "Large weights" in the module docstring.

    Returns:
        TuckerFactors with first ``(R_in, C_in)``, core ``(R_out, R_in, kh, kw)``,
        last ``(C_out, R_out)`` (None on undecomposed sides), all in the
        weight's dtype and device.
    """
    _check_weight(weight, 4, "decompose_conv2d", "(C_out, C_in, kh, kw)")
    return _decompose(weight, ranks, n_iter_max=n_iter_max, tol=tol, random_state=random_state, svd=svd)


def decompose_linear(
    weight: Tensor,
    ranks: Sequence[int | None],
    *,
    n_iter_max: int = 100,
    tol: float = 1e-8,
    random_state: int | None = 0,
    svd: str = "auto",
) -> TuckerFactors:
    """Tucker-decompose a Linear weight ``W ≈ A·G·Bᵀ`` (or one-sided ``A·G`` / ``G·Bᵀ``).

    Args:
        weight: ``(out, in)`` floating-point weight, any device.
        ranks: ``(r_in, r_out)`` in chain order. ``(r_in, r_out)``: first ``Bᵀ
            (R_in, in)``, core ``G (R_out, R_in)``, last ``A (out, R_out)``.
            ``(None, r_out)``: core ``(R_out, in)``, last ``(out, R_out)``.
            ``(r_in, None)``: first ``(R_in, in)``, core ``(out, R_in)``.
            Ranks above the mode size are zero-padded with a UserWarning.
        n_iter_max, tol, random_state, svd: as for :func:`decompose_conv2d`.

    Returns:
        TuckerFactors in the weight's dtype and device.
    """
    _check_weight(weight, 2, "decompose_linear", "(out, in)")
    return _decompose(weight, ranks, n_iter_max=n_iter_max, tol=tol, random_state=random_state, svd=svd)


def reconstruct_conv2d(first: Tensor | None, core: Tensor, last: Tensor | None) -> Tensor:
    """Dense Conv2d weight ``(C_out, C_in, kh, kw)`` from op-layout factors.

    Args:
        first: ``(R_in, C_in)`` or None; core ``(R_out, R_in | C_in, kh, kw)``;
        last: ``(C_out, R_out)`` or None.
    """
    if not isinstance(core, Tensor) or core.dim() != 4:
        raise ValueError(f"core: expected a 4-d tensor (R_out, R_in, kh, kw), got {_describe(core)}")
    _check_factor_shapes(first, core, last)
    w = core
    if first is not None:
        w = torch.einsum("orhw,ri->oihw", w, first)
    if last is not None:
        w = torch.einsum("co,oihw->cihw", last, w)
    return w.contiguous()


def reconstruct_linear(first: Tensor | None, core: Tensor, last: Tensor | None) -> Tensor:
    """Dense Linear weight ``(out, in)`` ``= last @ core @ first`` from op-layout factors.

    Args:
        first: ``(R_in, in)`` or None; core ``(R_out, R_in | in)``;
        last: ``(out, R_out)`` or None.
    """
    if not isinstance(core, Tensor) or core.dim() != 2:
        raise ValueError(f"core: expected a 2-d tensor (R_out, R_in), got {_describe(core)}")
    _check_factor_shapes(first, core, last)
    w = core
    if first is not None:
        w = w @ first
    if last is not None:
        w = last @ w
    return w.contiguous()


# --------------------------------------------------------------------------- internals


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__}"


def _check_factor_shapes(first: Tensor | None, core: Tensor, last: Tensor | None) -> None:
    if first is not None:
        if not isinstance(first, Tensor) or first.dim() != 2:
            raise ValueError(f"first: expected a 2-d tensor (R_in, C_in) or None, got {_describe(first)}")
        if first.shape[0] != core.shape[1]:
            raise ValueError(
                f"first: has {first.shape[0]} rows (R_in) but core has {core.shape[1]} input "
                f"channels; expected first.shape[0] == core.shape[1]"
            )
    if last is not None:
        if not isinstance(last, Tensor) or last.dim() != 2:
            raise ValueError(f"last: expected a 2-d tensor (C_out, R_out) or None, got {_describe(last)}")
        if last.shape[1] != core.shape[0]:
            raise ValueError(
                f"last: has {last.shape[1]} columns (R_out) but core has {core.shape[0]} output "
                f"channels; expected last.shape[1] == core.shape[0]"
            )


def _check_weight(weight: Any, ndim: int, fn: str, layout: str) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"{fn}: weight must be a torch.Tensor {layout}, got {type(weight).__name__}")
    if weight.dim() != ndim:
        raise ValueError(
            f"{fn}: weight must be {ndim}-d {layout}, got shape {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise TypeError(f"{fn}: weight must be a floating-point tensor, got dtype {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"{fn}: weight must not be empty, got shape {tuple(weight.shape)}")
    from ._linalg import all_finite

    if not all_finite(weight.detach()):
        raise ValueError(f"{fn}: weight contains NaN or infinite values")


def _check_ranks(ranks: Any) -> tuple[int | None, int | None]:
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence) or len(ranks) != 2:
        raise TypeError(
            f"ranks: expected a pair (r_in, r_out) of ints or None in chain order, got {ranks!r}"
        )
    out: list[int | None] = []
    for name, r in zip(("r_in", "r_out"), ranks):
        if r is None:
            out.append(None)
            continue
        if isinstance(r, bool) or not isinstance(r, numbers.Integral):
            raise TypeError(f"ranks: {name} must be an int or None, got {r!r}")
        if int(r) < 1:
            raise ValueError(f"ranks: {name} must be >= 1 (or None for Tucker-1), got {int(r)}")
        out.append(int(r))
    if out[0] is None and out[1] is None:
        raise ValueError(
            "ranks: at least one of (r_in, r_out) must be an int; (None, None) decomposes nothing"
        )
    return out[0], out[1]


def _import_tensorly() -> tuple[Any, Any]:
    try:
        import tensorly as tl
        from tensorly.decomposition import partial_tucker
    except ImportError as exc:
        raise ImportError(
            "tucker_ops.decompose needs tensorly for the Tucker decomposition; "
            "install it with `pip install tensorly`"
        ) from exc
    return tl, partial_tucker


@contextlib.contextmanager
def _numpy_backend(tl: Any) -> Iterator[None]:
    """Run tensorly on NumPy without leaking a backend change to the caller."""
    if tl.get_backend() == "numpy":
        # The common case: touch nothing, so other threads are never affected.
        yield
        return
    ctx = getattr(tl, "backend_context", None)
    if ctx is not None:
        try:
            manager = ctx("numpy", local_threadsafe=True)
        except TypeError:  # older tensorly without the thread-local option
            manager = ctx("numpy")
        with manager:
            yield
        return
    old = tl.get_backend()
    tl.set_backend("numpy")
    try:
        yield
    finally:
        tl.set_backend(old)


def _partial_tucker(
    array: np.ndarray,
    modes: list[int],
    ranks: list[int],
    *,
    n_iter_max: int,
    tol: float,
    random_state: int | None,
    svd: str = "exact",
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Call tensorly's partial_tucker across its API versions.

    tensorly < 0.8: ``partial_tucker(tensor, modes, ranks=...)`` (``rank=`` in
    0.7) returning ``(core, factors)``; tensorly >= 0.8:
    ``partial_tucker(tensor, rank, modes=...)`` returning
    ``((core, factors), rec_errors)``. ``svd="randomized"`` asks for
    ``randomized_svd`` in the SVD initialisation where tensorly has the option
    (its HOOI sweeps always use the exact SVD of the projected unfoldings).
    The results keep the array's dtype.
    """
    tl, partial_tucker = _import_tensorly()
    params = inspect.signature(partial_tucker).parameters
    rank_kw = "rank" if "rank" in params else "ranks"
    kwargs: dict[str, Any] = {
        rank_kw: list(ranks),
        "modes": list(modes),
        "n_iter_max": n_iter_max,
        "init": "svd",
        "tol": tol,
        "random_state": random_state,
    }
    if "svd" in params:
        kwargs["svd"] = "randomized_svd" if svd == "randomized" else "truncated_svd"
    with _numpy_backend(tl), warnings.catch_warnings():
        # HOOI asks for more singular vectors than a partial projection has
        # when one rank exceeds the product of the others (e.g. a matrix with
        # r_out > r_in); tensorly then completes the factor with orthonormal
        # columns, which is what we want, so its warning is noise here.
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        result = partial_tucker(tl.tensor(array), **kwargs)
    head, tail = result
    if isinstance(head, np.ndarray):
        core, factors = head, tail
    else:
        core, factors = head
    return np.asarray(core), [np.asarray(f) for f in factors]


def _resolve_svd(svd: Any, large: bool) -> str:
    if not isinstance(svd, str) or svd not in SVD_METHODS:
        raise ValueError(f"svd: expected one of {SVD_METHODS}, got {svd!r}")
    if svd == "auto":
        return "randomized" if large else "exact"
    return svd


def _sign_fix(u: Tensor) -> Tensor:
    """Flip columns so each one's largest-magnitude entry is positive (deterministic factors)."""
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u[idx, torch.arange(u.shape[1])])
    return u * torch.where(signs == 0, torch.ones_like(signs), signs)


def _closed_form(
    w: Tensor, modes: list[int], tl_ranks: list[int], method: str, random_state: int | None
) -> tuple[Tensor, list[Tensor]] | None:
    """Factors and core of a Tucker-1 (one mode) or a matrix Tucker-2 without HOOI.

    One mode: the leading left singular vectors of that mode's unfolding are the
    optimum (HOOI's first SVD already is). A matrix ``W ≈ A·G·Bᵀ``: the leading
    left and right singular vectors (Eckart-Young), ``G = AᵀWB``. Returns None
    when a rank exceeds the smaller side of the unfolding, where tensorly's
    completion of the factor is needed. Big products stay in ``w``'s dtype.
    """
    from ._linalg import top_singular

    dims = list(w.shape)
    if w.dim() == 2:
        k = max(tl_ranks)
        if k > min(dims):
            return None
        u, _, v = top_singular(w, k, method, random_state=random_state, right=1 in modes)
        full = {0: u, 1: v}
        factors = [_sign_fix(full[m][:, :r]) for m, r in zip(modes, tl_ranks)]
        core = w
        if 0 in modes:
            core = factors[modes.index(0)].to(w.dtype).T @ core
        if 1 in modes:
            core = core @ factors[modes.index(1)].to(w.dtype)
        return core, factors
    if len(modes) != 1:
        return None
    mode, r = modes[0], tl_ranks[0]
    moved = w if mode == 0 else w.transpose(0, 1)
    unfolding = moved.reshape(dims[mode], -1)
    if r > min(unfolding.shape):
        return None
    u, _, _ = top_singular(unfolding, r, method, random_state=random_state, right=False)
    u = _sign_fix(u)
    core = (u.to(w.dtype).T @ unfolding).reshape(r, *moved.shape[1:])
    return (core if mode == 0 else core.transpose(0, 1)), [u]


def _relative_error_blocked(w: Tensor, first: Tensor | None, core: Tensor, last: Tensor | None) -> float:
    """``||W - Ŵ||_F / ||W||_F`` for a big weight, one block of output rows at a time.

    Products run in ``w``'s dtype (float32 for a big float32 weight), differences
    and sums in float64; no full-size reconstruction or float64 copy is made.
    """
    dt = w.dtype
    mid = core.to(dt)
    if first is not None:
        mid = torch.einsum("or...,ri->oi...", mid, first.to(dt))
    mid = mid.reshape(mid.shape[0], -1)
    rows = w.reshape(w.shape[0], -1)
    lastw = None if last is None else last.to(dt)
    step = max(1, _ERROR_BLOCK // max(rows.shape[1], 1))
    diff2 = ref2 = 0.0
    for i in range(0, rows.shape[0], step):
        ref = rows[i : i + step].double().reshape(-1)
        ref2 += float(torch.dot(ref, ref))
        ref.sub_((mid[i : i + step] if lastw is None else lastw[i : i + step] @ mid).reshape(-1))
        diff2 += float(torch.dot(ref, ref))
        del ref
    if ref2 == 0.0:
        return 0.0 if diff2 == 0.0 else float("inf")
    return math.sqrt(diff2 / ref2)


def _decompose(
    weight: Tensor,
    ranks: Sequence[int | None],
    *,
    n_iter_max: int,
    tol: float,
    random_state: int | None,
    svd: str,
) -> TuckerFactors:
    from ._linalg import is_large

    r_in, r_out = _check_ranks(ranks)
    if isinstance(n_iter_max, bool) or not isinstance(n_iter_max, numbers.Integral) or n_iter_max < 1:
        raise ValueError(f"n_iter_max: expected an int >= 1, got {n_iter_max!r}")
    if not isinstance(tol, numbers.Real) or not tol >= 0:
        raise ValueError(f"tol: expected a float >= 0, got {tol!r}")
    large = is_large(weight)
    method = _resolve_svd(svd, large)

    shape = tuple(weight.shape)
    c_out, c_in = shape[:2]
    kind = "conv2d" if len(shape) == 4 else "linear"
    for name, r, size, side in (("r_out", r_out, c_out, "output"), ("r_in", r_in, c_in, "input")):
        if r is not None and r > size:
            warnings.warn(
                f"{kind} weight {shape}: {name}={r} exceeds the {side} mode size {size}; "
                f"zero-padding the factors to rank {r} (exact, but the extra rank only adds cost)",
                UserWarning,
                stacklevel=3,
            )

    # tensorly cannot give more orthonormal columns than the mode has: decompose
    # at the clamped rank and zero-pad afterwards.
    modes: list[int] = []
    tl_ranks: list[int] = []
    if r_out is not None:
        modes.append(0)
        tl_ranks.append(min(r_out, c_out))
    if r_in is not None:
        modes.append(1)
        tl_ranks.append(min(r_in, c_in))

    # A big weight stays in its own precision: a float64 copy of VGG-16's fc6
    # alone would be 822 MB, 1.5x that model's whole float32 fc6 + fc7 + fc8.
    work_dtype = torch.float64
    if large:
        work_dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    src = weight.detach().to(device="cpu", dtype=work_dtype)
    nonzero = bool(float(torch.linalg.vector_norm(src)) > 0.0) if large else bool(src.any())

    closed = None
    if nonzero and (large or method == "randomized"):
        closed = _closed_form(src, modes, tl_ranks, method, random_state)
    if closed is not None:
        core = closed[0].numpy()
        factors = [f.numpy() for f in closed[1]]
    elif not nonzero:
        # HOOI divides by ||W||; an all-zero weight is represented exactly by
        # any orthonormal factors and a zero core.
        factors = [np.eye(shape[m], r) for m, r in zip(modes, tl_ranks)]
        core_shape = list(shape)
        for m, r in zip(modes, tl_ranks):
            core_shape[m] = r
        core = np.zeros(core_shape)
    else:
        # With a single mode, HOOI's update is the SVD of the same unfolding as
        # its SVD initialisation (already optimal), so one sweep suffices.
        iters = 1 if len(modes) == 1 else n_iter_max
        core, factors = _partial_tucker(
            src.numpy(), modes, tl_ranks, n_iter_max=iters, tol=tol, random_state=random_state, svd=method
        )

    u_out = factors[modes.index(0)] if r_out is not None else None
    u_in = factors[modes.index(1)] if r_in is not None else None
    del factors

    pad = [(0, 0)] * core.ndim
    if r_out is not None:
        pad[0] = (0, r_out - core.shape[0])
        u_out = np.pad(u_out, ((0, 0), (0, r_out - u_out.shape[1])))
    if r_in is not None:
        pad[1] = (0, r_in - core.shape[1])
        u_in = np.pad(u_in, ((0, 0), (0, r_in - u_in.shape[1])))
    if any(p != (0, 0) for p in pad):
        core = np.pad(core, pad)

    def to_weight(a: np.ndarray | None) -> Tensor | None:
        if a is None:
            return None
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.to(device=weight.device, dtype=weight.dtype).contiguous()

    first_t = to_weight(None if u_in is None else u_in.T)
    core_t = to_weight(core)
    last_t = to_weight(u_out)
    assert core_t is not None
    del core, u_in, u_out

    # Error of the factors actually returned (after the cast to weight.dtype).
    def cpu(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        return None if t is None else t.detach().to(device="cpu", dtype=dtype)

    if large:
        rel = _relative_error_blocked(src, cpu(first_t, work_dtype), cpu(core_t, work_dtype), cpu(last_t, work_dtype))
        return TuckerFactors(first=first_t, core=core_t, last=last_t, relative_error=rel)
    recon = (reconstruct_conv2d if kind == "conv2d" else reconstruct_linear)(
        cpu(first_t, torch.float64), cpu(core_t, torch.float64), cpu(last_t, torch.float64)
    )
    ref_norm = float(torch.linalg.vector_norm(src))
    diff_norm = float(torch.linalg.vector_norm(src - recon))
    if ref_norm == 0.0:
        rel = 0.0 if diff_norm == 0.0 else float("inf")
    else:
        rel = diff_norm / ref_norm
    return TuckerFactors(first=first_t, core=core_t, last=last_t, relative_error=rel)
