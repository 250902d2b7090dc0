"""Every detector of the zoo must beat a baseline that learns nothing, on real texture.

The set (``texture_defects.py``): 96 px crops of a gravel photograph; 32 normal training crops,
and 40 normal + 40 defective test crops whose defects (coarser or finer gravel, a smeared spot,
a patch of grass, a lit scratch) are rearrangements of the very pixel values they cover. The
baseline: each pixel's L2 distance from the per-pixel median of the training images, the image
score its max or mean (whichever ranks better). It scores 1.0 on the toy set of
``toy_defects.py``, and near chance here, since no pixel is brighter or darker than gravel.

Each detector is fitted on the normal crops of the seed-``SEED`` set (also its own seed) and
must reach

    image AUROC >= max(baseline image AUROC, 0.5) + image_margin
    pixel AUROC >= max(baseline pixel AUROC, 0.5) + pixel_margin   (every detector with a map)

``max(..., 0.5)``: a baseline that draws worse than chance must not lower the bar. Margins are
at least 0.1 and a bit below the smallest excess measured over three detector seeds on this
set, so that platform noise in training does not trip them.

Measured with the settings of ``QUALITY`` (all on pretrained EfficientNet-Lite0; ep: epochs).
Columns: image and pixel AUROC on the test's set (data seed 0) for detector seeds 0, 1 and 2,
then on the sets of seeds 1 and 2 (data and detector seed alike), for reference; the margins
asserted (image/pixel); seconds of the test on this project's 2-core VM, shared with other
work. Baseline, image / pixel: 0.614 (max) / 0.507 on set 0; 0.551 (mean) / 0.511 on set 1; 0.556
(max) / 0.513 on set 2.

================  ===  ===========================  ===========================  =======  ====
detector          ep   image: seed 0 1 2 ; set 1 2  pixel: seed 0 1 2 ; set 1 2  margins  s
================  ===  ===========================  ===========================  =======  ====
dfkde             -    .809 .809 .809 ; .746 .689   (no map)                     .15 / -  0.9
dfm               -    .945 .945 .945 ; .931 .876   .861 .861 .861 ; .881 .795   .25/.25  1.0
padim             -    .813 .813 .813 ; .833 .819   .856 .856 .856 ; .887 .847   .15/.25  2.0
patchcore         -    .924 .911 .936 ; .909 .959   .946 .948 .948 ; .958 .945   .25/.35  2.8
cfa               5    .953 .914 .956 ; .954 .888   .944 .940 .941 ; .950 .934   .25/.40  4.0
cflow             3    .896 .886 .906 ; .907 .817   .818 .832 .845 ; .821 .803   .15/.25  7.9
fastflow          10   .906 .863 .839 ; .754 .723   .856 .849 .851 ; .885 .833   .20/.30  10.3
mmr               10   .898 .889 .907 ; .924 .897   .926 .921 .929 ; .919 .922   .20/.35  5.6
simplenet         30   .839 .831 .869 ; .855 .853   .792 .761 .885 ; .788 .834   .20/.20  78.4
stfpm             10   .912 .870 .848 ; .783 .811   .883 .868 .854 ; .842 .830   .15/.25  11.0
uflow             20   .869 .867 .839 ; .791 .858   .873 .853 .851 ; .888 .840   .20/.30  13.8
efficient_ad_ast  3+3  .864 .838 .847 ; .726 .723   .898 .895 .900 ; .877 .873   .15/.30  30.8
================  ===  ===========================  ===========================  =======  ====

efficient_ad_ast and simplenet (46 s) run in the slow stage, the others by default. The cfa,
cflow, fastflow, simplenet and uflow rows were measured after issue 13's reference fixes (CFA's
padding, FrEIA's coupling, SimpleNet's patch features), their seconds under a heavier load than
the others'.

Expected failures (slow, ``xfail(run=False)``: not run by CI, which would spend 5 minutes
training them only to miss; ``pytest -m slow --runxfail tests/test_quality.py`` runs them):
image / pixel AUROC on the test's set and seconds; each entry's reason names the other budgets
tried.

autoencoder 20 ep .501/.503 9 s; csflow (random EfficientNet-B0) 20 ep .416/.752 36 s; cutpaste
Lite0 10 ep .586/- 25 s; draem (1/4 width) 6 ep .454/.524 37 s; dsr (1/4 width) 12 ep .611/.540
22 s; efficient_ad (random teacher) 2 ep .583/.319 33 s; ganomaly 3 ep .449/- 37 s; memseg
(random resnet18) 10 ep .373/.473 43 s; reverse_distillation (random resnet18) 10 ep .547/.468
13 s; skip_ganomaly 3 ep .518/.509 34 s.

Runtime on that VM: the default (not slow) part 64 s before issue 13 (SimpleNet's official
1368-dimensional features and U-Flow's 20 epochs have since added about 70 s), the slow part
327 s with the expected failures run (at most 44 s a test), 31 s without them. Every test runs
torch on one thread (see ``one_thread``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from texture_defects import (
    DEFECT_KINDS,
    N_TEST_BAD,
    N_TEST_GOOD,
    N_TRAIN,
    SIZE,
    TEST_ROWS,
    Baseline,
    TextureSet,
    add_defect,
    gravel_crop,
    median_baseline,
    texture_set,
)
from toy_defects import toy_set

import models
from sweep.run.metrics import auroc

SEED = 0
"""Seeds the set and every detector."""
BATCH = 8
MIN_MARGIN = 0.1
"""No detector is asked for less than this over the baseline: less would prove little."""
LITE0 = {"backbone": "tf_efficientnet_lite0", "pretrained": True}
"""ImageNet-pretrained EfficientNet-Lite0 from its PyPI package: real features, offline."""


@dataclass(frozen=True)
class Quality:
    """How a detector runs on the texture set, and by how much it must beat the baseline."""

    hparams: Mapping[str, Any]
    epochs: int | None
    image_margin: float
    pixel_margin: float | None
    """None only for a detector that gives no anomaly map."""
    slow: bool = False
    xfail: str | None = None
    """Why the detector does not beat the baseline here, with the figures measured."""
    random_resnet18: bool = False
    """Use the session's fixed random resnet18 (``conftest.random_resnet18_weights``)."""


RANDOM_RESNET18 = {"backbone": "resnet18", "pretrained": False}
"""For the detectors that refuse Lite0: their own family, randomly initialised (no pretrained
ResNet or EfficientNet-B* exists offline); the weights are the session's fixed random resnet18."""
SMALL_VIT = {"vit_depth": 4, "vit_embed_dim": 192, "vit_heads": 3, "warmup_epochs": 2}
"""MMR's reconstruction ViT cut to a ViT-Tiny-sized one of 4 blocks (the paper's is ViT-B/16)."""

QUALITY: dict[str, Quality] = {
    # One-pass detectors: nothing is trained, so their figures do not depend on the seed.
    "dfkde": Quality(LITE0, None, image_margin=0.15, pixel_margin=None),
    "dfm": Quality(LITE0, None, image_margin=0.25, pixel_margin=0.25),
    "padim": Quality(LITE0, None, image_margin=0.15, pixel_margin=0.25),
    "patchcore": Quality(LITE0, None, image_margin=0.25, pixel_margin=0.35),
    # Iterative detectors on a small budget.
    "cfa": Quality(
        # One nearest memory feature: CFA's memory holds the mean feature of each grid
        # position (built for aligned parts); on randomly placed texture crops those means are
        # all alike, and a softmin over three of them blurs the score (K=3: 0.88-0.94).
        {**LITE0, "num_nearest_neighbors": 1},
        5,
        image_margin=0.25,
        pixel_margin=0.4,
    ),
    "cflow": Quality(LITE0, 3, image_margin=0.15, pixel_margin=0.25),
    "fastflow": Quality(LITE0, 10, image_margin=0.2, pixel_margin=0.3),
    "mmr": Quality({**LITE0, **SMALL_VIT}, 10, image_margin=0.2, pixel_margin=0.35),
    "simplenet": Quality(
        # The synthetic anomalies must stand out of Lite0's feature spread (the official patch
        # features: 9 x 40 and 9 x 112 values, 1368 kept; per-dimension std 2.7 here, 3.6 once
        # adapted; the paper's 0.015 was set for WideResNet50 features). noise_std 1.0 is about
        # 0.28 of the adapted spread: image/pixel AUROC seed 0 0.84/0.79 at 30 epochs, against
        # 0.81/0.54 at 0.5; 10 epochs leave the pixel AUROC at 0.60-0.79 over seeds.
        {**LITE0, "noise_std": 1.0},
        30,
        image_margin=0.2,
        pixel_margin=0.2,
        slow=True,  # 46 s of the default run's 10-minute budget
    ),
    "stfpm": Quality(LITE0, 10, image_margin=0.15, pixel_margin=0.25),
    # FrEIA's coupling damps the subnets by 0.1, so the flows move slowly: 10 epochs give image
    # AUROC 0.82-0.83 over seeds, 20 give 0.84-0.87.
    "uflow": Quality(LITE0, 20, image_margin=0.2, pixel_margin=0.3),
    "efficient_ad_ast": Quality(
        {**LITE0, "teacher_epochs": 3}, 3, image_margin=0.15, pixel_margin=0.3, slow=True
    ),
    # Detectors that do not beat the baseline here on a budget a test can afford. Each one is
    # expected to miss the bar (strict: the run fails the day it passes, so the entry gets real
    # margins). Bars on this set: image 0.714, pixel 0.607 (baseline 0.614 / 0.507 + 0.1).
    "autoencoder": Quality(
        {},
        20,
        image_margin=0.1,
        pixel_margin=0.1,
        slow=True,
        xfail="a pixel reconstruction error does not see rearranged gravel: image/pixel AUROC "
        "0.50/0.50 after 20 epochs, 0.45/0.52 after 60",
    ),
    "csflow": Quality(
        {"backbone": "efficientnet_b0", "pretrained": False, "hidden_channels": 256},
        20,
        image_margin=0.1,
        pixel_margin=0.1,
        slow=True,
        xfail="CS-Flow takes only EfficientNet-B0..B7, none of which has weights offline; on a "
        "random B0 image/pixel AUROC 0.42/0.75 (20 epochs, 256 hidden channels), 0.46/0.70 "
        "(10 epochs, the default 1024)",
    ),
    "cutpaste": Quality(
        LITE0,
        10,
        image_margin=0.1,
        pixel_margin=None,
        slow=True,
        xfail="its self-supervised classifier fine-tunes all of Lite0 on 32 images: image AUROC "
        "0.59 after 10 epochs, 0.49 after 20, 0.54 with the pooled embedding; the patch-level "
        "model (localize, 32 px patches) 0.62 image / 0.64 pixel",
    ),
    "draem": Quality(
        {"reconstructive_channels": 32, "discriminative_channels": 16},
        6,
        image_margin=0.1,
        pixel_margin=0.1,
        slow=True,
        xfail="trained from scratch (the paper: 700 epochs); at a quarter of its width, image/"
        "pixel AUROC 0.45/0.52 after 6 epochs, 0.58/0.50 after 10 (84 s); at full width 10 "
        "epochs take over 400 s",
    ),
    "dsr": Quality(
        {
            "hidden_channels": 32,
            "residual_channels": 16,
            "embedding_dim": 32,
            "num_embeddings": 256,
            "unet_width": 16,
        },
        12,
        image_margin=0.1,
        pixel_margin=0.1,
        slow=True,
        xfail="trained from scratch (the paper: 700 epochs) at a quarter of its width: image/"
        "pixel AUROC 0.61/0.54 after 12 epochs, 0.71/0.56 after 6",
    ),
    "efficient_ad": Quality(
        {},
        2,
        image_margin=0.1,
        pixel_margin=0.1,
        slow=True,
        xfail="no distilled PDN teacher offline, so the teacher is random; image/pixel AUROC "
        "0.58/0.32 after 2 epochs, 0.65/0.33 after 3, 0.61/0.38 after 10 (140 s)",
    ),
    "ganomaly": Quality(
        {},
        3,
        image_margin=0.1,
        pixel_margin=None,
        slow=True,
        xfail="a whole-image latent code misses a defect on 10 % of a texture: image AUROC 0.45 "
        "after 3 epochs, 0.47 after 4, 0.45 after 10 (127 s)",
    ),
    "memseg": Quality(
        RANDOM_RESNET18,
        10,
        image_margin=0.1,
        pixel_margin=0.1,
        slow=True,
        random_resnet18=True,
        xfail="MemSeg takes only ResNets, none of which has weights offline; on the fixed random "
        "resnet18 image/pixel AUROC 0.37/0.47 after 10 epochs (0.56/0.66 on timm's own random "
        "init)",
    ),
    "reverse_distillation": Quality(
        RANDOM_RESNET18,
        10,
        image_margin=0.1,
        pixel_margin=0.1,
        slow=True,
        random_resnet18=True,
        xfail="its student decoder mirrors a ResNet teacher, none of which has weights offline; "
        "with the fixed random resnet18 image/pixel AUROC 0.55/0.47 after 10 epochs, 0.50/0.61 "
        "after 30 (74 s)",
    ),
    "skip_ganomaly": Quality(
        {},
        3,
        image_margin=0.1,
        pixel_margin=0.1,
        slow=True,
        xfail="reconstruction through skip connections copies the rearranged gravel as well: "
        "image/pixel AUROC 0.52/0.51 after 3 epochs, 0.53/0.51 after 4, 0.46/0.51 after 10",
    ),
}


def assert_beats_baseline(
    data: TextureSet,
    baseline: Baseline,
    scores: torch.Tensor,
    maps: torch.Tensor | None,
    image_margin: float,
    pixel_margin: float | None,
) -> dict[str, float]:
    """Fail unless ``scores`` (and ``maps``, when ``pixel_margin`` is given) rank the test set
    better than the baseline by the margins; return the AUROCs measured.

    The bar is ``max(baseline, 0.5) + margin``: a baseline that happens to rank worse than
    chance must not lower it.
    """
    measured = {"image_auroc": auroc(data.labels, scores.detach())}
    image_bar = max(baseline.image_auroc, 0.5) + image_margin
    assert measured["image_auroc"] >= image_bar, (
        f"image AUROC {measured['image_auroc']:.3f} < {image_bar:.3f} "
        f"(baseline {baseline.image_auroc:.3f} + margin {image_margin})"
    )
    if pixel_margin is not None:
        assert maps is not None, "a pixel margin is set but there is no anomaly map"
        measured["pixel_auroc"] = auroc(data.masks, maps.detach())
        pixel_bar = max(baseline.pixel_auroc, 0.5) + pixel_margin
        assert measured["pixel_auroc"] >= pixel_bar, (
            f"pixel AUROC {measured['pixel_auroc']:.3f} < {pixel_bar:.3f} "
            f"(baseline {baseline.pixel_auroc:.3f} + margin {pixel_margin})"
        )
    return measured


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # The runner's two cores are shared: with two torch threads, EfficientNet-Lite0 on 32
    # crops took 2.3 s against 0.09 s on one (the threads wait on each other whenever a core
    # is busy elsewhere), and at 96 px a second thread gains little even on idle cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> TextureSet:
    return texture_set(SEED)


@pytest.fixture(scope="module")
def baseline(data: TextureSet) -> Baseline:
    return data.baseline()


@pytest.fixture(scope="module")
def predict(data: TextureSet, random_resnet18_weights: str) -> Callable[[str], models.Prediction]:
    """Fits detector ``name`` as ``QUALITY`` says and predicts the test set, once per module."""
    cache: dict[str, models.Prediction] = {}

    def fit_predict(name: str) -> models.Prediction:
        if name not in cache:
            quality = QUALITY[name]
            hparams = dict(quality.hparams)
            if quality.random_resnet18:
                hparams["weights"] = random_resnet18_weights
            detector = models.create(name, seed=SEED, **hparams)
            train = data.train
            batches = [train[i : i + BATCH] for i in range(0, len(train), BATCH)]
            detector.fit(batches, epochs=quality.epochs)
            cache[name] = detector.predict(data.test)
        return cache[name]

    return fit_predict


def _detector_param(name: str) -> Any:
    quality = QUALITY.get(name)
    marks = []
    if quality is not None and quality.slow:
        marks.append(pytest.mark.slow)
    if quality is not None and quality.xfail:
        # Not run by default: each would spend up to a minute of CI training only to miss the bar
        # by the figures in its reason. `pytest -m slow --runxfail tests/test_quality.py` runs
        # them as plain tests (they fail, with the measured AUROCs); an entry whose detector
        # improves is then turned into a passing one with its new margin.
        marks.append(
            pytest.mark.xfail(strict=True, raises=AssertionError, reason=quality.xfail, run=False)
        )
    return pytest.param(name, marks=marks)


UNSUPERVISED = [
    m for m in models.list_models() if models.get_class(m).learning_type != "supervised"
]
"""The detectors this file holds to the baseline: supervised ones need a labelled set
(tests/test_supervised.py holds their learning tests against PaDiM and a shuffled-label
control)."""


@pytest.mark.parametrize("name", [_detector_param(name) for name in UNSUPERVISED])
def test_detector_beats_the_median_baseline(name, data, baseline, predict):
    assert name in QUALITY, (
        f"{name} has no QUALITY entry: measure it on the texture set and add one"
    )
    quality = QUALITY[name]
    prediction = predict(name)
    n = len(data.labels)
    assert prediction.score.shape == (n,)
    assert torch.isfinite(prediction.score).all()
    if prediction.anomaly_map is not None:
        # A detector that localises is held to its map too.
        assert quality.pixel_margin is not None, f"{name} gives a map: set a pixel margin"
        assert prediction.anomaly_map.shape == (n, SIZE, SIZE)
        assert torch.isfinite(prediction.anomaly_map).all()
    assert_beats_baseline(
        data,
        baseline,
        prediction.score,
        prediction.anomaly_map,
        quality.image_margin,
        quality.pixel_margin,
    )


def test_quality_table_matches_the_zoo():
    unsupervised = [
        m for m in models.list_models() if models.get_class(m).learning_type != "supervised"
    ]
    assert sorted(QUALITY) == unsupervised


@pytest.mark.parametrize("name", sorted(QUALITY))
def test_margins_are_meaningful(name):
    quality = QUALITY[name]
    assert quality.image_margin >= MIN_MARGIN
    if quality.pixel_margin is not None:
        assert quality.pixel_margin >= MIN_MARGIN


def test_shuffled_scores_fail_the_check(data, baseline, predict):
    """The check is not vacuous: the strongest detector's own scores and maps pass it, and the
    same values handed to the wrong images fail it."""
    quality = QUALITY["patchcore"]
    prediction = predict("patchcore")
    margins = (quality.image_margin, quality.pixel_margin)
    assert_beats_baseline(data, baseline, prediction.score, prediction.anomaly_map, *margins)
    order = torch.from_numpy(np.random.default_rng(SEED).permutation(len(data.labels)))
    with pytest.raises(AssertionError, match="image AUROC"):
        assert_beats_baseline(
            data, baseline, prediction.score[order], prediction.anomaly_map[order], *margins
        )
    with pytest.raises(AssertionError, match="pixel AUROC"):
        assert_beats_baseline(
            data, baseline, prediction.score, prediction.anomaly_map[order], *margins
        )


def test_baseline_is_near_chance_on_the_texture_set(baseline):
    assert baseline.image_auroc <= 0.7
    assert baseline.pixel_auroc <= 0.6


def test_baseline_solves_the_toy_set():
    # Why the texture set exists: on toy_defects the same baseline is perfect.
    toy = toy_set()
    solved = median_baseline(toy.train, toy.test, toy.labels, toy.masks)
    assert solved.image_auroc >= 0.99
    assert solved.pixel_auroc >= 0.99


def test_texture_set_shapes_and_labels(data):
    assert data.train_pixels.shape == (N_TRAIN, 3, SIZE, SIZE)
    assert data.test_pixels.shape == (N_TEST_GOOD + N_TEST_BAD, 3, SIZE, SIZE)
    assert data.train_pixels.dtype == data.test_pixels.dtype == torch.uint8
    # Gray photograph in three equal channels.
    assert torch.equal(data.test_pixels[:, 0], data.test_pixels[:, 2])
    assert data.labels.tolist() == [0] * N_TEST_GOOD + [1] * N_TEST_BAD
    defect_pixels = data.masks.flatten(1).sum(dim=1)
    assert (defect_pixels[:N_TEST_GOOD] == 0).all()
    assert (defect_pixels[N_TEST_GOOD:] > 0).all()
    assert sorted(set(data.kinds[N_TEST_GOOD:])) == sorted(DEFECT_KINDS)
    assert data.train.dtype == torch.float32


def test_texture_set_is_seeded():
    first, again, other = texture_set(SEED), texture_set(SEED), texture_set(SEED + 1)
    assert torch.equal(first.train_pixels, again.train_pixels)
    assert torch.equal(first.test_pixels, again.test_pixels)
    assert torch.equal(first.masks, again.masks)
    assert not torch.equal(first.test_pixels, other.test_pixels)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defects_rearrange_the_values_they_cover(kind):
    # What makes the pixel baseline blind: a defect moves values, it never adds one.
    rng = np.random.default_rng(SEED)
    image = gravel_crop(TEST_ROWS, SIZE, rng)
    defective, mask = add_defect(image, kind, rng)
    assert 0.01 < mask.mean() < 0.2
    assert np.array_equal(defective[~mask], image[~mask])
    assert np.array_equal(np.sort(defective[mask]), np.sort(image[mask]))
    assert not np.array_equal(defective[mask], image[mask])
