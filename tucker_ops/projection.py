"""Decomposing the input: a Tucker projection of image batches onto a few features.

The thesis's second experiment reduces MNIST inputs before a small MLP: the
training tensor ``X`` (N, H, W) is Tucker-decomposed along its two spatial modes,
``X ≈ G ×₁ U_h ×₂ U_w`` with ``U_h`` (H, r_h) and ``U_w`` (W, r_w) orthonormal
and the sample mode left whole, and an image ``x`` (H, W) becomes the
``r_h·r_w`` features ``U_hᵀ x U_w``.

The factors are fitted by tensorly's ``partial_tucker`` (HOOI from an SVD start)
along the two spatial modes, as every decomposition in this package is.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["TuckerProjection", "projection_ranks"]


class TuckerProjection(nn.Module):
    """Project images ``(N, H, W)`` (or ``(N, 1, H, W)``) onto ``r_h·r_w`` Tucker features.

    Fit with :meth:`fit`; the factors are buffers (saved in ``state_dict``, not trained).

    Attributes:
        ranks: ``(r_h, r_w)``.
        u_h: ``(H, r_h)``, orthonormal columns.
        u_w: ``(W, r_w)``, orthonormal columns.
        mean: ``(H, W)``, subtracted before projecting when fitted with ``center=True``
            (zeros otherwise).
    """

    def __init__(self, image_shape: tuple[int, int], ranks: tuple[int, int]) -> None:
        super().__init__()
        h, w = (int(s) for s in image_shape)
        r_h, r_w = (int(r) for r in ranks)
        for side, rank, size in (("height", r_h, h), ("width", r_w, w)):
            if not 1 <= rank <= size:
                raise ValueError(f"TuckerProjection: expected the {side} rank in [1, {size}], but got {rank}")
        self.image_shape = (h, w)
        self.ranks = (r_h, r_w)
        self.register_buffer("u_h", torch.eye(h, r_h))
        self.register_buffer("u_w", torch.eye(w, r_w))
        self.register_buffer("mean", torch.zeros(h, w))
        self.relative_error: float | None = None

    @property
    def out_features(self) -> int:
        return self.ranks[0] * self.ranks[1]

    @classmethod
    def fit(
        cls,
        images: Tensor,
        ranks: tuple[int, int],
        *,
        center: bool = False,
        n_iter: int = 10,
        tol: float = 1e-7,
    ) -> TuckerProjection:
        """Tucker-decompose ``images`` (N, H, W) along H and W at ``ranks`` (r_h, r_w).

        Args:
            images: the training tensor; any real dtype (computed in float64).
            center: subtract the mean image first (a PCA-like projection); the thesis
                decomposed the raw tensor, the default.
            n_iter: at most this many HOOI sweeps (tensorly's ``n_iter_max``).
            tol: tensorly's convergence tolerance on the reconstruction error.
        """
        x = _as_stack(images, "images").double()
        n, h, w = x.shape
        if n == 0:
            raise ValueError("TuckerProjection.fit: expected at least one image, but got an empty batch")
        proj = cls((h, w), ranks)
        mean = x.mean(0) if center else torch.zeros(h, w, dtype=torch.float64)
        x = x - mean
        r_h, r_w = proj.ranks
        # tensorly's partial_tucker (HOOI from an SVD start) along the two spatial
        # modes; the sample mode stays whole, so the core holds each image's features.
        from .decompose import _partial_tucker

        _, (u_h, u_w) = _partial_tucker(
            x.numpy(), modes=[1, 2], ranks=[r_h, r_w], n_iter_max=n_iter, tol=tol, random_state=0
        )
        u_h = _sign_fix(torch.from_numpy(u_h))
        u_w = _sign_fix(torch.from_numpy(u_w))
        total = float((x * x).sum())
        core = torch.einsum("hr,nhw,ws->nrs", u_h, x, u_w)
        captured = float((core * core).sum())
        proj.u_h.copy_(u_h.float())
        proj.u_w.copy_(u_w.float())
        proj.mean.copy_(mean.float())
        # Orthonormal factors: ||X - X̂||² = ||X||² - ||core||².
        proj.relative_error = math.sqrt(max(total - captured, 0.0) / total) if total > 0 else 0.0
        return proj

    def forward(self, images: Tensor) -> Tensor:
        """``(N, H, W)`` or ``(N, 1, H, W)`` -> features ``(N, r_h·r_w)``."""
        x = _as_stack(images, "images", self.image_shape).to(self.u_h.dtype) - self.mean
        return torch.einsum("hr,nhw,ws->nrs", self.u_h, x, self.u_w).flatten(1)

    def reconstruct(self, features: Tensor) -> Tensor:
        """Features ``(N, r_h·r_w)`` -> images ``(N, H, W)``: ``U_h F U_wᵀ + mean``."""
        if features.dim() != 2 or features.shape[1] != self.out_features:
            raise ValueError(f"TuckerProjection.reconstruct: expected features (N, {self.out_features}), but got {tuple(features.shape)}")
        core = features.reshape(-1, *self.ranks).to(self.u_h.dtype)
        return torch.einsum("hr,nrs,ws->nhw", self.u_h, core, self.u_w) + self.mean

    def extra_repr(self) -> str:
        return f"image_shape={self.image_shape}, ranks={self.ranks}, out_features={self.out_features}"


def projection_ranks(features: int, image_shape: tuple[int, int] = (28, 28)) -> tuple[int, int]:
    """Mode ranks ``(r_h, r_w)`` with ``r_h·r_w == features`` and the two as close as possible.

    15 -> (3, 5), 100 -> (10, 10), 200 -> (10, 20).

    Raises:
        ValueError: no factorisation of ``features`` fits the image shape.
    """
    h, w = image_shape
    best: tuple[int, int] | None = None
    for r_h in range(1, h + 1):
        if features % r_h == 0 and features // r_h <= w:
            r_w = features // r_h
            if r_h <= r_w and (best is None or r_w - r_h < best[1] - best[0]):
                best = (r_h, r_w)
    if best is None:
        raise ValueError(f"projection_ranks: {features} features cannot be written r_h·r_w with r_h <= {h}, r_w <= {w}")
    return best


def _sign_fix(u: Tensor) -> Tensor:
    # Fix each column's sign (largest entry positive) so fits are reproducible across LAPACKs.
    signs = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
    return u * torch.where(signs == 0, torch.ones_like(signs), signs)


def _as_stack(images: Tensor, name: str, shape: tuple[int, int] | None = None) -> Tensor:
    if images.dim() == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.dim() != 3 or (shape is not None and tuple(images.shape[1:]) != shape):
        want = f"(N, {shape[0]}, {shape[1]})" if shape else "(N, H, W)"
        raise ValueError(f"TuckerProjection: expected {name} of shape {want} or (N, 1, H, W), but got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    return images
