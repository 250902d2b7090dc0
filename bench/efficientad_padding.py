"""EfficientAD's map border, two ways, on one fitted detector.

The authors' code pads the normalised, combined anomaly map with 0 before upsampling it;
anomalib 2.7 pads each raw map with 0 and normalises afterwards, which puts the border below
every normal pixel. This script fits the zoo's EfficientAD once per seed exactly as
``bench/parity.py``'s EfficientAD pair does (the shared Lite0-distilled teacher and penalty
folder, 256 px, batch 1) and scores the same raw maps both ways, so the difference is the
padding alone. Run with the parity venv (it reuses that script's data and parts)::

    .venv-parity/bin/python bench/efficientad_padding.py --seeds 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from parity import DEFAULT_ROOT, _batches, _score, build_sets, create_ours, prepare_parts

from data.datasets import load_mvtec
from data.transforms import normalize
from models.components.feature_utils import upsample_maps
from models.efficient_ad import _MAP_PADDING, _normalise


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1", help="comma-separated seeds")
    parser.add_argument("--set", default="brick", help="photo set (bench/photo_sets.py)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DEFAULT_ROOT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = build_sets(args.data, [args.set])
    splits = load_mvtec(root, args.set, 256)
    train = torch.cat([splits.train.pixels, splits.val.pixels])
    parts = prepare_parts("efficient_ad", root)
    test_images = normalize(splits.test.pixels)
    pad = (_MAP_PADDING,) * 4
    for seed in (int(s) for s in args.seeds.split(",")):
        torch.manual_seed(seed)
        detector = create_ours("efficient_ad", seed, parts)
        started = time.perf_counter()
        detector.fit(_batches(normalize(train), 1), epochs=args.epochs)
        fit_s = time.perf_counter() - started
        detector.eval()
        maps: dict[str, list[torch.Tensor]] = {"authors": [], "anomalib": []}
        with torch.no_grad():
            for batch in _batches(test_images, 8):
                local, global_ = detector.raw_maps(batch)
                size = batch.shape[-2:]
                combined = 0.5 * _normalise(local, detector.st_quantiles) + 0.5 * _normalise(
                    global_, detector.ae_quantiles
                )
                maps["authors"].append(upsample_maps(F.pad(combined, pad), size))
                padded = 0.5 * _normalise(F.pad(local, pad), detector.st_quantiles) + 0.5 * (
                    _normalise(F.pad(global_, pad), detector.ae_quantiles)
                )
                maps["anomalib"].append(upsample_maps(padded, size))
        for name, batches in maps.items():
            scores = torch.cat([m.flatten(1).amax(1) for m in batches])
            image, pixel = _score(splits.test.labels, splits.test.masks, scores, batches)
            print(
                f"{args.set} seed {seed} ({fit_s:.0f} s fit), {name} padding: image AUROC "
                f"{image:.3f}, pixel AUROC {pixel:.3f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
