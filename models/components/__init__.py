"""Building blocks shared by several detectors (coreset selection, feature-map utilities)."""

from models.components.coreset import greedy_coreset, naive_greedy_coreset
from models.components.feature_utils import (
    NearestNeighbors,
    concat_to_first,
    gaussian_blur,
    upsample_maps,
)

__all__ = [
    "NearestNeighbors",
    "concat_to_first",
    "gaussian_blur",
    "greedy_coreset",
    "naive_greedy_coreset",
    "upsample_maps",
]
