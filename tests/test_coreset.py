"""Greedy k-center coreset: exactly the naive algorithm, deterministic, a real k-center cover."""

from __future__ import annotations

import pytest
import torch

from models.components.coreset import (
    coreset_size,
    greedy_coreset,
    naive_greedy_coreset,
    random_projection,
)


def clustered_points(n: int, dim: int, seed: int) -> torch.Tensor:
    """Anisotropic clusters with exact duplicates, so that pruning and ties both matter."""
    generator = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.randn(12, dim, generator=generator)
    scales = torch.rand(dim, generator=generator) + 0.1
    labels = torch.randint(12, (n,), generator=generator)
    points = centres[labels] + scales * torch.randn(n, dim, generator=generator)
    points[n // 2 : n // 2 + 50] = points[0]  # 50 copies of one point
    return torch.relu(points)  # non-negative, like post-ReLU features


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("projection_dim", [32, None])
def test_selects_exactly_what_the_naive_algorithm_selects(seed, projection_dim):
    features = clustered_points(3000, 96, seed)
    kwargs = {"projection_dim": projection_dim}
    fast = greedy_coreset(features, 0.1, generator=torch.Generator().manual_seed(seed), **kwargs)
    naive = naive_greedy_coreset(
        features, 0.1, generator=torch.Generator().manual_seed(seed), **kwargs
    )
    assert torch.equal(fast, naive)


def test_selects_exactly_the_naive_indices_on_isotropic_noise():
    # Little structure: the pruning bounds are loose and most points stay candidates.
    features = torch.randn(2000, 20, generator=torch.Generator().manual_seed(4))
    fast = greedy_coreset(features, 300, generator=torch.Generator().manual_seed(4))
    naive = naive_greedy_coreset(features, 300, generator=torch.Generator().manual_seed(4))
    assert torch.equal(fast, naive)


def test_deterministic_for_a_seed_and_seed_dependent():
    features = clustered_points(2000, 64, seed=3)
    first = greedy_coreset(features, 100, generator=torch.Generator().manual_seed(11))
    again = greedy_coreset(features, 100, generator=torch.Generator().manual_seed(11))
    other = greedy_coreset(features, 100, generator=torch.Generator().manual_seed(12))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(greedy_coreset(features, 100), greedy_coreset(features, 100))


def test_returns_distinct_indices_of_the_requested_count():
    features = clustered_points(1000, 16, seed=5)
    indices = greedy_coreset(features, 137, projection_dim=None)
    assert indices.dtype == torch.long
    assert indices.shape == (137,)
    assert len(set(indices.tolist())) == 137
    assert int(indices.min()) >= 0 and int(indices.max()) < 1000
    assert greedy_coreset(features, 0.25).shape == (250,)
    # Asking for every point returns a permutation of all of them.
    assert sorted(greedy_coreset(features[:40], 40).tolist()) == list(range(40))


def test_is_a_greedy_k_center_cover():
    # Each centre was the farthest point when chosen, so the final covering radius is at most
    # the smallest distance between two centres (the classic 2-approximation argument).
    features = clustered_points(1500, 8, seed=6)
    indices = greedy_coreset(features, 60, projection_dim=None)
    centres = features[indices]
    covering_radius = torch.cdist(features, centres).min(dim=1).values.max()
    between = torch.cdist(centres, centres) + torch.eye(len(centres)) * 1e9
    assert covering_radius <= between.min() * (1 + 1e-5)
    # ... and it covers far better than the same number of random points.
    random_centres = features[torch.randperm(1500, generator=torch.Generator().manual_seed(0))[:60]]
    random_radius = torch.cdist(features, random_centres).min(dim=1).values.max()
    assert covering_radius < random_radius


def test_random_projection_roughly_preserves_distances():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 512, generator=generator)
    projected = random_projection(features, 128, torch.Generator().manual_seed(1))
    assert projected.shape == (200, 128)
    ratio = torch.pdist(projected) / torch.pdist(features)
    assert 0.9 < float(ratio.mean()) < 1.1
    assert torch.equal(random_projection(features, None, generator), features)
    assert torch.equal(random_projection(features, 1024, generator), features)


def test_coreset_size():
    assert coreset_size(1000, 0.1) == 100
    assert coreset_size(1000, 1e-6) == 1
    assert coreset_size(1000, 1.0) == 1000
    assert coreset_size(1000, 250) == 250
    for bad in (0.0, 1.5, float("nan"), 0, 1001, True, "10"):
        with pytest.raises(ValueError):
            coreset_size(1000, bad)


def test_bad_features_are_errors():
    with pytest.raises(ValueError, match="N x D"):
        greedy_coreset(torch.zeros(10), 2)
    with pytest.raises(ValueError, match="N x D"):
        greedy_coreset(torch.zeros(0, 4), 2)
    with pytest.raises(ValueError, match="NaN"):
        greedy_coreset(torch.full((10, 4), float("nan")), 2)
