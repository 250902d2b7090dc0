"""Data sets for anomaly-sweep: the synthetic glue-line generator, in-memory loaders for the
MVTec AD and folder layouts, and synthetic anomaly generators (``data.anomalies``).

``data`` never imports ``sweep``: the engine calls :func:`load_dataset` and nothing else needs
to know where images come from.
"""

from data.anomalies import (
    SYNTHETIC_KINDS,
    CutPaste,
    LocalWarp,
    PerlinBlend,
    perlin_mask,
    perlin_noise,
    synthesize,
)
from data.datasets import (
    DATASET_KINDS,
    IMAGE_SUFFIXES,
    AnomalyDataset,
    DatasetSplits,
    load_dataset,
    load_folder,
    load_mvtec,
    load_synthetic_glue,
)
from data.errors import DatasetError
from data.synthetic_glue import (
    DEFECT_TYPES,
    PARTS,
    GlueSetConfig,
    PartSpec,
    ensure_generated,
    generate,
    render_defect,
    render_normal,
)
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize

__all__ = [
    "DATASET_KINDS",
    "DEFECT_TYPES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "PARTS",
    "SYNTHETIC_KINDS",
    "AnomalyDataset",
    "CutPaste",
    "DatasetError",
    "DatasetSplits",
    "GlueSetConfig",
    "LocalWarp",
    "PartSpec",
    "PerlinBlend",
    "ensure_generated",
    "generate",
    "load_dataset",
    "load_folder",
    "load_mvtec",
    "load_synthetic_glue",
    "normalize",
    "perlin_mask",
    "perlin_noise",
    "render_defect",
    "render_normal",
    "synthesize",
]
