"""TuckerProjection: shapes, exact reconstruction at full rank, the HOOI fit, rank choice."""

from __future__ import annotations

import pytest
import torch

from tucker_ops.projection import TuckerProjection, projection_ranks


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # Low multilinear rank plus a little noise, so truncation has something to find.
    core = torch.randn(64, 4, 3, generator=g)
    u_h, u_w = torch.randn(12, 4, generator=g), torch.randn(10, 3, generator=g)
    return torch.einsum("nab,ha,wb->nhw", core, u_h, u_w) + 0.01 * torch.randn(64, 12, 10, generator=g)


@pytest.mark.parametrize("ranks", [(1, 1), (3, 5), (12, 10)])
def test_shapes(images: torch.Tensor, ranks: tuple[int, int]) -> None:
    proj = TuckerProjection.fit(images, ranks)
    assert proj.out_features == ranks[0] * ranks[1]
    assert proj(images).shape == (64, ranks[0] * ranks[1])
    assert proj(images[:, None]).shape == (64, ranks[0] * ranks[1])  # (N, 1, H, W) as well
    assert proj.reconstruct(proj(images[:5])).shape == (5, 12, 10)
    assert torch.allclose(proj.u_h.T @ proj.u_h, torch.eye(ranks[0]), atol=1e-5)
    assert torch.allclose(proj.u_w.T @ proj.u_w, torch.eye(ranks[1]), atol=1e-5)


@pytest.mark.parametrize("center", [False, True])
def test_full_rank_reconstruction_is_exact(images: torch.Tensor, center: bool) -> None:
    proj = TuckerProjection.fit(images, (12, 10), center=center)
    assert torch.allclose(proj.reconstruct(proj(images)), images, atol=1e-4)
    assert proj.relative_error == pytest.approx(0.0, abs=1e-6)


def test_true_rank_is_recovered(images: torch.Tensor) -> None:
    proj = TuckerProjection.fit(images, (4, 3))
    err = (proj.reconstruct(proj(images)) - images).norm() / images.norm()
    assert err < 0.01
    assert proj.relative_error == pytest.approx(float(err), rel=1e-3, abs=1e-5)
    worse = TuckerProjection.fit(images, (2, 2))
    assert worse.relative_error > 0.1


def test_uint8_images_are_scaled() -> None:
    x = torch.randint(0, 256, (20, 6, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    proj = TuckerProjection.fit(x, (6, 5))
    assert torch.allclose(proj.reconstruct(proj(x)), x.float() / 255, atol=1e-5)


def test_state_dict_round_trip(images: torch.Tensor) -> None:
    proj = TuckerProjection.fit(images, (3, 2))
    other = TuckerProjection((12, 10), (3, 2))
    other.load_state_dict(proj.state_dict())
    assert torch.equal(other(images), proj(images))


def test_bad_arguments(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="height rank in \\[1, 12\\], but got 13"):
        TuckerProjection.fit(images, (13, 2))
    with pytest.raises(ValueError, match="width rank in \\[1, 10\\], but got 0"):
        TuckerProjection((12, 10), (2, 0))
    proj = TuckerProjection.fit(images, (2, 2))
    with pytest.raises(ValueError, match="expected images of shape \\(N, 12, 10\\)"):
        proj(torch.zeros(3, 10, 12))
    with pytest.raises(ValueError, match="expected features \\(N, 4\\)"):
        proj.reconstruct(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="at least one image"):
        TuckerProjection.fit(images[:0], (2, 2))


def test_projection_ranks() -> None:
    assert projection_ranks(15) == (3, 5)
    assert projection_ranks(100) == (10, 10)
    assert projection_ranks(200) == (10, 20)
    assert projection_ranks(784) == (28, 28)
    with pytest.raises(ValueError, match="29 features"):
        projection_ranks(29)
