"""STFPM's training loss against the paper's formula (the detector's accuracy on the toy set is
checked in tests/test_detectors.py)."""

from __future__ import annotations

import copy

import torch
from toy_defects import toy_set

import models
from models.stfpm import STFPM


def reference_loss(
    teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor]
) -> torch.Tensor:
    # Wang et al. (eq. 1-2) and anomalib: per layer 0.5 / (h w) times the squared distance of the
    # channel-L2-normalised features, summed over images and positions; layers summed.
    total = torch.zeros(())
    for layer, t in teacher.items():
        s = student[layer]
        height, width = t.shape[-2:]
        t_hat = t / t.pow(2).sum(1, keepdim=True).sqrt()
        s_hat = s / s.pow(2).sum(1, keepdim=True).sqrt()
        total = total + 0.5 / (height * width) * (t_hat - s_hat).pow(2).sum()
    return total


def features(seed: int, batch: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "layer1": torch.randn(batch, 8, 6, 5, generator=generator),
        "layer2": torch.randn(batch, 16, 3, 2, generator=generator),
    }


def test_loss_is_the_papers_sum_over_the_batch():
    teacher, student = features(0), features(1)
    loss = STFPM.loss(teacher, student)
    assert loss.shape == ()
    torch.testing.assert_close(loss, reference_loss(teacher, student), rtol=1e-5, atol=0)
    # Twice the images, twice the loss: a batch mean would keep it unchanged.
    doubled = STFPM.loss(
        {k: torch.cat([v, v]) for k, v in teacher.items()},
        {k: torch.cat([v, v]) for k, v in student.items()},
    )
    torch.testing.assert_close(doubled, 2 * loss)


def test_first_sgd_step_follows_the_summed_loss():
    images = toy_set().train[:4]
    detector = models.create(
        "stfpm", pretrained=False, layers=("layer1", "layer2"), momentum=0.0, weight_decay=0.0
    )
    expected = copy.deepcopy(detector.student)
    with torch.no_grad():
        target = detector.teacher(images)
    loss = reference_loss(target, expected(images))
    loss.backward()
    with torch.no_grad():
        for p in expected.parameters():
            if p.grad is not None:
                p -= detector.lr * p.grad
    reported = []
    detector.fit([images], epochs=1, on_epoch_end=lambda e, m: reported.append(m["loss"]))
    # The metric is per image, the step's gradient is the summed loss's.
    torch.testing.assert_close(reported[0], float(loss.detach()) / len(images), rtol=1e-5, atol=0)
    for (name, p), q in zip(
        detector.student.named_parameters(), expected.parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
