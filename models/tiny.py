"""The smallest configuration of each detector that still runs its whole training step.

``sweep run --smoke`` builds every detector of a study this way (random-init resnet18, one
epoch, narrow heads) to check on a CPU that the study runs end to end; the contract tests of the
zoo use it too. What a detector learns is checked by its own tests, not here.
"""

from __future__ import annotations

from typing import Any

from models.base import hyperparameters

TINY_BACKBONE = "resnet18"

TINY_HPARAMS: dict[str, dict[str, Any]] = {
    "cflow": {"backbone": "resnet18", "layers": ("layer2", "layer3"), "coupling_blocks": 1},
    # CS-Flow reads one EfficientNet stage; blocks.3 is the deepest one left at 64 px.
    "csflow": {"backbone": "efficientnet_b0", "layer": "blocks.3", "hidden_channels": 16},
    "cutpaste": {"head_dims": (32,)},
    "draem": {"reconstructive_channels": 4, "discriminative_channels": 4, "score_kernel": 5},
    "dsr": {
        "hidden_channels": 8,
        "residual_channels": 4,
        "n_residual_layers": 1,
        "embedding_dim": 8,
        "num_embeddings": 16,
        "unet_width": 4,
        "score_filter_size": 5,
    },
    "efficient_ad_ast": {
        "layers": ("layer2",),
        "n_coupling_blocks": 1,
        "teacher_hidden_channels": 16,
        "teacher_epochs": 1,
        "student_hidden_channels": 16,
        "n_student_blocks": 1,
    },
    "fastflow": {"flow_steps": 1},
    "ganomaly": {"n_features": 8, "latent_dim": 16},
    "memseg": {"memory_size": 2},
    "mmr": {"patch_size": 8, "vit_embed_dim": 32, "vit_depth": 1, "vit_heads": 2},
    "reverse_distillation": {"backbone": "resnet18"},
    "skip_ganomaly": {"n_features": 8, "latent_dim": 16},
    "stfpm": {"layers": ("layer1", "layer2")},
    # Supervised: layer3 is 4x4 at 64 px (layer4 would be 2x2); a narrow decoder.
    "supervised_classifier": {"layer": "layer3"},
    "supervised_segmentation": {"layers": ("layer1", "layer2"), "hidden_channels": 8},
    "uflow": {"flow_steps": 1},
}
"""Per detector, the hyperparameters that shrink it (on top of :func:`tiny_hparams`' rules)."""


def tiny_hparams(name: str) -> dict[str, Any]:
    """The tiny configuration of detector ``name``: no pretrained weights, resnet18 where it
    takes a backbone (unless its table entry names another), and its :data:`TINY_HPARAMS`."""
    known = hyperparameters(name)
    config: dict[str, Any] = {}
    if "pretrained" in known:
        config["pretrained"] = False
    if "backbone" in known:
        config["backbone"] = TINY_BACKBONE
    return {**config, **TINY_HPARAMS.get(name, {})}
