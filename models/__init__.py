"""The detector zoo: ``models.create(name, **hparams)`` builds any registered detector."""

from models.base import (
    Batch,
    Detector,
    ModelError,
    Prediction,
    backbone_problem,
    check_backbone,
    compatible_backbones,
    create,
    get_class,
    hyperparameters,
    list_models,
    register,
)

# Detector modules register themselves on import.
from models import cfa, cflow, dfkde, dfm, fastflow, padim, patchcore, stfpm  # noqa: F401  isort: skip

__all__ = [
    "Batch",
    "Detector",
    "ModelError",
    "Prediction",
    "backbone_problem",
    "check_backbone",
    "compatible_backbones",
    "create",
    "get_class",
    "hyperparameters",
    "list_models",
    "register",
]
