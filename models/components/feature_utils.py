"""Small feature-map operations shared by the feature-embedding detectors."""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["NearestNeighbors", "concat_to_first", "gaussian_blur", "upsample_maps"]


def concat_to_first(features: Sequence[Tensor], mode: str = "bilinear") -> Tensor:
    """Resize every ``B x C_i x h_i x w_i`` map to the first one's size and concatenate channels."""
    size = features[0].shape[-2:]
    resized = [features[0]]
    for feature in features[1:]:
        if feature.shape[-2:] != size:
            kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
            feature = F.interpolate(feature, size=size, mode=mode, **kwargs)
        resized.append(feature)
    return torch.cat(resized, dim=1)


def upsample_maps(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinearly resize ``B x h x w`` maps to ``B x H x W`` (``size = (H, W)``)."""
    return F.interpolate(maps.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False)[
        :, 0
    ]


def _gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Truncated at 4 sigma, as scipy.ndimage.gaussian_filter does.
    radius = max(1, int(4.0 * sigma + 0.5))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Gaussian-smooth ``B x H x W`` maps (separable, truncated at 4 sigma, edges replicated).

    ``sigma <= 0`` returns the maps unchanged.
    """
    if sigma <= 0:
        return maps
    kernel = _gaussian_kernel(sigma, maps.dtype, maps.device)
    radius = kernel.numel() // 2
    x = maps.unsqueeze(1)
    # Replicate padding works at any map size (reflect needs the map wider than the kernel).
    x = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0]


class NearestNeighbors:
    """Exact Euclidean k-nearest-neighbour search in a fixed ``N x D`` set of vectors.

    On the CPU it uses a ``faiss.IndexFlatL2`` run with as many threads as torch uses; on other
    devices (CUDA) it searches with blocked matrix products on the device and never calls faiss,
    even where a GPU build of faiss is installed: faiss would take the bank and the queries as
    host arrays (a copy each way), and its exact GPU index does the same product and top-k
    (``docs/architecture.md``). ``backend`` forces one (``"faiss"`` copies the vectors to the CPU).
    """

    def __init__(self, vectors: Tensor, backend: str | None = None) -> None:
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"need a non-empty N x D set of vectors, got {tuple(vectors.shape)}")
        if backend is None:
            backend = "faiss" if vectors.device.type == "cpu" else "torch"
        if backend not in ("faiss", "torch"):
            raise ValueError(f"backend must be 'faiss' or 'torch', got {backend!r}")
        self.backend = backend
        self.vectors = vectors.detach().float()
        self._index = None
        if backend == "faiss":
            self._index = faiss.IndexFlatL2(vectors.shape[1])
            self._index.add(np.ascontiguousarray(self.vectors.cpu().numpy()))

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def search(self, queries: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """Distances (Euclidean, not squared) and indices of each query's ``k`` nearest vectors.

        Both are ``Q x k``, nearest first, on the queries' device.
        """
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be between 1 and the {len(self)} vectors, got {k}")
        queries = queries.detach().float()
        if self._index is not None:
            faiss.omp_set_num_threads(torch.get_num_threads())
            squared, indices = self._index.search(np.ascontiguousarray(queries.cpu().numpy()), k)
            squared = torch.from_numpy(squared).to(queries.device)
            indices = torch.from_numpy(indices).to(queries.device)
        else:
            squared, indices = self._search_torch(queries.to(self.vectors.device), k)
            squared, indices = squared.to(queries.device), indices.to(queries.device)
        return squared.clamp_min_(0).sqrt_(), indices

    def _search_torch(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        vectors = self.vectors
        vector_norms = vectors.square().sum(1)
        # Blocks of queries bound the Q x N distance matrix to about 64M entries.
        block = max(1, min(queries.shape[0], (1 << 26) // max(1, len(self))))
        all_squared, all_indices = [], []
        for start in range(0, queries.shape[0], block):
            q = queries[start : start + block]
            squared = q.square().sum(1, keepdim=True) - 2.0 * q @ vectors.T + vector_norms
            values, indices = torch.topk(squared, k, dim=1, largest=False, sorted=True)
            all_squared.append(values)
            all_indices.append(indices)
        return torch.cat(all_squared), torch.cat(all_indices)
