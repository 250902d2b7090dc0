"""Principal component analysis as a small torch module (used by DFM and DFKDE).

The fitted mean, components and per-component variances are float64 buffers, so a detector that
holds a :class:`PCA` round-trips through ``state_dict`` and moves with ``.to(device)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["PCA"]


class PCA(torch.nn.Module):
    """Principal component analysis fitted with a thin SVD of the centred data.

    ``fit(x, n_components)`` keeps ``n_components`` components when it is an int, or, when it is a
    float in (0, 1), the fewest leading components whose explained variance reaches that fraction
    of the total. Everything is computed in float64: DFM's reconstruction error is a small
    difference of large vectors, which float32 would blur.
    """

    def __init__(self) -> None:
        super().__init__()
        # mean: D; components: k x D orthonormal rows, the leading principal directions;
        # explained_variance: k, the (unbiased) variance of the data along each component.
        self.register_buffer("mean", torch.empty(0, dtype=torch.float64))
        self.register_buffer("components", torch.empty(0, 0, dtype=torch.float64))
        self.register_buffer("explained_variance", torch.empty(0, dtype=torch.float64))

    @property
    def fitted(self) -> bool:
        return self.components.shape[0] > 0

    @property
    def n_components(self) -> int:
        return self.components.shape[0]

    @torch.no_grad()
    def fit(self, x: Tensor, n_components: int | float) -> PCA:
        """Fit on the rows of the ``N x D`` matrix ``x`` (N >= 2); return ``self``.

        An int ``n_components`` is capped at ``min(N, D)``, the most an SVD of ``x`` gives;
        directions past the data's rank (``N - 1`` after centring) then have zero variance.
        """
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"PCA needs an N x D matrix with N >= 2, got {tuple(x.shape)}")
        x = x.detach().double()
        mean = x.mean(0)
        _, singular, vh = torch.linalg.svd(x - mean, full_matrices=False)
        variance = singular.square() / (x.shape[0] - 1)
        if isinstance(n_components, float):
            if not 0.0 < n_components <= 1.0:
                raise ValueError(f"a variance level must be in (0, 1], got {n_components}")
            total = variance.sum()
            if total <= 0:
                raise ValueError("PCA: the data has no variance (all rows are identical)")
            cumulative = variance.cumsum(0) / total
            # The fewest components reaching the level; the tolerance keeps level 1.0 (and levels
            # a rounding error above the last cumulative value) from running past the end.
            reached = cumulative >= n_components - 1e-12
            k = int(reached.nonzero()[0, 0]) + 1 if reached.any() else variance.numel()
        else:
            if n_components < 1:
                raise ValueError(f"n_components must be >= 1, got {n_components}")
            k = min(int(n_components), variance.numel())
        self.mean = mean
        self.components = vh[:k].contiguous()
        self.explained_variance = variance[:k].contiguous()
        return self

    def transform(self, x: Tensor) -> Tensor:
        """``N x k`` coordinates of the rows of ``x`` along the components (float64)."""
        return (x.double() - self.mean) @ self.components.T

    def inverse_transform(self, z: Tensor) -> Tensor:
        """``N x D`` points of the data space with coordinates ``z`` (float64)."""
        return z.double() @ self.components + self.mean

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The shapes are only known after fit: take the stored ones.
        for name in ("mean", "components", "explained_variance"):
            key = prefix + name
            if key in state_dict:
                current = getattr(self, name)
                setattr(self, name, torch.empty_like(state_dict[key], device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
