"""EfficientAD (Batzner et al., "EfficientAD: Accurate Visual Anomaly Detection at
Millisecond-Level Latencies", WACV 2024).

A student-teacher detector built for speed. The teacher is a small patch description network
(PDN: four convolutions, 33 x 33 receptive field) distilled from a WideResNet-101 on ImageNet and
then frozen; its outputs are normalised per channel with statistics of the training images. A
student PDN with twice the output channels learns, on normal images, (1) to predict the teacher
with a hard feature loss (only its worst-predicted elements count) and a penalty that keeps its
output near zero on ImageNet images, and (2) in its second half, to predict the output of a
convolutional autoencoder, which itself reconstructs the teacher's features through a 1 x 1
bottleneck and so learns the global, logical layout of normal images. At test time the
student-teacher difference gives a local anomaly map (structural defects) and the
student-autoencoder difference a global one (logical defects: the student learned the
autoencoder's systematic errors on normal images only). Each is normalised so that its 0.9 and
0.995 quantiles on held-out normal images map to 0 and 0.1, the two are averaged and upsampled;
the image score is the map's maximum.

Outside data is optional here: ``teacher_weights`` (a PDN distilled as in the paper) and
``imagenet_dir`` (images for the penalty). Without them the teacher is randomly initialised and
the penalty is dropped; ``fit`` says so in ``stats["notes"]``, which lands in the result row.

Inputs: the paper's implementation (and anomalib's, which the reference study ran with
"normalization: none" in its data pipeline) normalises [0, 1] images with ImageNet statistics
inside the model. Our loaders already deliver ImageNet-normalised images, so they are used as
they come: the networks see the same tensors.

Budget: the paper trains 70 000 iterations of batch size 1; the reference study (Table B.8)
trains 200 epochs at batch size 1 (about 45 000 iterations for an MVTec AD category of ~250
images with 10 % held out), which is our default ``epochs``. The learning rate drops to a tenth
for the last 5 % of the images seen, as the paper's schedule does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from models.backbones import load_state_dict_file
from models.base import (
    Batch,
    Detector,
    EpochCallback,
    Prediction,
    check_epochs,
    iter_images,
    register,
    train_epochs,
)
from models.components.feature_utils import upsample_maps
from models.components.pdn import (
    ImageAutoencoder,
    PenaltyImages,
    color_jitter,
    hard_feature_loss,
    image_fingerprints,
    load_pdn_weights,
    patch_description_network,
    quantile,
)
from models.constraints import (
    BOOL,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    UNIT_LEFT_CLOSED,
    Options,
    Rule,
)
from models.errors import ModelError
from models.parts import check_part_kind, describe_part
from models.teacher_distillation import TEACHER_KIND

__all__ = ["PAPER_QUANTILES", "EfficientAD"]

PAPER_QUANTILES = (0.9, 0.995)
"""Quantiles of the held-out normal maps that the map normalisation sends to 0 and 0.1."""

_MAP_PADDING = 4
"""Without convolution padding the PDN's map covers the image minus a 16 px border (half the
receptive field): 4 feature cells at stride 4 on each side."""


@register("efficient_ad")
class EfficientAD(Detector):
    """PDN student-teacher plus autoencoder, maps normalised on held-out normal images."""

    learning_type = "iterative"
    localizes = True

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        "model_size": Options("small", "medium"),
        "teacher_out_channels": POSITIVE_INT,
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "epochs": POSITIVE_INT,
        "hard_quantile": UNIT_LEFT_CLOSED,
        "validation_fraction": UNIT_LEFT_CLOSED,
        "padding": BOOL,
        "pad_maps": BOOL,
    }

    def __init__(
        self,
        model_size: str = "small",
        teacher_out_channels: int = 384,
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        epochs: int = 200,
        hard_quantile: float = 0.999,
        validation_fraction: float = 0.1,
        padding: bool = False,
        pad_maps: bool = True,
        teacher_weights: str | None = None,
        imagenet_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            model_size: ``"small"`` (EfficientAD-S: PDN of 4 convolutions, 128/256 channels) or
                ``"medium"`` (EfficientAD-M: 6 convolutions, 256/512 channels).
            teacher_out_channels: feature channels of the teacher (and of the autoencoder; the
                student has twice as many).
            lr: Adam learning rate of student and autoencoder.
            weight_decay: Adam weight decay.
            epochs: training epochs when ``fit`` is not given a budget.
            hard_quantile: quantile of the squared student-teacher differences of a batch above
                which they enter the student's hard feature loss (0 uses all of them).
            validation_fraction: share of the (distinct) training images held out, chosen from
                ``seed``, to measure the quantiles of the map normalisation; they are not
                trained on. 0 measures them on the training images instead.
            padding: zero-pad the PDN convolutions as the paper's tables list (maps a quarter
                of the input size); False, the official code's default, leaves them unpadded.
            pad_maps: without ``padding``, pad the maps by the 4 cells the unpadded PDN loses
                on every side before upsampling them, so that they line up with the image.
            teacher_weights: local file with the state dict of a teacher PDN of this size and
                ``teacher_out_channels`` (distilled from WideResNet-101 as in the paper; ``sweep
                parts teacher`` makes one, :func:`models.teacher_distillation.distill_teacher`).
                None leaves the teacher randomly initialised from ``seed``.
            imagenet_dir: local folder of images (ImageNet in the paper) for the student's
                penalty. None drops the penalty.
            seed: seeds the initialisation of every network, the held-out split, the
                augmentation, the penalty images and dropout.
        """
        super().__init__()
        # Beyond the table: the file system.
        if imagenet_dir is not None and not Path(imagenet_dir).expanduser().is_dir():
            raise ModelError(f"efficient_ad: imagenet_dir {str(imagenet_dir)!r} is not a folder")
        self.out_channels = teacher_out_channels
        self.epochs = epochs
        self.model_size = model_size
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.hard_quantile = float(hard_quantile)
        self.validation_fraction = float(validation_fraction)
        self.padding = padding
        self.pad_maps = pad_maps
        self.teacher_weights = teacher_weights
        self.imagenet_dir = imagenet_dir
        self.seed = seed

        seeds = torch.randint(2**62, (6,), generator=torch.Generator().manual_seed(seed)).tolist()
        (
            teacher_seed,
            student_seed,
            ae_seed,
            self._split_seed,
            self._train_seed,
            self._penalty_seed,
        ) = seeds
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(teacher_seed)
            self.teacher = patch_description_network(model_size, self.out_channels, padding)
            torch.default_generator.manual_seed(student_seed)
            self.student = patch_description_network(model_size, 2 * self.out_channels, padding)
            torch.default_generator.manual_seed(ae_seed)
            self.autoencoder = ImageAutoencoder(self.out_channels)
        self._teacher_metadata: dict[str, Any] | None = None
        if teacher_weights is not None:
            path = Path(teacher_weights).expanduser()
            if not path.is_file():
                raise ModelError(f"efficient_ad: teacher_weights {str(path)!r} is not a file")
            self._teacher_metadata = check_part_kind(
                path, TEACHER_KIND, "efficient_ad", "teacher_weights"
            )
            try:
                load_pdn_weights(self.teacher, load_state_dict_file(path), f"file {str(path)!r}")
            except ModelError as error:
                raise ModelError(
                    f"efficient_ad: teacher_weights: {error} (expected a state dict, e.g. "
                    "torch.save(teacher.state_dict(), path), not a pickled module)"
                ) from error
        self.teacher.requires_grad_(False)
        self.teacher.eval()

        c = self.out_channels
        self.register_buffer("teacher_mean", torch.zeros(1, c, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, c, 1, 1))
        # Quantiles (q_a, q_b) of the local and of the global map on held-out normal images.
        self.register_buffer("st_quantiles", torch.zeros(2))
        self.register_buffer("ae_quantiles", torch.ones(2))
        self.register_buffer("fitted", torch.tensor(False))
        self.eval()

    def train(self, mode: bool = True) -> EfficientAD:
        super().train(mode)
        self.teacher.eval()  # frozen: never in training mode
        return self

    # ------------------------------------------------------------------------------ networks

    def _teacher_features(self, images: Tensor) -> Tensor:
        return (self.teacher(images) - self.teacher_mean) / self.teacher_std

    def raw_maps(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Unnormalised local (student-teacher) and global (student-autoencoder) maps, ``B x h
        x w`` at the PDN's output resolution."""
        c = self.out_channels
        teacher = self._teacher_features(images)
        student = self.student(images)
        reconstruction = self.autoencoder(images, teacher.shape[-2:])
        local = (teacher - student[:, :c]).square().mean(1)
        global_ = (reconstruction - student[:, c:]).square().mean(1)
        return local, global_

    # ------------------------------------------------------------------------------ fit

    def resource_probe(self, images: Tensor) -> None:
        """A training step's forward: teacher, student (twice) and autoencoder losses."""
        self._losses(images, None, torch.Generator().manual_seed(0))

    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Train student and autoencoder for ``epochs`` (default: the constructor's) passes.

        Before training, one pass hashes the images to hold out ``validation_fraction`` of them
        and a second computes the teacher's channel statistics on the others (the held-out
        images are kept for the map normalisation). After every epoch the map normalisation
        quantiles are measured on the held-out images with the current networks, then
        ``on_epoch_end(epoch, {"loss", "loss_st", "loss_ae", "loss_stae"})`` runs (mean losses
        per image): it can score the detector with ``predict``, and it stops training when it
        returns True. A non-finite mean loss (diverged training) is a :class:`ModelError`.
        """
        n_epochs = (
            self.epochs if epochs is None else check_epochs("efficient_ad", epochs, "fit epochs")
        )
        device = self.teacher_mean.device
        notes: list[str] = []
        parts = self.parts()
        if self.teacher_weights is None:
            notes.append(
                "efficient_ad: no teacher_weights, so the teacher PDN is randomly initialised "
                "instead of distilled from WideResNet-101 on ImageNet"
            )
        elif self._teacher_metadata is not None:
            source = self._teacher_metadata.get("backbone")
            if source != "wide_resnet101_2":
                notes.append(
                    f"efficient_ad: the teacher was distilled from {source} (the paper's from "
                    "WideResNet-101)"
                )
        penalty = None
        if self.imagenet_dir is None:
            notes.append(
                "efficient_ad: no imagenet_dir, so the student's ImageNet penalty is dropped"
            )
        else:
            penalty = PenaltyImages(self.imagenet_dir, self._penalty_seed, "efficient_ad")

        held_out = self._choose_held_out(train)
        validation, n_kept = self._teacher_statistics(train, held_out, device)
        if not held_out:
            notes.append(
                "efficient_ad: too few distinct training images to hold any out, so the map "
                "normalisation quantiles come from the training images"
                if self.validation_fraction > 0
                else "efficient_ad: validation_fraction is 0, so the map normalisation "
                "quantiles come from the training images"
            )

        params = [*self.student.parameters(), *self.autoencoder.parameters()]
        optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        augment_generator = torch.Generator().manual_seed(self._train_seed)
        decay_after = 0.95 * n_epochs * n_kept
        seen = 0

        def step(images: Tensor) -> dict[str, float]:
            nonlocal seen
            if seen >= decay_after:
                for group in optimizer.param_groups:
                    group["lr"] = self.lr * 0.1
            parts = self._losses(images, penalty, augment_generator)
            loss = parts.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += images.shape[0]
            values = torch.cat([loss.detach()[None], parts.detach()]).tolist()
            return dict(zip(("loss", "loss_st", "loss_ae", "loss_stae"), values, strict=True))

        def end_of_epoch(epoch: int, means: dict[str, float]) -> None:
            # Before on_epoch_end, so that a scheduler scoring a validation split from it (ASHA)
            # gets maps normalised for the networks of this epoch; the last epoch's quantiles
            # are the ones the fitted detector keeps, measured after training as in the paper.
            # Without a callback nobody scores between epochs: only the last pass is needed.
            if on_epoch_end is not None or epoch == n_epochs:
                self._normalisation_quantiles(validation if held_out else train, device)
                self.fitted.fill_(True)

        rng_devices = [device.index or 0] if device.type == "cuda" else []
        # Dropout draws from the global generator: fork it, seeded, for reproducibility.
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(self._train_seed)
            epochs_run, losses = train_epochs(
                self,
                _KeptImages(train, held_out),
                step,
                epochs=n_epochs,
                on_epoch_end=on_epoch_end,
                end_of_epoch=end_of_epoch,
            )
        return {
            "epochs": epochs_run,
            **losses,
            "n_train": n_kept,
            "n_validation": len(held_out),
            "notes": notes,
            "parts": parts,
        }

    def parts(self) -> dict[str, str]:
        """Where the teacher and the penalty images come from, as a result row shows it."""
        teacher = (
            "random init"
            if self.teacher_weights is None
            else describe_part(self.teacher_weights, "file")
        )
        penalty = (
            "none" if self.imagenet_dir is None else describe_part(self.imagenet_dir, "folder")
        )
        return {"teacher": teacher, "penalty": penalty}

    def _choose_held_out(self, train: Iterable[Batch]) -> set[str]:
        fingerprints = set()
        for images in iter_images(train):
            fingerprints.update(image_fingerprints(images))
        if not fingerprints:
            raise ModelError("efficient_ad: the training set is empty")
        distinct = sorted(fingerprints)
        n = len(distinct)
        if n < 2 or self.validation_fraction == 0:
            return set()
        k = min(n - 1, max(1, round(self.validation_fraction * n)))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self._split_seed))
        return {distinct[i] for i in order[:k].tolist()}

    @torch.no_grad()
    def _teacher_statistics(
        self, train: Iterable[Batch], held_out: set[str], device: torch.device
    ) -> tuple[list[Tensor], int]:
        """Set the teacher's channel mean and std from the kept images; return the held-out
        images (one each) and the number of kept ones."""
        total = torch.zeros(self.out_channels, dtype=torch.float64, device=device)
        total_sq = torch.zeros_like(total)
        count = 0
        n_kept = 0
        validation: dict[str, Tensor] = {}
        for images in iter_images(train):
            images = images.to(device)
            keep = [True] * images.shape[0]
            if held_out:
                for i, fingerprint in enumerate(image_fingerprints(images)):
                    if fingerprint in held_out:
                        keep[i] = False
                        validation.setdefault(fingerprint, images[i : i + 1].clone())
                if not any(keep):
                    continue
                images = images[torch.tensor(keep, device=device)]
            features = self.teacher(images).double()
            total += features.sum((0, 2, 3))
            total_sq += features.square().sum((0, 2, 3))
            count += features.shape[0] * features.shape[2] * features.shape[3]
            n_kept += images.shape[0]
        mean = total / count
        std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
        self.teacher_mean.copy_(mean.float().view_as(self.teacher_mean))
        # A constant channel (possible with random weights) would divide by zero.
        self.teacher_std.copy_(std.float().clamp_min(1e-6).view_as(self.teacher_std))
        return [validation[key] for key in sorted(validation)], n_kept

    def _losses(
        self, images: Tensor, penalty: PenaltyImages | None, generator: torch.Generator
    ) -> Tensor:
        """(student-teacher, autoencoder-teacher, student-autoencoder) losses of a batch."""
        c = self.out_channels
        with torch.no_grad():
            teacher = self._teacher_features(images)
        student = self.student(images)[:, :c]
        loss_st = hard_feature_loss((teacher - student).square(), self.hard_quantile)
        if penalty is not None:
            outside = penalty.sample(images.shape[0], images.shape[-2:], images.device)
            loss_st = loss_st + self.student(outside)[:, :c].square().mean()
        # The autoencoder branch sees colour-jittered images, as in the paper.
        augmented = color_jitter(images, generator)
        with torch.no_grad():
            teacher_aug = self._teacher_features(augmented)
        reconstruction = self.autoencoder(augmented, teacher_aug.shape[-2:])
        student_ae = self.student(augmented)[:, c:]
        loss_ae = (teacher_aug - reconstruction).square().mean()
        loss_stae = (reconstruction - student_ae).square().mean()
        return torch.stack([loss_st, loss_ae, loss_stae])

    @torch.no_grad()
    def _normalisation_quantiles(self, images: Iterable[Batch], device: torch.device) -> None:
        local_maps, global_maps = [], []
        training = self.training
        self.eval()  # runs between training epochs too: no dropout in the maps it measures
        try:
            for batch in iter_images(images):
                local, global_ = self.raw_maps(batch.to(device))
                local_maps.append(local.flatten())
                global_maps.append(global_.flatten())
        finally:
            self.train(training)
        local_all, global_all = torch.cat(local_maps), torch.cat(global_maps)
        q_a, q_b = PAPER_QUANTILES
        self.st_quantiles.copy_(torch.stack([quantile(local_all, q_a), quantile(local_all, q_b)]))
        self.ae_quantiles.copy_(torch.stack([quantile(global_all, q_a), quantile(global_all, q_b)]))

    # ------------------------------------------------------------------------------ predict

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Average of the normalised local and global maps, upsampled; score = its maximum."""
        if not bool(self.fitted):
            raise ModelError("efficient_ad: predict called before fit")
        images = images.to(self.teacher_mean.device)
        training = self.training
        self.eval()  # the autoencoder's dropout must be off, whatever mode the caller left
        try:
            local, global_ = self.raw_maps(images)
        finally:
            self.train(training)
        anomaly_map = 0.5 * _normalise(local, self.st_quantiles) + 0.5 * _normalise(
            global_, self.ae_quantiles
        )
        if self.pad_maps and not self.padding:
            anomaly_map = F.pad(anomaly_map, (_MAP_PADDING,) * 4)
        anomaly_map = upsample_maps(anomaly_map, images.shape[-2:])
        return Prediction(score=anomaly_map.flatten(1).amax(1), anomaly_map=anomaly_map)


class _KeptImages:
    """The training batches without their held-out images, iterable once per epoch as the
    batches are; a batch of held-out images only is skipped."""

    def __init__(self, train: Iterable[Batch], held_out: set[str]) -> None:
        self.train = train
        self.held_out = held_out

    def __iter__(self) -> Iterator[Tensor]:
        for images in iter_images(self.train):
            if self.held_out:
                keep = [f not in self.held_out for f in image_fingerprints(images)]
                if not any(keep):
                    continue
                if not all(keep):
                    images = images[torch.tensor(keep, device=images.device)]
            yield images


def _normalise(maps: Tensor, quantiles: Tensor) -> Tensor:
    # The paper's linear map sending q_a to 0 and q_b to 0.1.
    q_a, q_b = quantiles[0], quantiles[1]
    return 0.1 * (maps - q_a) / (q_b - q_a).clamp_min(1e-12)
