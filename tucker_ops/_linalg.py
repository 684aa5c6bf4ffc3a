"""Spectra and leading singular vectors of big weight matrices in bounded memory.

Rank selection needs every singular value of a mode unfolding, and Tucker-1 needs
its leading left singular vectors. LAPACK's SVD of a ``4096 x 25088`` float32
matrix (VGG-16's fc6) takes minutes on two cores and a float64 copy of it is
twice the layer, so above :data:`LARGE_NUMEL` elements the work goes through the
Gram matrix of the smaller side (float64, accumulated block by block, never a
float64 copy of the whole weight) or a randomized range finder in the weight's
own precision. Below it, callers keep their exact float64 LAPACK paths.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["LARGE_NUMEL", "all_finite", "gram", "is_large", "singular_values", "top_singular"]

# 2**22 elements (16 MiB in float32): VGG-16's 3x3 convolutions (<= 2.4M) stay on the
# exact LAPACK paths, its three Linear layers (4.1M, 16.8M, 102.8M) are above.
LARGE_NUMEL = 1 << 22

# Elements per block when a big matrix is converted or reduced piecewise (32 MiB in float64).
_BLOCK_NUMEL = 1 << 22


def is_large(t: Tensor) -> bool:
    """Whether ``t`` is big enough for the bounded-memory paths."""
    return t.numel() >= LARGE_NUMEL


def all_finite(t: Tensor) -> bool:
    """``torch.isfinite(t).all()`` without allocating a mask (or a float64 copy) the size of ``t``.

    A sum is finite when every element is, unless finite values overflow it; so
    a finite sum settles it, and only a non-finite one is checked element-wise,
    one block of rows at a time. (``t.sum(dtype=torch.float64)`` would convert
    the whole tensor first: +822 MB on VGG-16's fc6.)
    """
    if not is_large(t):
        return bool(torch.isfinite(t).all())
    if math.isfinite(float(t.sum())):
        return True
    rows = t.reshape(t.shape[0], -1)
    step = max(1, _BLOCK_NUMEL // max(rows.shape[1], 1))
    return all(bool(torch.isfinite(rows[i : i + step]).all()) for i in range(0, rows.shape[0], step))


def gram(a: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """``a @ a.T`` multiplied in ``dtype``, returned in float64 (``a`` is ``(m, n)``, the result ``(m, m)``).

    Only the upper block triangle is multiplied (the Gram matrix is symmetric),
    and rows are converted to ``dtype`` one block at a time, so a float32 ``a``
    never gets a float64 copy.
    """
    m, n = a.shape
    out = torch.empty(m, m, dtype=torch.float64, device=a.device)
    step = max(64, min(m, _BLOCK_NUMEL // max(n, 1)))
    blocks = [(i, min(i + step, m)) for i in range(0, m, step)]
    for bi, (i0, i1) in enumerate(blocks):
        left = a[i0:i1].to(dtype)
        for j0, j1 in blocks[bi:]:
            right = left if j0 == i0 else a[j0:j1].to(dtype)
            prod = left @ right.T
            out[i0:i1, j0:j1] = prod
            if j0 != i0:
                out[j0:j1, i0:i1] = prod.T
        del left
    return out


def singular_values(a: Tensor) -> np.ndarray:
    """All ``min(m, n)`` singular values of the 2-d ``a``, descending, as float64.

    Small matrices: LAPACK's SVD in float64. Large ones: square roots of the
    eigenvalues of the smaller side's Gram matrix, accumulated in ``a``'s
    precision (float32 for a float32 weight: the spectrum agrees with
    ``torch.linalg.svdvals`` to ~1e-5 relative on VGG-16's fc6, far below what rank
    selection can resolve) and diagonalised in float64.
    """
    if not is_large(a):
        # NumPy's LAPACK call: torch.linalg.svdvals was ~100x slower on CPU here.
        return np.linalg.svd(a.detach().to(device="cpu", dtype=torch.float64).numpy(), compute_uv=False)
    a = a.detach().cpu()
    if a.shape[0] > a.shape[1]:
        a = a.T
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    evals = torch.linalg.eigvalsh(gram(a, acc))
    return evals.clamp_min_(0.0).sqrt_().flip(0).numpy()


def top_singular(
    a: Tensor, k: int, method: str, *, random_state: int | None = 0, n_power_iter: int = 4, right: bool = True
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Leading ``k`` singular triplets ``(U (m, k), S (k,), V (n, k))`` of ``a`` ``(m, n)``.

    ``k <= min(m, n)``. The big products run in ``a``'s dtype; U and V come back in
    float64 with orthonormal columns. ``right=False`` skips V where it would cost
    an extra product (it is then None).

    Args:
        method: ``"exact"``: eigendecomposition of the smaller side's Gram matrix
            in float64 (the exact SVD's subspace, to float64 rounding of the Gram
            matrix); ``"randomized"``: Halko, Martinsson and Tropp's range finder
            with ``k + max(10, k // 10)`` samples and ``n_power_iter`` power
            iterations, re-orthonormalised each pass.
        random_state: seed of the random test matrix.
    """
    m, n = a.shape
    if not 1 <= k <= min(m, n):
        raise ValueError(f"k: expected 1 <= k <= min(m, n) = {min(m, n)}, got {k}")
    a = a.detach().cpu()
    work = a.dtype if a.dtype in (torch.float32, torch.float64) else torch.float32
    if method == "exact":
        transpose = m > n
        src = a.T if transpose else a
        evals, evecs = torch.linalg.eigh(gram(src))
        order = torch.argsort(evals, descending=True)[:k]
        s = evals[order].clamp_min(0.0).sqrt()
        u = evecs[:, order]
        del evecs
        if not (right or transpose):
            return u, s, None
        # The other side's vectors: src.T u / s, orthonormalised against rounding.
        v = (src.T @ u.to(src.dtype)).double()
        v = torch.linalg.qr(v / s.clamp_min(torch.finfo(torch.float64).tiny)).Q
        return (v, s, u) if transpose else (u, s, v)
    if method != "randomized":
        raise ValueError(f"method: expected 'exact' or 'randomized', got {method!r}")
    a = a.to(work)
    samples = min(k + max(10, k // 10), min(m, n))
    gen = torch.Generator().manual_seed(0 if random_state is None else int(random_state))
    omega = torch.randn(n, samples, generator=gen, dtype=work)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(n_power_iter):
        q = torch.linalg.qr(a.T @ q).Q
        q = torch.linalg.qr(a @ q).Q
    b = (q.T @ a).double()  # (samples, n)
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = q.double() @ ub[:, :k]
    return u, s[:k], vh[:k].T
