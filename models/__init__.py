"""The detector zoo: ``models.create(name, **hparams)`` builds any registered detector."""

from models.base import (
    Batch,
    Detector,
    Prediction,
    backbone_problem,
    check_backbone,
    compatible_backbones,
    create,
    get_class,
    hyperparameters,
    list_models,
    register,
    trial_hyperparameters,
)
from models.errors import ModelError

# Detector modules register themselves on import.
from models import (  # noqa: F401  isort: skip
    autoencoder,
    cfa,
    cflow,
    csflow,
    cutpaste,
    dfkde,
    dfm,
    draem,
    dsr,
    efficient_ad,
    efficient_ad_ast,
    fastflow,
    ganomaly,
    memseg,
    mmr,
    padim,
    patchcore,
    reverse_distillation,
    simplenet,
    skip_ganomaly,
    stfpm,
    supervised_classifier,
    supervised_segmentation,
    uflow,
)

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
    "trial_hyperparameters",
]
