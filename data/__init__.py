"""Data sets for anomaly-sweep: the synthetic glue-line generator, in-memory loaders for the
MVTec AD and folder layouts, synthetic anomaly generators (``data.anomalies``), training
augmentations (``data.augment``) and test-time stress perturbations (``data.stress``).

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
from data.augment import (
    BUILTIN_AUGMENTATIONS,
    AugmentationSet,
    Augmenter,
    TransformSpec,
    augmentation_sets,
    parse_augmentation_sets,
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
from data.stress import BUILTIN_STRESSES, STRESS_KINDS, StressSpec, apply_stress, parse_stresses
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
    "BUILTIN_AUGMENTATIONS",
    "BUILTIN_STRESSES",
    "DATASET_KINDS",
    "DEFECT_TYPES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "PARTS",
    "STRESS_KINDS",
    "SYNTHETIC_KINDS",
    "AnomalyDataset",
    "AugmentationSet",
    "Augmenter",
    "CutPaste",
    "DatasetError",
    "DatasetSplits",
    "GlueSetConfig",
    "LocalWarp",
    "PartSpec",
    "PerlinBlend",
    "StressSpec",
    "TransformSpec",
    "apply_stress",
    "augmentation_sets",
    "ensure_generated",
    "generate",
    "load_dataset",
    "load_folder",
    "load_mvtec",
    "load_synthetic_glue",
    "normalize",
    "parse_augmentation_sets",
    "parse_stresses",
    "perlin_mask",
    "perlin_noise",
    "render_defect",
    "render_normal",
    "synthesize",
]
